"""Exactly-once resume: the driver is killed with SIGKILL during scoring, during generation and
during writing of a real run; rerunning the same command gives the output of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.support import REPO, require_shared_data

UNITS = 12
ROWS_PER_UNIT = 10


def resume_args(corpus: Path) -> list[str]:
    """120 real documents as 12 units of 10 (one row group each), generation in batches of 3,
    so each pass has many steps to be killed between."""
    return ["--config", "configs/demo.yaml", "--set", f"input.paths=['{corpus}/*.parquet']", "--set", "input.limit=null",
            "--set", f"input.rows_per_unit={ROWS_PER_UNIT}", "--set", f"classifier.batch_size={ROWS_PER_UNIT}", "--set", "generation.batch_size=3",
            "--set", "selection.matched_token_ratio=4", "--set", "output.rows_per_shard=7", "--set", "output.overwrite=false"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    src = sorted(require_shared_data().glob("*.parquet"))[0]
    out = tmp_path_factory.mktemp("resume-corpus")
    pq.write_table(pq.read_table(src).slice(0, UNITS * ROWS_PER_UNIT), out / "web.parquet", row_group_size=ROWS_PER_UNIT)
    return out


def start(args: list[str], out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "pipelines" / "spp_reflections.py"), *args, "--output", str(out)],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def run_to_end(args: list[str], out: Path, log: Path) -> str:
    proc = start(args, out, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-5000:]
    return log.read_text()


def kill_when(args: list[str], out: Path, log: Path, condition) -> None:
    """Start a run and SIGKILL its driver the moment `condition(out)` holds."""
    import psutil

    proc = start(args, out, log)
    deadline = time.time() + 900
    cluster: list = []
    try:
        while proc.poll() is None and time.time() < deadline:
            if condition(out):
                cluster = psutil.Process(proc.pid).children(recursive=True)
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before the kill point:\n" + log.read_text()[-3000:]
    finally:
        # The local Ray cluster the driver started goes down with it (as on a preempted node):
        # workers still finishing a task may write their (atomic) outputs until they are gone.
        for p in cluster:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(cluster, timeout=30)


def shard_contents(out: Path) -> dict:
    """Every output file's bytes-level content: shard rows in file order, token shard bytes."""
    files = {}
    for p in sorted((out / "shards").glob("*.parquet")):
        files[p.name] = pq.read_table(p).to_pylist()
    for p in sorted((out / "tokenized").glob("*")):
        if p.suffix in (".bin", ".idx"):
            files[p.name] = p.read_bytes()
    return files


# Keys of stats.json that measure this run's clock or say where it ran, not what it wrote.
_RUN_SPECIFIC = {"wall_seconds", "documents_per_second", "this_run", "stage_seconds", "generation_throughput", "config",
                 "timeline", "finished_at", "throughput", "accelerator_hours", "wall_time", "stage_throughput"}


def content_stats(out: Path) -> dict:
    stats = json.loads((out / "stats.json").read_text())
    return {k: v for k, v in stats.items() if k not in _RUN_SPECIFIC}


def scored_units(out: Path) -> int:
    return len([d for d in (out / "_work" / "scored").glob("*") if any(d.glob("*.parquet"))])


POINTS = {
    # first unit scored; the kill lands before pass 1 finishes
    "scoring": lambda out: scored_units(out) >= 1,
    # first generated batch saved
    "generation": lambda out: any((out / "_work" / "generated").glob("*/*.parquet")),
    # first unit's shards and manifest written
    "writing": lambda out: any((out / "_work" / "done").glob("*.json")),
}


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "whole"
    run_to_end(resume_args(corpus), out, out.parent / "whole.log")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("point", list(POINTS))
def test_resume_after_sigkill_matches_uninterrupted_run(point, corpus, uninterrupted, tmp_path):
    out = tmp_path / "out"
    args = resume_args(corpus)
    kill_when(args, out, tmp_path / "killed.log", POINTS[point])
    # The kill landed inside the named pass.
    selection_done = (out / "_work" / "selection.json").exists()
    manifests = len(list((out / "_work" / "done").glob("*.json")))
    if point == "scoring":
        assert not selection_done and 1 <= scored_units(out) <= UNITS
    elif point == "generation":
        assert selection_done and manifests == 0
    else:
        assert 1 <= manifests < UNITS
    log = run_to_end(args, out, tmp_path / "resumed.log")
    this_run = json.loads((out / "stats.json").read_text())["this_run"]
    print(f"\n[{point}] resumed run: {this_run}")
    assert this_run["resumed"] is True
    if point == "writing":
        assert this_run["units_done_before"] == manifests and this_run["generations_made"] == 0
    if point == "generation":
        # some batches were saved before the kill and are reused; the rest are generated now
        assert this_run["generations_reused"] >= 1 and this_run["generations_made"] >= 1 and this_run["documents_scored"] == 0
    assert "resuming" in log

    assert shard_contents(out) == shard_contents(uninterrupted)
    assert content_stats(out) == content_stats(uninterrupted)
    rows = pq.read_table(out / "shards").to_pylist()
    assert len(rows) == len({r["doc_id"] for r in rows}) == UNITS * ROWS_PER_UNIT


def generation_replicas(driver_pid: int) -> list:
    import psutil

    try:
        procs = psutil.Process(driver_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in procs:
        try:
            if "MapWorker(MapBatches(_StageActor))" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.mark.slow
def test_killed_generation_replica_is_replaced_and_nothing_is_lost(corpus, uninterrupted, tmp_path):
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    proc = start(resume_args(corpus), out, log)
    killed: set[int] = set()
    replaced = False
    try:
        while proc.poll() is None:
            replicas = generation_replicas(proc.pid)
            if not killed and replicas and any((out / "_work" / "generated").glob("*/*.parquet")):
                for p in replicas:
                    p.kill()  # SIGKILL: the vLLM replica dies mid-run, batches in flight with it
                    killed.add(p.pid)
            replaced = replaced or any(p.pid not in killed for p in replicas) and bool(killed)
            time.sleep(0.05)
        assert proc.wait(timeout=900) == 0, log.read_text()[-5000:]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert killed, "no generation replica was found to kill"
    assert replaced, "Ray did not start a new replica after the kill"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents_out"] == UNITS * ROWS_PER_UNIT and stats["reflection_status"].get("ok") == stats["selected_documents"]
    assert shard_contents(out) == shard_contents(uninterrupted)
    assert content_stats(out) == content_stats(uninterrupted)
