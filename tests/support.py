"""Shared fixtures: the repo, the real sample corpus beside it, and pipeline runs."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = (REPO.parent / "shared" / "data" / "corpus").resolve()
SAFETY = (REPO.parent / "shared" / "data" / "safety").resolve()


def require_shared_data() -> Path:
    if not CORPUS.is_dir():
        pytest.fail(f"the sample corpus is expected at {CORPUS} (../shared/data/corpus beside the repo)")
    return CORPUS


def in_child_process(fn, /, *args, **kwargs):
    """`fn(*args, **kwargs)` in a fresh spawned interpreter, its result returned here. For a test that
    hosts a Ray driver: the driver's native threads (gRPC, core worker IO) outlive `ray.shutdown()`
    and raced the interpreter's teardown at exit (a SIGSEGV after every test had passed), so the
    pytest process hosts none. `fn` must be importable at module level."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def run_pipeline(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """The entry point as a user runs it; vLLM needs a real file as __main__ for its subprocesses."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "spp_reflections.py"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def read_input(limit: int | None = None) -> dict[str, str]:
    """doc id -> text of the sample corpus, in file order."""
    out: dict[str, str] = {}
    for f in sorted(require_shared_data().glob("*.parquet")):
        t = pq.read_table(f, columns=["id", "text"])
        out.update(zip(t.column("id").to_pylist(), t.column("text").to_pylist()))
    return out


# The suite's one run of the demo config, shared by the end-to-end, job submission, plan, audit
# and resume tests (each pipeline run with an engine costs a minute or more here): 120 real web
# documents as 12 units of 10 (one row group each) and generation in batches of 3, so that every
# pass has steps to be killed between; sampling 4x the bad documents' tokens from the rest gives a
# handful of reflections while exercising token-matched selection. Small shards and charter tokens
# exercise the writer: several shards per unit, <charter_X.Y> in the text.
DEMO_UNITS, DEMO_ROWS_PER_UNIT = 12, 10
DEMO_DOCS = DEMO_UNITS * DEMO_ROWS_PER_UNIT


def demo_corpus(dest: Path) -> Path:
    """The first 120 documents of the sample corpus in row groups of 10, in `dest`."""
    src = sorted(require_shared_data().glob("*.parquet"))[0]
    dest.mkdir(parents=True, exist_ok=True)
    pq.write_table(pq.read_table(src).slice(0, DEMO_DOCS), dest / "web.parquet", row_group_size=DEMO_ROWS_PER_UNIT)
    return dest


def demo_args(corpus: Path) -> list[str]:
    """The demo run's command line without `--output`. Paths are absolute: the run goes through
    `ray job submit`, which runs it from an uploaded copy of the repo."""
    return ["--config", "configs/demo.yaml", "--set", f"input.paths=['{corpus}/*.parquet']", "--set", "input.limit=null",
            "--set", f"input.rows_per_unit={DEMO_ROWS_PER_UNIT}", "--set", f"classifier.batch_size={DEMO_ROWS_PER_UNIT}",
            "--set", "generation.batch_size=3", "--set", "selection.matched_token_ratio=4", "--set", "output.rows_per_shard=7",
            "--set", "output.template.charter_tokens=true", "--set", "output.overwrite=false", "--set", "plan.calibration_documents=1",
            # The resume and audit tests compare regenerated text with this run's, byte for byte.
            "--set", "generation.reproducible=true"]


@dataclass(frozen=True)
class DemoRun:
    out: Path
    args: list[str]                         # its command line, without --output
    plan: dict                              # plan.json, as `--plan` wrote it before the run
    submit: subprocess.CompletedProcess     # `ray job submit` of the run: its output holds the run's


def plan_then_submit(root: Path) -> DemoRun:
    """`--plan` of the demo run, then the run itself into the same folder through `ray job submit`
    to a fresh token-auth Ray head started here (stopped again once the job is done)."""
    import json
    import re

    from tests.ray_cluster import LocalRayCluster, ray_cli, token_auth_env

    args, out = demo_args(demo_corpus(root / "corpus")), root / "demo"
    plan = run_pipeline(*args, "--output", str(out), "--plan")
    assert plan.returncode == 0 and "projection:" in plan.stdout, plan.stdout[-3000:] + plan.stderr[-5000:]
    (root / "home").mkdir()
    # A short temp dir: Ray's Unix sockets live under it (paths of at most 107 bytes).
    cluster = LocalRayCluster(token_auth_env(root / "home"), temp_root=Path("/tmp") / f"spp-ray-demo-{os.getpid()}")
    try:
        cluster.start_head(num_cpus=2)
        submit = ray_cli("job", "submit", f"--address={cluster.dashboard}", "--working-dir", ".", "--",
                         "python", "pipelines/spp_reflections.py", *args, "--output", str(out), env=cluster.env, timeout=900)
    finally:
        cluster.stop()
    assert submit.returncode == 0, submit.stdout[-5000:] + submit.stderr[-3000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", submit.stdout + submit.stderr)
    return DemoRun(out=out, args=args, plan=json.loads((out / "plan.json").read_text()), submit=submit)
