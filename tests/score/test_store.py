"""The scored store (`score/store.py`): pass 1's parts and rejects per unit, complete by their
file names, read back in input order, cleared before a unit is scored again."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from annotator.core.layout import REJECTED_DOCUMENTS, SCORED
from annotator.core.units import Unit
from annotator.score.store import WriteScored, clear_unit_scoring, read_unit_scored, rejected_count, unit_scored


def scored_batch(unit: str, rows: list[tuple[int, str, str | None]]) -> pa.Table:
    """What pass 1 hands WriteScored: (source_row, doc_id, reject_reason) per row of one unit."""
    return pa.table({
        "_unit": [unit] * len(rows), "doc_id": [d for _, d, _ in rows], "text": [f"text of {d}" for _, d, _ in rows],
        "source_file": ["in.parquet"] * len(rows), "source_row": pa.array([r for r, _, _ in rows], pa.int64()),
        "reject_reason": pa.array([why for _, _, why in rows], pa.string()),
        "text_preview": [f"text of {d}"[:5] for _, d, _ in rows],
    })


def test_write_scored_records_a_unit_as_complete_by_file_names(tmp_path):
    a = Unit(key="in-aaaa-000000000", path="in.parquet", row_groups=(0,), row_start=0, rows=5)
    b = Unit(key="in-aaaa-000000005", path="in.parquet", row_groups=(1,), row_start=5, rows=2)
    batch = pa.concat_tables([
        scored_batch(a.key, [(3, "d3", None), (0, "d0", None), (1, "d1", "empty_text"), (4, "d4", "too_long:9_chars"), (2, "d2", None)]),
        scored_batch(b.key, [(5, "d5", "null_text"), (6, "d6", "null_text")]),
    ])
    counts = WriteScored(out_dir=str(tmp_path)).process(batch)
    assert counts.to_pylist() == [{"unit": a.key, "scored": 3, "rejected": 2}, {"unit": b.key, "scored": 0, "rejected": 2}]
    assert sorted(p.name for p in (tmp_path / SCORED / a.key).iterdir()) == ["000000000-3.parquet"]
    assert sorted(p.name for p in (tmp_path / SCORED / b.key).iterdir()) == ["000000005-0.parquet"]  # written even empty
    assert rejected_count(tmp_path, a) == 2 and rejected_count(tmp_path, b) == 2
    assert unit_scored(tmp_path, a) and unit_scored(tmp_path, b)

    rejects = pq.read_table(tmp_path / REJECTED_DOCUMENTS / f"{a.key}-000000000-2.parquet")
    assert rejects.column_names == ["doc_id", "source_file", "source_row", "reason", "text_preview"]
    assert sorted(zip(rejects.column("doc_id").to_pylist(), rejects.column("reason").to_pylist())) == [
        ("d1", "empty_text"), ("d4", "too_long:9_chars")]

    kept = read_unit_scored(tmp_path, a)
    assert kept.column("doc_id").to_pylist() == ["d0", "d2", "d3"]  # input order, whatever the batch order
    assert "reject_reason" not in kept.column_names and "text_preview" not in kept.column_names
    assert read_unit_scored(tmp_path, a, columns=["doc_id"]).column_names == ["doc_id", "source_row"]
    assert read_unit_scored(tmp_path, b).num_rows == 0

    clear_unit_scoring(tmp_path, a)
    assert not unit_scored(tmp_path, a) and rejected_count(tmp_path, a) == 0
    assert unit_scored(tmp_path, b)  # the other unit's state is untouched
    assert read_unit_scored(tmp_path, a).num_rows == 0


def test_a_unit_missing_rows_is_not_scored(tmp_path):
    unit = Unit(key="in-bbbb-000000000", path="in.parquet", row_groups=(0,), row_start=0, rows=3)
    WriteScored(out_dir=str(tmp_path)).process(scored_batch(unit.key, [(0, "d0", None), (1, "d1", "empty_text")]))
    assert not unit_scored(tmp_path, unit)
