"""Shared fixtures: the repo, the real sample corpus beside it, and pipeline runs."""

from __future__ import annotations

import os
import subprocess
import sys
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
