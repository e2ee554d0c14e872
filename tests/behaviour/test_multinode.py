"""The pipeline as a `ray job submit` job on a two-node Ray cluster: a head and a worker, each
its own `ray start` on this machine with its own resources and ports, with token auth.
Ray's state API then shows which node ran each task of the job; both must have run some."""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.ray_cluster import LocalRayCluster, ray_cli, token_auth_env
from tests.support import CORPUS, read_input, require_shared_data

FILES, DOCS_PER_FILE = 4, 25
LIMIT = FILES * DOCS_PER_FILE
# Small object stores: two nodes share this machine's memory and /dev/shm.
OBJECT_STORE = 512 * 2**20
# Tasks that run the pipeline's stages (`apply_stages`: map tasks, and calls into stage actors),
# as opposed to Ray Data's bookkeeping actors and internal shuffles.
STAGE_TASK = re.compile(r"^(MapBatches|MapWorker)\(")


def small_corpus(dest: Path) -> Path:
    """100 real documents in 4 files: 4 input files are 4 units of work for the cluster to share
    (one file of the sample corpus is a single row group, one unit, one task)."""
    table = pq.read_table(sorted(CORPUS.glob("*.parquet"))[0]).slice(0, LIMIT)
    dest.mkdir()
    for i in range(FILES):
        pq.write_table(table.slice(i * DOCS_PER_FILE, DOCS_PER_FILE), dest / f"part-{i}.parquet")
    return dest


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """The cluster, shared by this module's tests. Its worker has a disk of its own at
    `cluster.node_local` (a private tmpfs in its own mount namespace): a path there is a different
    folder on each node, as a node-local disk is on two machines."""
    root = tmp_path_factory.mktemp("two-nodes")
    cluster = LocalRayCluster(token_auth_env(root), temp_root=Path("/tmp") / f"spp-ray2-{os.getpid()}")
    cluster.node_local = root / "node-local"
    try:
        cluster.start_head(num_cpus=2, resources={"head_node": 1}, object_store_bytes=OBJECT_STORE)
        cluster.add_worker(name="worker", num_cpus=2, resources={"worker_node": 1}, object_store_bytes=OBJECT_STORE,
                           node_local=cluster.node_local)
        yield cluster
    finally:
        cluster.stop()


def _node_ids(cluster: LocalRayCluster) -> dict[str, str]:
    """'head' / 'worker' -> node id, told apart by the custom resource each node was started with."""
    out = {}
    for node in cluster.list_state("nodes"):
        if node["state"] != "ALIVE":
            continue
        for role in ("head", "worker"):
            if f"{role}_node" in node["resources_total"]:
                out[role] = node["node_id"]
    return out


def _stage_tasks_by_node(cluster: LocalRayCluster, job_id: str, *, want: int) -> tuple[Counter, list[dict]]:
    """Finished pipeline-stage tasks of the job per node, and all its tasks. Task events reach
    the GCS in batches about once a second, so poll briefly until `want` nodes show up."""
    deadline = time.time() + 60
    while True:
        tasks = cluster.list_state("tasks", f"job_id={job_id}")
        per_node = Counter(t["node_id"] for t in tasks
                           if t.get("node_id") and t["state"] == "FINISHED" and STAGE_TASK.match(t["name"]))
        if len(per_node) >= want or time.time() > deadline:
            return per_node, tasks
        time.sleep(2)


@pytest.mark.slow
def test_pipeline_job_runs_on_both_nodes(two_nodes, tmp_path):
    require_shared_data()
    cluster = two_nodes
    nodes = _node_ids(cluster)
    assert set(nodes) == {"head", "worker"} and nodes["head"] != nodes["worker"], nodes

    corpus = small_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    # Generation off keeps the job quick; scoring, selection, splicing and writing all still run.
    # The job runs from an uploaded copy of the repo, so data and output paths are absolute.
    proc = ray_cli(
        "job", "submit", f"--address={cluster.dashboard}", "--working-dir", ".", "--",
        "python", "pipelines/spp_reflections.py", "--config", "configs/demo.yaml",
        "--set", f"input.paths=['{corpus}/*.parquet']", "--set", "input.limit=null", "--set", "generation.enabled=false",
        "--set", "output.rows_per_shard=30", "--set", "ray.progress_interval_s=1", "--output", str(out),
        env=cluster.env, timeout=900,
    )
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-6000:]
    submission = re.search(r"Job '(raysubmit_\w+)' succeeded", logs)
    assert submission, logs[-3000:]

    # Output content: every input document once, unchanged (no generation), shards on disk.
    source = read_input()
    stats = json.loads((out / "stats.json").read_text())
    rows = pq.read_table(out / "shards").to_pylist()
    assert len(rows) == LIMIT == stats["documents_in"] == stats["documents_out"]
    assert len({r["doc_id"] for r in rows}) == LIMIT and all(r["doc_id"] in source for r in rows)
    assert all(r["text"] == source[r["doc_id"]] for r in rows)
    assert {r["reflection_status"] for r in rows if r["selected"]} <= {"generation_disabled"}
    assert all(r["reflection_status"] == "not_selected" for r in rows if not r["selected"])
    assert stats["selected_documents"] == sum(r["selected"] for r in rows) >= 1
    shards = sorted((out / "shards").glob("*.parquet"))
    assert shards and [p.stem for p in shards] == sorted(stats["shards"])
    assert all(pq.ParquetFile(p).metadata.num_rows <= 30 for p in shards)
    # Non-interactive (job logs): one-line progress status, ending with each pass's final line.
    assert re.search(r"\[spp\] pass .* docs/s .* selected .* failed \d+  done in ", logs), logs[-3000:]

    # Both nodes proved they see the output before any work.
    assert "seen by all 2 nodes of the cluster" in logs

    # Work landed on both nodes: the job's tasks (Ray Data map tasks and actor calls), by node.
    jobs = [j for j in cluster.list_state("jobs") if j.get("submission_id") == submission.group(1)]
    assert len(jobs) == 1 and jobs[0]["job_id"], jobs
    per_node, tasks = _stage_tasks_by_node(cluster, jobs[0]["job_id"], want=2)
    role = {node_id: name for name, node_id in nodes.items()}
    ran = sorted(Counter((str(role.get(t.get("node_id"))), t["name"]) for t in tasks if STAGE_TASK.match(t["name"])).items())
    assert set(per_node) == {nodes["head"], nodes["worker"]}, ran
    print(f"pipeline stage tasks per node: head {per_node[nodes['head']]}, worker {per_node[nodes['worker']]}; {ran}")


@pytest.mark.slow
def test_a_node_that_cannot_see_the_output_is_refused_before_any_work(two_nodes, tmp_path):
    """The output on a path that is the worker's own disk: the driver (on the head) never sees
    the worker's probe, and the run stops naming the worker before scoring anything."""
    cluster = two_nodes
    corpus = small_corpus(tmp_path / "corpus")
    out = cluster.node_local / "out"
    proc = ray_cli(
        "job", "submit", f"--address={cluster.dashboard}", "--working-dir", ".", "--",
        "python", "pipelines/spp_reflections.py", "--config", "configs/demo.yaml",
        "--set", f"input.paths=['{corpus}/*.parquet']", "--set", "input.limit=null", "--set", "generation.enabled=false",
        "--output", str(out), env=cluster.env, timeout=600,
    )
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0 and re.search(r"Job 'raysubmit_\w+' failed", logs), logs[-4000:]
    worker = next(n for n in cluster.list_state("nodes") if "worker_node" in n["resources_total"])
    assert f"is not one location for the whole cluster: node {worker['node_ip']} ({worker['node_id'][:12]}) wrote its probe" in logs
    assert "pass 1" not in logs and not (out / "_work" / "scored").exists() and not (out / "shards").exists()
    assert not (out / "_work" / "nodes").exists() or not any((out / "_work" / "nodes").iterdir())   # the probes removed
