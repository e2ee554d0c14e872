"""The scored store: pass 1 writes each unit's usable documents to `_work/scored/<unit>/` and rejected ones
to `rejects/documents/`, in parts whose names carry their row counts, so a unit is scored when its
parts and rejects add up to its rows; the later passes read the unit back in input order.
"""

from __future__ import annotations

import glob
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc

from annotator.core import storage
from annotator.core.checkpoint import write_table
from annotator.core.layout import REJECTED_DOCUMENTS, SCORED
from annotator.core.stages import Resources, Stage
from annotator.core.units import Unit
from annotator.score.reader import REJECT_COLUMNS

# Pass-1 columns added after runs already existed: a unit scored before them has none.
LATER_COLUMNS = ("language", "language_score")


def _counted(names) -> int:
    """Rows recorded in part names `<first>-<n>.parquet`."""
    return sum(int(PurePosixPath(getattr(n, "name", n)).stem.rsplit("-", 1)[1]) for n in names)


def unit_scored(out_dir: Path, unit: Unit) -> bool:
    """Pass 1 finished this unit: its scored parts and rejected documents add up to its rows."""
    return _counted((out_dir / SCORED / unit.key).glob("*.parquet")) + rejected_count(out_dir, unit) == unit.rows


def clear_unit_scoring(out_dir: Path, unit: Unit) -> None:
    """Forget a unit's partial pass-1 output before it is scored again (no duplicates)."""
    storage.remove_tree(out_dir / SCORED / unit.key)
    for p in (out_dir / REJECTED_DOCUMENTS).glob(f"{glob.escape(unit.key)}-*.parquet"):
        p.unlink()


class WriteScored(Stage):
    """End of pass 1: per unit in the block, usable documents go to `_work/scored/<unit>/` and
    rejected ones to `rejects/documents/`; emits one count row per unit part."""

    name = "write_scored"
    reads = ("_unit", "source_row", "reject_reason", "text_preview")
    adds = ("unit", "scored", "rejected")

    def __init__(self, *, out_dir: str):
        self.out_dir = out_dir
        self.resources = Resources(num_cpus=0.25, batch_size=None)

    def process(self, batch: pa.Table) -> pa.Table:
        out = storage.location(self.out_dir)
        rows = {"unit": [], "scored": [], "rejected": []}
        for unit in sorted(set(batch.column("_unit").to_pylist())):
            part = batch.filter(pc.equal(batch.column("_unit"), unit))
            first = pc.min(part.column("source_row")).as_py()
            bad = pc.is_valid(part.column("reject_reason"))
            rejected = part.filter(bad)
            kept = part.filter(pc.invert(bad)).drop_columns(["reject_reason", "text_preview"])
            if rejected.num_rows:
                table = pa.table({"doc_id": rejected.column("doc_id"), "source_file": rejected.column("source_file"),
                                  "source_row": rejected.column("source_row"), "reason": rejected.column("reject_reason"),
                                  "text_preview": rejected.column("text_preview")}, schema=pa.schema(REJECT_COLUMNS))
                write_table(out / REJECTED_DOCUMENTS / f"{unit}-{first:09d}-{rejected.num_rows}.parquet", table)
            # Always written, even empty: the name carries the count that says the unit is complete.
            write_table(out / SCORED / unit / f"{first:09d}-{kept.num_rows}.parquet", kept)
            rows["unit"].append(unit)
            rows["scored"].append(kept.num_rows)
            rows["rejected"].append(rejected.num_rows)
        return pa.table(rows)


def read_unit_scored(out_dir: Path, unit: Unit, *, columns: list[str] | None = None) -> pa.Table:
    """All scored documents of a unit (all columns, or `columns` and `source_row`), in input order.
    A part scored before a LATER_COLUMNS column existed is read without it (a resumed run)."""
    if columns is not None and "source_row" not in columns:
        columns = [*columns, "source_row"]
    parts = [_read_part(p, columns) for p in sorted((out_dir / SCORED / unit.key).glob("*.parquet"), key=str)]
    table = pa.concat_tables(parts, promote_options="permissive") if parts else pa.table({c: [] for c in columns or ()})
    if not table.num_rows:
        return table
    return table.take(pc.sort_indices(table.column("source_row")))


def _read_part(path, columns: list[str] | None) -> pa.Table:
    """One read; a second one (after reading the footer) only for a part that lacks a LATER_COLUMNS column."""
    try:
        return storage.read_table(path, columns=columns)
    except pa.ArrowInvalid:
        present = set(storage.read_schema(path).names)
        if columns is None or all(c in present for c in columns if c in LATER_COLUMNS):
            raise
        return storage.read_table(path, columns=[c for c in columns if c in present or c not in LATER_COLUMNS])


def rejected_count(out_dir: Path, unit: Unit) -> int:
    return _counted(p.name.removeprefix(unit.key + "-") for p in (out_dir / REJECTED_DOCUMENTS).glob(f"{glob.escape(unit.key)}-*.parquet"))
