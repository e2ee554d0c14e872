"""The `safety_annotations` config of an annotation run's Hub repository: `id`, `safety_score` (int8)
and `safety_probs` (list<float32>) of every scored document, the shape the SPP method publishes its
classifier scores in. Read from the files each unit's finalize writes (`layout.SAFETY_DIR`), not from
the shards: a filtered baseline's shards lack the documents it dropped."""

from __future__ import annotations

from pathlib import Path

from annotator.core import layout, storage
from annotator.core.errors import OutputDirError
from annotator.core.storage import TMP_MARK

CONFIG = layout.SAFETY_DIR


def safety_config() -> dict:
    """The card's `configs` entry."""
    return {"config_name": CONFIG, "data_files": [{"split": "train", "path": f"{layout.SAFETY_DIR}/*.parquet"}]}


def card_entry(stats: dict) -> str:
    """The card's line in its list of files."""
    return (f"- `{layout.SAFETY_DIR}/` (config `{CONFIG}`): one row per scored document ({stats.get('documents_in', 0):,}, "
            "those a filtered baseline dropped included): `id` (string), `safety_score` (int8, 0-5) and `safety_probs` "
            "(list<float32>, the probability of each score), in input order within each work unit.")


def safety_annotation_files(out_dir: Path, *, documents: int | None) -> list:
    """The run's safety annotation files, refused unless they hold one row per scored document
    (`documents`, stats' `documents_in`): a run finished before they were written has none. Only
    the footers are read, so nothing is copied from a run that is refused."""
    files = [f for f in layout.safety_annotation_files(out_dir) if TMP_MARK not in f.name]
    rows = sum(storage.parquet_file(f).metadata.num_rows for f in files)
    if rows != documents:
        raise OutputDirError(f"{storage.location(out_dir) / layout.SAFETY_DIR} holds {rows:,} rows but the run scored "
                             f"{documents or 0:,} documents (documents_in): a run finished before safety annotations were "
                             "written per unit has none; publish it without --include-safety-annotations")
    return files
