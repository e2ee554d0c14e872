"""Reading the corpus: Parquet from local paths, globs or fsspec URLs into a Ray Dataset.

Every row leaves here with a string `doc_id` and a string `text`; other input columns are kept.
"""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from annotator.config import InputConfig
from annotator.stages import Resources, Stage


class InputError(ValueError):
    """The input as a whole cannot be used."""


def expand_paths(paths: list[str]) -> list[str]:
    """Local globs are expanded here (with a clear error when they match nothing); URLs and
    plain paths go to Ray/fsspec unchanged."""
    out: list[str] = []
    for p in paths:
        if "://" in p:
            out.append(p)
        elif any(ch in p for ch in "*?["):
            matches = sorted(glob.glob(p, recursive=True))
            if not matches:
                raise InputError(f"input.paths: {p!r} matches no file")
            out.extend(matches)
        else:
            if not Path(p).exists():
                raise InputError(f"input.paths: {p!r} does not exist")
            out.append(p)
    return out


def content_id(text: str) -> str:
    """A stable id for documents without one: the same text always gets the same id."""
    return "sha1-" + hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class NormalizeColumns(Stage):
    """Renames the configured text/id columns to `text`/`doc_id` and derives missing ids."""

    name = "normalize"
    adds = ("doc_id", "text")

    def __init__(self, cfg: InputConfig):
        self.text_column = cfg.text_column
        self.id_column = cfg.id_column
        self.reads = (cfg.text_column,)
        self.resources = Resources(num_cpus=0.5, batch_size=4096)

    def process(self, batch: pa.Table) -> pa.Table:
        text = batch.column(self.text_column)
        if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
            raise InputError(f"input.text_column {self.text_column!r} has type {text.type}, expected string")
        text = pc.fill_null(text.cast(pa.string()), "")
        if self.id_column and self.id_column in batch.column_names:
            ids = pc.cast(batch.column(self.id_column), pa.string())
        else:
            ids = pa.array([content_id(t) for t in text.to_pylist()], pa.string())
        rest = [c for c in batch.column_names if c not in (self.text_column, self.id_column, "doc_id", "text")]
        return pa.table([ids, text] + [batch.column(c) for c in rest], names=["doc_id", "text"] + rest)


def read_corpus(cfg: InputConfig):
    """A Ray Dataset of the input rows (not yet normalized)."""
    import ray.data

    files = expand_paths(cfg.paths)
    ds = ray.data.read_parquet(files)
    schema_names = ds.schema().names
    if cfg.text_column not in schema_names:
        raise InputError(f"input.text_column {cfg.text_column!r} is not a column of the input; columns: {schema_names}")
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    return ds
