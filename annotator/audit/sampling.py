"""Seeded, stratified samples of a finished run's shards: what the Hub sample, the judge audit and
the calibration ledger draw. One streaming pass over a few columns picks the rows (memory bounded
by the sample, not the corpus); a second reads only the picked rows with all their columns.
"""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Callable

import pyarrow as pa

from annotator.core import storage
from annotator.core.seeding import unit_hash

# A row's stratum from the tuple of its values of the sampled columns after `doc_id`; None leaves the row out.
Stratum = Callable[[tuple], "str | None"]


def allocate_sample(strata: dict[str, int], total: int) -> dict[str, int]:
    """Rows per stratum: as equal as the strata sizes allow (small strata give all their rows and
    the rest is shared by the others), so rare bad documents are not drowned by score 0."""
    alloc = {k: 0 for k in strata}
    open_strata = sorted(k for k, n in strata.items() if n > 0)
    left = min(total, sum(strata.values()))
    while left > 0 and open_strata:
        share = max(1, left // len(open_strata))
        for key in list(open_strata):
            take = min(share, strata[key] - alloc[key], left)
            alloc[key] += take
            left -= take
            if alloc[key] == strata[key]:
                open_strata.remove(key)
            if left == 0:
                break
    return alloc


def count_strata(files: list[Path], *, columns: list[str], stratum: Stratum) -> dict[str, int]:
    """Rows per stratum over `files` (each row's values of `columns`, in order, go to `stratum` as one tuple)."""
    counts: dict[str, int] = {}
    for f in files:
        for batch in storage.parquet_file(f).iter_batches(columns=columns, batch_size=65_536):
            for values in zip(*(batch.column(c).to_pylist() for c in columns)):
                key = stratum(values)
                if key is not None:
                    counts[key] = counts.get(key, 0) + 1
    return counts


def choose_sample(files: list[Path], *, allocation: dict[str, int], seed: int, columns: list[str], stratum: Stratum,
                  salt: str = "publish-sample") -> list[tuple[float, Path, int]]:
    """(hash, file, row) of the rows in the sample: per stratum, the `allocation[stratum]` rows with
    the smallest hash of (salt, seed, doc_id). `columns` start with `doc_id`; the others go to
    `stratum`."""
    kept: dict[str, list] = {k: [] for k, n in allocation.items() if n > 0}  # max-heaps of (-hash, file, row)
    for f in files:
        offset = 0
        for batch in storage.parquet_file(f).iter_batches(columns=columns, batch_size=65_536):
            ids, *rest = (batch.column(c).to_pylist() for c in columns)
            for i, (doc_id, *values) in enumerate(zip(ids, *rest)):
                key = stratum(tuple(values))
                heap = kept.get(key) if key is not None else None
                if heap is None:
                    continue
                h = unit_hash(salt, seed, doc_id)
                item = (-h, str(f), offset + i)
                if len(heap) < allocation[key]:
                    heapq.heappush(heap, item)
                elif -heap[0][0] > h:
                    heapq.heapreplace(heap, item)
            offset += batch.num_rows
    by_name = {str(f): f for f in files}
    return sorted(((-neg, by_name[f], row) for heap in kept.values() for neg, f, row in heap), key=lambda t: (t[0], str(t[1]), t[2]))


def read_rows(picks: list[tuple[float, Path, int]], *, batch_size: int = 4096, columns: list[str] | None = None) -> pa.Table:
    """The picked rows (all columns, or `columns`), in pick order. Only files and row groups holding
    picks are read, a batch at a time, so memory stays at one batch plus the picked rows."""
    by_file: dict[Path, set[int]] = {}
    for _, f, row in picks:
        by_file.setdefault(f, set()).add(row)
    tables, order = [], []
    for f, rows in by_file.items():
        pf = storage.parquet_file(f)
        start = 0
        for g in range(pf.num_row_groups):
            size = pf.metadata.row_group(g).num_rows
            wanted = sorted(r for r in rows if start <= r < start + size)
            at = start
            for batch in pf.iter_batches(batch_size=batch_size, row_groups=[g], columns=columns) if wanted else ():
                local = [r - at for r in wanted if at <= r < at + batch.num_rows]
                if local:
                    tables.append(pa.Table.from_batches([batch]).take(local))
                    order.extend((f, at + i) for i in local)
                at += batch.num_rows
            start += size
    if not tables:
        return pa.table({})
    table = pa.concat_tables(tables, promote_options="permissive")
    position = {key: i for i, key in enumerate(order)}
    return table.take([position[(f, row)] for _, f, row in picks])
