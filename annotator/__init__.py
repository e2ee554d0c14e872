"""spp-annotator: score, select, reflect on and write pretraining documents for SPP.

The library is import-safe: nothing here starts Ray, loads a model or writes files.
Entry points live in `pipelines/`.
"""

__version__ = "0.1.0"
