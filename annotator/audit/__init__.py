"""Audit: quality audits of a finished run: the judge of reflections, the calibration ledger, stratified samples."""
