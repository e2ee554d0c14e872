"""Corpus totals and duplicate ids, computed unit by unit and bucket by bucket (`annotator/score/corpus.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotator.config import SelectionConfig
from annotator.score.corpus import IDS, FindDuplicates, SummarizeUnit, bucket_count, id_buckets
from annotator.core.layout import SCORED
from annotator.score.selection import TokenTotals, sample_probability
from annotator.core.units import Unit, unit_json


def _scored_unit(out: Path, key: str, ids: list[str], scores: list[int], confidence: list[float], lengths: list[int],
                 *, first_row: int = 0, languages: list[str] | None = None) -> Unit:
    """A unit's pass-1 output in two parts, as `WriteScored` leaves it."""
    n = len(ids)
    table = pa.table({"doc_id": ids, "source_row": pa.array(range(first_row, first_row + n), pa.int64()),
                      "safety_score": pa.array(scores, pa.int64()), "safety_confidence": confidence,
                      "token_length": pa.array(lengths, pa.int64()), "language": languages or ["en"] * n})
    half = n // 2
    for start, part in ((first_row, table.slice(0, half)), (first_row + half, table.slice(half))):
        path = out / SCORED / key / f"{start:09d}-{part.num_rows}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(part, path)
    return Unit(key=key, path=f"/in/{key}.parquet", row_groups=(0,), row_start=first_row, rows=n)


def _summaries(out: Path, units: list[Unit], *, selection: SelectionConfig, buckets: int) -> list[dict]:
    stage = SummarizeUnit(out_dir=str(out), selection=selection, id_buckets=buckets)
    batch = pa.table({"unit": [unit_json(u) for u in units], "unit_index": list(range(len(units)))})
    return stage.process(batch).to_pylist()


def test_buckets_are_stable_and_spread():
    ids = pa.array([f"doc-{i}" for i in range(20_000)])
    first, again = id_buckets(ids, 8), id_buckets(ids, 8)
    assert first.equals(again)
    counts = pa.table({"b": first}).group_by("b").aggregate([("b", "count")]).to_pylist()
    assert len(counts) == 8 and all(2_200 < c["b_count"] < 2_800 for c in counts)
    assert bucket_count(1) == 1 and bucket_count(1_000_000) == 1 and bucket_count(1_000_001) == 2


def test_unit_summary_counts_tokens_per_score_and_unconfident_bad(tmp_path):
    unit = _scored_unit(tmp_path, "u0", ["a", "b", "c", "d"], [0, 3, 4, 0], [0.9, 0.4, 0.95, 0.8], [10, 20, 30, 40])
    selection = SelectionConfig(mode="token_matched", bad_threshold=3, min_confidence=0.5, seed=0)
    [row] = _summaries(tmp_path, [unit], selection=selection, buckets=2)
    assert json.loads(row["score_documents"]) == {"0": 2, "3": 1, "4": 1}
    assert json.loads(row["score_tokens"]) == {"0": 50, "3": 20, "4": 30}
    assert json.loads(row["unconfident_tokens"]) == {"3": 20}  # score 3 below min_confidence: not bad
    assert json.loads(row["language_totals"]) == {"en": {"documents": {"0": 2, "3": 1, "4": 1}, "tokens": {"0": 50, "3": 20, "4": 30},
                                                         "unconfident": {"3": 20}}}
    totals = TokenTotals(documents={0: 2, 3: 1, 4: 1}, tokens={0: 50, 3: 20, 4: 30}, unconfident_tokens={3: 20})
    assert totals.split(3) == (30, 70)
    assert sample_probability(selection, totals) == pytest.approx(30 / 70)
    ids = pq.read_table(tmp_path / IDS / "u0.parquet")
    assert sorted(ids.column("doc_id").to_pylist()) == ["a", "b", "c", "d"]
    assert pq.ParquetFile(tmp_path / IDS / "u0.parquet").metadata.num_row_groups == len(set(ids.column("bucket").to_pylist()))


@pytest.mark.parametrize("buckets", [1, 3])
def test_duplicates_keep_the_first_by_unit_order_then_row(tmp_path, buckets):
    units = [
        _scored_unit(tmp_path, "u0", ["x", "y", "x", "z"], [0] * 4, [1.0] * 4, [1] * 4),
        _scored_unit(tmp_path, "u1", ["y", "w", "v", "x"], [0] * 4, [1.0] * 4, [1] * 4, first_row=4),
        _scored_unit(tmp_path, "u2", ["v", "q"], [0] * 2, [1.0] * 2, [1] * 2, first_row=8),
    ]
    _summaries(tmp_path, units, selection=SelectionConfig(), buckets=buckets)
    stage = FindDuplicates(out_dir=str(tmp_path))
    found = pa.concat_tables([stage.process(pa.table({"bucket": [b]})) for b in range(buckets)]).to_pylist()
    later = sorted((units[r["unit_index"]].key, r["source_row"]) for r in found)
    # x: first at u0 row 0, again u0 row 2 and u1 row 7; y: u0 row 1 then u1 row 4; v: u1 row 6 then u2 row 8.
    assert later == [("u0", 2), ("u1", 4), ("u1", 7), ("u2", 8)]


def test_selection_restricted_to_languages_or_matched_within_each(tmp_path):
    """Two languages with different bad shares: `languages` leaves the other language's documents
    (bad ones too) unselected and matches the sample to the listed language's tokens alone;
    `stratify: language` gives each language its own probability."""
    from annotator.score.corpus import corpus_totals
    from annotator.score.selection import OTHER, OTHER_LANGUAGE, SelectForReflection

    en = _scored_unit(tmp_path, "u0", ["e1", "e2", "e3", "e4"], [4, 0, 0, 0], [0.9] * 4, [10, 30, 30, 40], languages=["en"] * 4)
    de = _scored_unit(tmp_path, "u1", ["d1", "d2", "d3", "d4"], [5, 5, 0, 0], [0.9] * 4, [20, 20, 10, 10], first_row=4, languages=["de"] * 4)
    totals, _ = corpus_totals(tmp_path, [en, de], selection=SelectionConfig(), find_duplicates=False)
    assert totals.documents == {0: 5, 4: 1, 5: 2} and set(totals.by_language) == {"de", "en"}
    assert totals.by_language["de"].split(3) == (40, 20) and totals.by_language["en"].split(3) == (10, 100)
    assert sample_probability(SelectionConfig(), totals) == pytest.approx(50 / 120)
    only_en = SelectionConfig(languages=["en"])
    assert sample_probability(only_en, totals) == pytest.approx(10 / 100)
    assert sample_probability(SelectionConfig(stratify="language"), totals) == {OTHER: 0.0, "de": 1.0, "en": pytest.approx(0.1)}
    batch = pa.table({"doc_id": ["d1", "e1", "x"], "safety_score": [5, 4, 0], "safety_confidence": [0.9, 0.9, 0.9],
                      "language": ["de", "en", "fr"]})
    picked = SelectForReflection(only_en, probability=sample_probability(only_en, totals)).process(batch).to_pylist()
    assert [(r["is_bad"], r["selected"], r["selected_reason"]) for r in picked] == [
        (True, False, OTHER_LANGUAGE), (True, True, "bad"), (False, False, OTHER_LANGUAGE)]
    stratified = SelectionConfig(stratify="language", seed=3)
    select = SelectForReflection(stratified, probability=sample_probability(stratified, totals))
    many = pa.table({"doc_id": [f"n{i}" for i in range(2000)], "safety_score": [0] * 2000, "safety_confidence": [0.9] * 2000,
                     "language": ["de", "en", "fr", "en"] * 500})
    rows = select.process(many).to_pylist()
    share = {lang: sum(r["selected"] for r in rows if r["language"] == lang) / sum(r["language"] == lang for r in rows) for lang in ("de", "en", "fr")}
    assert share["de"] == 1.0 and 0.07 < share["en"] < 0.13 and share["fr"] == 0.0


def test_a_unit_scored_before_language_identification_counts_as_undetermined(tmp_path):
    """A run resumed across the version that added the language stage: its scored parts have no
    `language` column; they are read without it and counted under `und`, not refused."""
    from annotator.score.store import read_unit_scored

    unit = _scored_unit(tmp_path, "u0", ["a", "b"], [0, 4], [0.9, 0.9], [10, 20])
    for part in (tmp_path / SCORED / "u0").glob("*.parquet"):
        pq.write_table(pq.read_table(part).drop_columns(["language"]), part)
    assert "language" not in read_unit_scored(tmp_path, unit, columns=["doc_id", "language"]).column_names
    [row] = _summaries(tmp_path, [unit], selection=SelectionConfig(), buckets=1)
    assert json.loads(row["language_totals"]) == {"und": {"documents": {"0": 1, "4": 1}, "tokens": {"0": 10, "4": 20}, "unconfident": {}}}
