"""The demo config on disk and on object storage, same input, same run otherwise: files or objects
written, bytes, wall time, and the S3/disk ratio; then the two outputs compared document by
document (scores, selection, reflections). The S3 side is moto's server on loopback
(`tests/s3_server.py`, a stand-in for the cloud's S3), reached only through the AWS variables.

    .venv/bin/python bench/bench_object_storage.py [--limit 300]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.s3_server import start_s3_server  # noqa: E402

CORPUS = (REPO.parent / "shared" / "data" / "corpus").resolve()
COMPARED = ["doc_id", "safety_score", "selected", "selected_reason", "reflection_status", "reflection_1p", "token_length"]


def run(*args: str, env: dict | None = None) -> float:
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "spp_reflections.py"), "--config", "configs/demo.yaml", *args],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"run failed ({' '.join(args)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=300)
    args = ap.parse_args()
    common = ["--set", f"input.limit={args.limit}", "--set", "generation.reproducible=true"]
    server = start_s3_server()
    try:
        client = server.client()
        for bucket in ("corpus", "runs"):
            client.create_bucket(Bucket=bucket)
        for f in sorted(CORPUS.glob("*.parquet")):
            client.upload_file(str(f), "corpus", f"web/{f.name}")
        with tempfile.TemporaryDirectory(prefix="spp-bench-disk-") as tmp:
            disk = Path(tmp) / "demo"
            disk_s = run(*common, "--set", f"input.paths=['{CORPUS}/*.parquet']", "--output", str(disk))
            s3_s = run(*common, "--set", "input.paths=['s3://corpus/web/*.parquet']", "--output", "s3://runs/demo", env=server.env())
            files = [p.stat().st_size for p in disk.rglob("*") if p.is_file()]
            objects = server.objects("runs", "demo/")
            disk_rows = pq.read_table(disk / "shards", columns=COMPARED).sort_by("doc_id")
            s3_rows = pa.concat_tables([pq.read_table(pa.BufferReader(server.read("runs", k)), columns=COMPARED)
                                        for k in sorted(objects) if k.startswith("demo/shards/")]).sort_by("doc_id")
        print(f"demo config, {args.limit} documents, generation.reproducible=true; S3 = moto on 127.0.0.1\n")
        print("| output | files/objects | bytes | wall s |")
        print("|---|---|---|---|")
        print(f"| disk ({Path(tempfile.gettempdir())}) | {len(files)} | {sum(files):,} | {disk_s:.1f} |")
        print(f"| s3://runs/demo (input s3://corpus/web/) | {len(objects)} | {sum(o['size'] for o in objects.values()):,} | {s3_s:.1f} |")
        print(f"\nwall time S3 / disk: {s3_s / disk_s:.2f}x")
        same = disk_rows.equals(s3_rows)
        print(f"documents compared on {COMPARED}: {disk_rows.num_rows} on disk, {s3_rows.num_rows} on S3, identical: {same}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
