"""Exactly-once resume: one real run is SIGKILLed during scoring, during generation (after one of
its vLLM replicas was killed and replaced) and during writing; rerunning the same command each
time ends with the output of an uninterrupted run: the suite's demo run (`demo_run`: 120 real
documents as 12 units of 10, generation in batches of 3)."""

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

from tests.support import DEMO_DOCS, DEMO_UNITS, REPO

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
    kill_process_when(start(args, out, log), out, log, condition)


def kill_process_when(proc: subprocess.Popen, out: Path, log: Path, condition) -> None:
    """SIGKILL a started driver (`log`: its output) the moment `condition(out)` holds, then the
    local Ray cluster it started."""
    import psutil

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
    """Every output file's content: text shard and sidecar rows in file order, the bytes of every
    token stream, mask and token-length file, and the training metadata."""
    files = {}
    for p in sorted((out / "shards").glob("*.parquet")):
        files[p.name] = pq.read_table(p).to_pylist()
    for p in sorted((out / "tokenized").rglob("*")):
        name = str(p.relative_to(out))
        if p.suffix in (".bin", ".idx", ".npy"):
            files[name] = p.read_bytes()
        elif p.suffix == ".parquet":
            files[name] = pq.read_table(p).to_pylist()
        elif p.name == "metadata.json":
            files[name] = json.loads(p.read_text())
    assert any(k.startswith("tokenized/reflection-1p/") for k in files) and any(k.startswith("tokenized/compact/") for k in files)
    return files


# Keys of stats.json that measure this run's clock or say where it ran, not what it wrote.
_RUN_SPECIFIC = {"plan", "wall_seconds", "documents_per_second", "this_run", "stage_seconds", "generation_throughput", "config",
                 "timeline", "finished_at", "throughput", "accelerator_hours", "wall_time", "stage_throughput"}


def content_stats(out: Path) -> dict:
    """stats.json without what measures the clock or names a folder of the machine that ran."""
    stats = json.loads((out / "stats.json").read_text())
    for recipe in stats.get("recipes", {}).values():
        recipe.pop("generated_tokens_per_engine_second")  # the engine's speed, not what it wrote
    # Where the pack was read on the machine that ran (a `ray job submit` reads the uploaded copy);
    # the pack itself is named by its version (name@content hash).
    stats.get("prompts", {}).pop("prompt_pack_source", None)
    return {k: v for k, v in stats.items() if k not in _RUN_SPECIFIC}


def scored_units(out: Path) -> int:
    return len([d for d in (out / "_work" / "scored").glob("*") if any(d.glob("*.parquet"))])


def generated_batches(out: Path) -> dict[str, int]:
    """Saved generation batches: path -> modification time in ns (a rewritten file changes it)."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "_work" / "generated").glob("*/*.parquet")}


def manifests(out: Path) -> int:
    return len(list((out / "_work" / "done").glob("*.json")))


def selection_done(out: Path) -> bool:
    return (out / "_work" / "selection.json").exists()


def refused_while_held(proc: subprocess.Popen, args: list[str], out: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """While `proc` holds `out`, the same command with --overwrite (a resubmitted job); it must
    leave, touching nothing. Returns its result with `elapsed` seconds."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads((out / ".spp-lock.json").read_text())["pid"] == proc.pid:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    t0 = time.monotonic()
    second = subprocess.run([sys.executable, str(REPO / "pipelines" / "spp_reflections.py"), *args, "--output", str(out), "--overwrite"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    second.elapsed = time.monotonic() - t0
    return second


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


def kill_replica_then_driver(proc: subprocess.Popen, out: Path, log: Path) -> dict:
    """A resumed run (started: `proc`) in which every generation replica is SIGKILLed once a batch
    is saved; once a replacement replica has saved a batch of its own, the driver is SIGKILLed too."""
    killed: set[int] = set()
    seen = {"replaced": False, "batches_at_replica_kill": 0, "batches_at_replacement": 0}
    try:
        deadline = time.time() + 900
        while proc.poll() is None and time.time() < deadline:
            replicas = generation_replicas(proc.pid)
            batches = len(generated_batches(out))
            if not killed and replicas and batches:
                seen["batches_at_replica_kill"] = batches
                for r in replicas:
                    r.kill()  # the vLLM replica dies mid-run, with the batches it had in flight
                    killed.add(r.pid)
            if not seen["replaced"] and killed and any(r.pid not in killed for r in replicas):
                seen["replaced"], seen["batches_at_replacement"] = True, batches
            # A batch saved after the replacement started is the replacement's own.
            if seen["replaced"] and batches > seen["batches_at_replacement"]:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before the kill point:\n" + log.read_text()[-3000:]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the rest of its local Ray cluster, as on a lost node
        except ProcessLookupError:
            pass
        time.sleep(2)
    seen["killed_replicas"] = len(killed)
    return seen


@pytest.mark.slow
def test_killed_at_every_pass_and_a_killed_replica_give_the_uninterrupted_output(demo_run, tmp_path):
    """One output directory through four SIGKILLs: the driver during scoring; a generation replica
    (Ray replaces it) and then the driver during generation; the driver during writing. Each
    rerun of the same command resumes; the last one's output equals an uninterrupted run's."""
    out, args, uninterrupted = tmp_path / "out", demo_run.args, demo_run.out

    kill_when(args, out, tmp_path / "1-scoring.log", lambda o: scored_units(o) >= 1)
    assert not selection_done(out) and 1 <= scored_units(out) <= DEMO_UNITS

    proc = start(args, out, tmp_path / "2-generation.log")
    second = refused_while_held(proc, args, out, tmp_path)
    seen = kill_replica_then_driver(proc, out, tmp_path / "2-generation.log")
    assert "resuming" in (tmp_path / "2-generation.log").read_text()
    assert "taking over the lock" in (tmp_path / "2-generation.log").read_text()   # the killed driver's lock
    assert second.returncode == 2 and f"pid {proc.pid}" in second.stderr and "is in use by `spp_reflections.py (run)`" in second.stderr
    assert seen["killed_replicas"] >= 1, "no generation replica was found to kill"
    assert seen["replaced"], "Ray did not start a new replica after the kill"
    assert selection_done(out) and manifests(out) == 0
    saved = generated_batches(out)
    assert len(saved) > seen["batches_at_replacement"] >= seen["batches_at_replica_kill"] >= 1

    assert second.elapsed < 30, second.elapsed   # refused at once (before Ray starts), not after a wait
    kill_when(args, out, tmp_path / "3-writing.log", lambda o: manifests(o) >= 1)
    written = manifests(out)
    assert 1 <= written < DEMO_UNITS
    after = generated_batches(out)
    # Batches saved before the kill were reused as they were; the missing ones were generated.
    assert {k: after[k] for k in saved} == saved and len(after) > len(saved)

    log = run_to_end(args, out, tmp_path / "4-finish.log")
    assert "resuming" in log
    this_run = json.loads((out / "stats.json").read_text())["this_run"]
    print(f"\nlast resumed run: {this_run}")
    assert this_run["resumed"] is True and this_run["units_done_before"] == written
    assert this_run["generations_made"] == 0 and this_run["documents_scored"] == 0
    assert not (out / "_work" / "generated").exists()  # work files go once the run is complete (keep_work off)

    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents_out"] == DEMO_DOCS
    assert sum(v for k, v in stats["reflection_status"].items() if k == "ok" or k.startswith("failed")) == stats["selected_documents"]
    assert shard_contents(out) == shard_contents(uninterrupted)
    assert content_stats(out) == content_stats(uninterrupted)
    rows = pq.read_table(out / "shards").to_pylist()
    assert len(rows) == len({r["doc_id"] for r in rows}) == DEMO_DOCS


@pytest.mark.slow
def test_a_method_file_edited_between_a_kill_and_the_resume_is_refused(tmp_path):
    """The fingerprint is the method: the pack of a recipe other than the first, and the canaries
    file, edited between a SIGKILL and the rerun, refuse the resume with the difference; put back,
    the same command resumes. (Scoring only: the comparison is made before anything runs.)"""
    import shutil

    from annotator.method.prompt_packs import resolve_pack_path
    from tests.support import demo_corpus

    summary = shutil.copytree(resolve_pack_path("summary-v1"), tmp_path / "summary-pack")
    canaries = shutil.copyfile(REPO / "configs" / "canaries.yaml", tmp_path / "canaries.yaml")
    corpus = demo_corpus(tmp_path / "corpus")
    args = ["--config", "configs/demo.yaml", "--set", f"input.paths=['{corpus}/*.parquet']", "--set", "input.rows_per_unit=10",
            "--set", "input.limit=null", "--set", "classifier.batch_size=10", "--set", "generation.enabled=false",
            "--set", "generation.recipes=[reflection, summary]", "--set", f"generation.packs={{summary: '{summary}'}}",
            "--set", f"generation.canaries.file='{canaries}'", "--set", "output.overwrite=false"]
    out = tmp_path / "out"
    kill_when(args, out, tmp_path / "1.log", lambda o: scored_units(o) >= 1)
    system = summary / "system.md"
    original = system.read_text()
    system.write_text(original + "\nAlso mention the weather.\n")
    refused = subprocess.run([sys.executable, str(REPO / "pipelines" / "spp_reflections.py"), *args, "--output", str(out)],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "files.prompt_versions.summary: 'summary-v1@" in refused.stderr, refused.stderr[-2000:]
    system.write_text(original)
    canaries.write_text(canaries.read_text().replace("Wren", "Robin"))
    refused = subprocess.run([sys.executable, str(REPO / "pipelines" / "spp_reflections.py"), *args, "--output", str(out)],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "files.canary_file:" in refused.stderr, refused.stderr[-2000:]
    canaries.write_text(canaries.read_text().replace("Robin", "Wren"))
    assert 1 <= scored_units(out) < DEMO_UNITS and not selection_done(out)   # the refused reruns touched nothing
    log = run_to_end(args, out, tmp_path / "2.log")
    assert "resuming" in log and json.loads((out / "stats.json").read_text())["documents_out"] == DEMO_DOCS


def kill_replicas_once(proc: subprocess.Popen, out: Path, log: Path) -> dict:
    """A run (started: `proc`) whose generation replicas are all SIGKILLed once a batch is saved,
    then left to finish: the bytes of the batches saved at the kill, and whether Ray replaced the
    replicas."""
    killed: set[int] = set()
    seen: dict = {"replaced": False, "saved": {}}
    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline:
        replicas = generation_replicas(proc.pid)
        if not killed and replicas and generated_batches(out):
            for r in replicas:
                r.kill()  # the vLLM replica dies mid-run, with the batches it had in flight
                killed.add(r.pid)
            seen["saved"] = {name: (out / name).read_bytes() for name in generated_batches(out)}
        if killed and any(r.pid not in killed for r in replicas):
            seen["replaced"] = True
        time.sleep(0.02)
    assert proc.wait(timeout=60) == 0, log.read_text()[-5000:]
    seen["killed_replicas"] = len(killed)
    return seen
