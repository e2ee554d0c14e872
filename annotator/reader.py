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


def decode_text_column(column: pa.ChunkedArray) -> tuple[pa.Array, list[str | None]]:
    """A string column and a note per row: null text becomes "" (noted), bytes that are not
    UTF-8 are decoded with U+FFFD replacements (noted)."""
    notes: list[str | None] = []
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        texts = []
        for raw in column.to_pylist():
            if raw is None:
                texts.append("")
                notes.append("null_text")
                continue
            try:
                texts.append(raw.decode("utf-8"))
                notes.append(None)
            except UnicodeDecodeError:
                texts.append(raw.decode("utf-8", errors="replace"))
                notes.append("invalid_utf8_replaced")
        return pa.array(texts, pa.string()), notes
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise InputError(f"input.text_column has type {column.type}, expected string (or binary holding UTF-8)")
    notes = ["null_text" if v is None else None for v in column.to_pylist()] if column.null_count else [None] * len(column)
    return pc.fill_null(column.cast(pa.string()), "").combine_chunks(), notes


class NormalizeColumns(Stage):
    """Renames the configured text/id columns to `text`/`doc_id`, derives missing ids, and
    records input problems that were repaired in `input_note`."""

    name = "normalize"
    adds = ("doc_id", "text", "input_note")

    def __init__(self, cfg: InputConfig):
        self.text_column = cfg.text_column
        self.id_column = cfg.id_column
        self.reads = (cfg.text_column,)
        self.resources = Resources(num_cpus=0.5, batch_size=4096)

    def process(self, batch: pa.Table) -> pa.Table:
        text, notes = decode_text_column(batch.column(self.text_column))
        if self.id_column and self.id_column in batch.column_names:
            ids = pc.cast(batch.column(self.id_column), pa.string())
        else:
            ids = pa.array([content_id(t) for t in text.to_pylist()], pa.string())
        if "path" in batch.column_names and "source_file" not in batch.column_names:
            # read_parquet(include_paths=True) names the input shard; output shard names derive from it.
            batch = batch.rename_columns(["source_file" if c == "path" else c for c in batch.column_names])
        rest = [c for c in batch.column_names if c not in (self.text_column, self.id_column, *self.adds)]
        return pa.table(
            [ids, text, pa.array(notes, pa.string())] + [batch.column(c) for c in rest], names=[*self.adds, *rest]
        )


def read_corpus(cfg: InputConfig):
    """A Ray Dataset of the input rows (not yet normalized)."""
    import ray.data

    files = expand_paths(cfg.paths)
    ds = ray.data.read_parquet(files, include_paths=True)
    schema = ds.schema()
    if cfg.text_column not in schema.names:
        raise InputError(f"input.text_column {cfg.text_column!r} is not a column of the input; columns: {schema.names}")
    text_type = schema.types[schema.names.index(cfg.text_column)]
    if not any(check(text_type) for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)):
        raise InputError(f"input.text_column {cfg.text_column!r} has type {text_type}, expected string (or binary holding UTF-8)")
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    return ds
