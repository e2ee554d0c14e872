"""Benchmark: peak memory of pass 1's read of work units, sized by rows alone and by bytes
(`input.unit_bytes`), against pyarrow reading the same file at once, on large documents.

    .venv/bin/python bench/bench_unit_memory.py [--docs 2000] [--doc-bytes 1000000] [--group-docs 25]
                                                [--unit-bytes 268435456]

Writes `--docs` documents of about `--doc-bytes` characters each (random base64, so the file does
not compress them away) into one Parquet file with row groups of `--group-docs` documents, then
measures, each in a fresh process (peak RSS from the kernel, `ru_maxrss`):

- raw: `pyarrow.parquet.read_table` of the text and id columns (what a rows-only unit of the whole
  file holds before any work is done);
- rows: the units `input.rows_per_unit` = 10,000 gives (one unit of every document), each read and
  normalized by the reader stage (`ReadUnits.process_unit`), as pass 1 does;
- bytes: the same with `input.unit_bytes` set.

Prints a table with the units, the largest unit's bytes, the peak RSS and its ratio to raw.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_corpus(path: Path, *, docs: int, doc_bytes: int, group_docs: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = doc_bytes * 3 // 4  # base64: 4 characters per 3 bytes
    with pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("text", pa.string())]), compression="zstd") as writer:
        for start in range(0, docs, group_docs):
            n = min(group_docs, docs - start)
            texts = [base64.b64encode(os.urandom(raw)).decode() for _ in range(n)]
            writer.write_table(pa.table({"id": [f"d{start + i}" for i in range(n)], "text": texts}), row_group_size=group_docs)


def measure(mode: str, path: str, unit_bytes: int | None) -> dict:
    """In this (fresh) process: read the file as `mode` says; peak RSS in MB."""
    import pyarrow.parquet as pq

    from annotator.config import InputConfig
    from annotator.core.units import plan_input
    from annotator.score.reader import ReadUnits

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.time()
    if mode == "raw":
        table = pq.read_table(path, columns=["id", "text"])
        units, largest, docs = 1, table.nbytes, table.num_rows
        del table
    else:
        cfg = InputConfig(paths=[path], unit_bytes=unit_bytes if mode == "bytes" else None, max_row_group_bytes=None)
        plan = plan_input([path], cfg)
        reader = ReadUnits(cfg, extra_columns={})
        md = pq.ParquetFile(path).metadata
        units, docs = len(plan.units), 0
        largest = max(sum(md.row_group(g).total_byte_size for g in u.row_groups) for u in plan.units)
        for unit in plan.units:
            out = reader.process_unit(unit, {})
            docs += out.num_rows
            del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "units": units, "largest_unit_mb": round(largest / 2**20), "docs": docs,
            "peak_rss_mb": round(peak), "before_read_mb": round(base), "seconds": round(time.time() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--doc-bytes", type=int, default=990_000)
    ap.add_argument("--group-docs", type=int, default=25)
    ap.add_argument("--unit-bytes", type=int, default=256 * 2**20)
    ap.add_argument("--_measure", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._measure:
        mode, path, unit_bytes = args._measure
        print(json.dumps(measure(mode, path, int(unit_bytes))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "large-documents.parquet"
        write_corpus(path, docs=args.docs, doc_bytes=args.doc_bytes, group_docs=args.group_docs)
        print(f"{args.docs} documents of {args.doc_bytes:,} characters, row groups of {args.group_docs}: "
              f"{path.stat().st_size / 2**20:,.0f} MB on disk")
        rows = []
        for mode in ("raw", "rows", "bytes"):
            out = subprocess.run([sys.executable, __file__, "--_measure", mode, str(path), str(args.unit_bytes)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    raw = rows[0]["peak_rss_mb"]
    print(f"{'read':<8}{'units':>7}{'largest unit MB':>17}{'documents':>11}{'peak RSS MB':>13}{'vs raw':>8}{'s':>7}")
    for r in rows:
        print(f"{r['mode']:<8}{r['units']:>7}{r['largest_unit_mb']:>17}{r['docs']:>11}{r['peak_rss_mb']:>13}"
              f"{r['peak_rss_mb'] / raw:>8.2f}{r['seconds']:>7}")
    print(f"input.unit_bytes = {args.unit_bytes:,}; raw = pyarrow.parquet.read_table of the same file")


if __name__ == "__main__":
    main()
