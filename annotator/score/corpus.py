"""Corpus-level facts that selection needs, computed unit by unit so memory never grows with the corpus.

After pass 1, one task per unit reads that unit's scored documents and returns its token totals
per safety score (a few numbers); the driver adds them up. Duplicate ids are found by hash
buckets: each unit task writes its ids, bucketed by a hash of the id, to `_work/ids/<unit>.parquet`
(one row group per bucket); then one task per bucket reads that bucket from every unit and marks
every occurrence after the first (by unit order, then row). A bucket holds about
`ROWS_PER_BUCKET` ids whatever the corpus size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from annotator.core import layout, storage
from annotator.core.checkpoint import write_atomically
from annotator.score.store import read_unit_scored
from annotator.config import SelectionConfig
from annotator.generate.cache import EngineDocuments
from annotator.score.language import UNDETERMINED
from annotator.score.selection import TokenTotals, add_counts
from annotator.core.ray_adapter import items_dataset, run_stages
from annotator.core.stages import Resources, Stage, UnitStage
from annotator.core.units import Unit, unit_json

IDS = layout.IDS
ROWS_PER_BUCKET = 1_000_000
_IDS_SCHEMA = pa.schema([("bucket", pa.int32()), ("doc_id", pa.string()), ("unit_index", pa.int32()), ("source_row", pa.int64())])


def bucket_count(documents: int) -> int:
    return max(1, math.ceil(documents / ROWS_PER_BUCKET))


def id_buckets(doc_ids: pa.Array | pa.ChunkedArray, buckets: int) -> pa.Array:
    """A stable bucket per id (the same in every process and run)."""
    from pandas.util import hash_array

    hashes = hash_array(np.asarray(doc_ids.to_pylist(), dtype=object))
    return pa.array((hashes % np.uint64(buckets)).astype(np.int32))


def units_with_index(units: list[Unit]):
    """One row per unit with its position in the plan (the order that decides which copy of an id is first)."""
    return items_dataset([{"unit": unit_json(u), "unit_index": i} for i, u in enumerate(units)])


class SummarizeUnit(UnitStage):
    """Per unit: documents and tokens per safety score (and per score among the documents whose
    low confidence keeps a bad score from counting as bad); writes the unit's bucketed ids."""

    name = "summarize_unit"
    reads = ("unit", "unit_index")
    adds = ("unit_index", "score_documents", "score_tokens", "unconfident_tokens", "language_totals")

    def __init__(self, *, out_dir: str, selection: SelectionConfig, id_buckets: int | None):
        self.out_dir = out_dir
        self.selection = selection
        self.id_buckets = id_buckets
        self.resources = Resources(num_cpus=0.5, batch_size=1)

    def _summarize(self, unit: Unit, index: int) -> dict:
        out = storage.location(self.out_dir)
        table = read_unit_scored(out, unit, columns=["doc_id", "source_row", "safety_score", "safety_confidence", "token_length", "language"])
        if "language" not in table.column_names:  # scored before language identification
            table = table.append_column("language", pa.array([UNDETERMINED] * table.num_rows, pa.string()))
        unconfident = table.filter(pc.and_(pc.greater_equal(table.column("safety_score"), self.selection.bad_threshold),
                                           pc.less(table.column("safety_confidence"), self.selection.min_confidence)))
        if self.id_buckets is not None:
            self._write_ids(out / IDS / f"{unit.key}.parquet", table, index=index)
        keys = ["language", "safety_score"]
        per = table.group_by(keys).aggregate([("safety_score", "count"), ("token_length", "sum")]).to_pylist()
        low = unconfident.group_by(keys).aggregate([("token_length", "sum")]).to_pylist()
        languages: dict[str, dict[str, dict[int, int]]] = {}
        for rows, fields in ((per, (("documents", "safety_score_count"), ("tokens", "token_length_sum"))),
                             (low, (("unconfident", "token_length_sum"),))):
            for r in rows:
                block = languages.setdefault(r["language"], {"documents": {}, "tokens": {}, "unconfident": {}})
                for name, column in fields:
                    block[name][int(r["safety_score"])] = int(r[column] or 0)

        def overall(name: str) -> dict[int, int]:
            out: dict[int, int] = {}
            for block in languages.values():
                add_counts(out, block[name])
            return out

        return {
            "unit_index": index,
            "score_documents": json.dumps(overall("documents")),
            "score_tokens": json.dumps(overall("tokens")),
            "unconfident_tokens": json.dumps(overall("unconfident")),
            "language_totals": json.dumps(languages),
        }

    def _write_ids(self, path: Path, table: pa.Table, *, index: int) -> None:
        ids = pa.table({
            "bucket": id_buckets(table.column("doc_id"), self.id_buckets),
            "doc_id": table.column("doc_id").cast(pa.string()),
            "unit_index": pa.array(np.full(table.num_rows, index, dtype=np.int32)),
            "source_row": table.column("source_row").cast(pa.int64()),
        }, schema=_IDS_SCHEMA).sort_by("bucket")

        def write(tmp: Path) -> None:
            # One row group per bucket: a bucket task reads only its own from each file.
            with pq.ParquetWriter(tmp, _IDS_SCHEMA, compression="zstd") as writer:
                buckets = ids.column("bucket").to_numpy()
                edges = np.flatnonzero(np.diff(buckets)) + 1
                for start, end in zip(np.r_[0, edges], np.r_[edges, len(buckets)]):
                    if end > start:
                        writer.write_table(ids.slice(start, end - start))

        write_atomically(path, write)

    output_schema = pa.schema([(c, pa.int64() if c == "unit_index" else pa.string()) for c in adds])

    def process_unit(self, unit: Unit, row: dict) -> list[dict]:
        return [self._summarize(unit, row["unit_index"])]


class FindDuplicates(Stage):
    """Per id bucket: every occurrence of an id after its first (unit order, then row)."""

    name = "find_duplicates"
    reads = ("bucket",)
    adds = ("unit_index", "source_row")

    def __init__(self, *, out_dir: str):
        self.out_dir = out_dir
        self.resources = Resources(num_cpus=1, batch_size=1)

    def _bucket(self, bucket: int) -> pa.Table:
        import pyarrow.dataset as pads

        files, fs = storage.dataset_files((storage.location(self.out_dir) / IDS).glob("*.parquet"))
        empty = pa.table({"unit_index": pa.array([], pa.int32()), "source_row": pa.array([], pa.int64())})
        if not files:
            return empty
        ids = pads.dataset(files, schema=_IDS_SCHEMA, format="parquet", filesystem=fs).to_table(
            filter=pc.field("bucket") == bucket, columns=["doc_id", "unit_index", "source_row"])
        counts = ids.group_by("doc_id").aggregate([("doc_id", "count")])
        repeated = counts.filter(pc.greater(counts.column("doc_id_count"), 1)).column("doc_id")
        if not len(repeated):
            return empty
        dups = ids.filter(pc.is_in(ids.column("doc_id"), value_set=repeated.combine_chunks()))
        dups = dups.sort_by([("doc_id", "ascending"), ("unit_index", "ascending"), ("source_row", "ascending")])
        doc = dups.column("doc_id").to_numpy(zero_copy_only=False)
        later = np.r_[False, doc[1:] == doc[:-1]]
        return dups.filter(pa.array(later)).select(["unit_index", "source_row"])

    def process(self, batch: pa.Table) -> pa.Table:
        return pa.concat_tables([self._bucket(int(b)) for b in batch.column("bucket").to_pylist()])


class CountForGeneration(EngineDocuments):
    """Per unit: how many documents the engine will see (the denominator of pass 2a's progress)."""

    name = "count_for_generation"
    adds = ("needs_generation",)
    output_schema = pa.schema([("needs_generation", pa.int64())])
    resources = Resources(num_cpus=0.5, batch_size=1)

    def process_unit(self, unit: Unit, row: dict) -> list[dict]:
        columns = ["doc_id", "safety_score", "safety_confidence", "language"]
        return [{"needs_generation": self.engine_documents(unit, columns=columns).num_rows}]


def corpus_totals(out_dir: Path, units: list[Unit], *, selection: SelectionConfig, find_duplicates: bool) -> tuple[TokenTotals, dict[str, list[int]]]:
    """Token totals per score over the scored corpus, and the duplicate rows per unit key."""
    buckets = bucket_count(sum(u.rows for u in units)) if find_duplicates else None
    summarize = SummarizeUnit(out_dir=str(out_dir), selection=selection, id_buckets=buckets)
    documents: dict[int, int] = {}
    tokens: dict[int, int] = {}
    unconfident: dict[int, int] = {}
    by_language: dict[str, dict[str, dict[int, int]]] = {}
    for row in run_stages(units_with_index(units), [summarize]):
        for into, column in ((documents, "score_documents"), (tokens, "score_tokens"), (unconfident, "unconfident_tokens")):
            add_counts(into, json.loads(row[column]))
        for lang, block in json.loads(row["language_totals"]).items():
            mine = by_language.setdefault(lang, {"documents": {}, "tokens": {}, "unconfident": {}})
            for name, counts in block.items():
                add_counts(mine[name], counts)
    duplicates: dict[str, list[int]] = {}
    if buckets is not None:
        found = items_dataset([{"bucket": b} for b in range(buckets)])
        for row in run_stages(found, [FindDuplicates(out_dir=str(out_dir))]):
            duplicates.setdefault(units[row["unit_index"]].key, []).append(int(row["source_row"]))
    languages = {lang: TokenTotals(documents=b["documents"], tokens=b["tokens"], unconfident_tokens=b["unconfident"])
                 for lang, b in sorted(by_language.items())}
    totals = TokenTotals(documents=documents, tokens=tokens, unconfident_tokens=unconfident, by_language=languages)
    return totals, {k: sorted(v) for k, v in sorted(duplicates.items())}


def count_for_generation(out_dir: Path, units: list[Unit], **stage_args) -> int:
    from annotator.score.reader import units_dataset

    stage = CountForGeneration(out_dir=str(out_dir), **stage_args)
    return sum(row["needs_generation"] for row in run_stages(units_dataset(units), [stage]))
