"""The pipeline's start-up decisions: what a CPU replica reserves, and reservations checked against
the cluster so a run that cannot be scheduled says so instead of waiting forever."""

from __future__ import annotations

import pytest

from annotator.config import load_config
from annotator.core.errors import ResourceError
from annotator.engine.resources import check_reservations, replica_cpus
from tests.support import REPO, run_pipeline

TWO_CPUS = {"CPU": 2.0, "memory": 1e10}
NODES = [{"Alive": True, "Resources": TWO_CPUS}]


def demo(*overrides):
    return load_config(REPO / "configs" / "demo.yaml", overrides=list(overrides))


def test_auto_gives_a_cpu_replica_the_cores_planning_leaves():
    assert replica_cpus(demo("generation.num_cpus=auto"), TWO_CPUS) == 1.75
    assert replica_cpus(demo("generation.num_cpus=auto", "generation.concurrency=2"), {"CPU": 16.0}) == pytest.approx(7.875)
    assert replica_cpus(demo("generation.num_cpus=auto", "generation.num_gpus=1"), {"CPU": 16.0, "GPU": 1}) == 1.0
    assert replica_cpus(demo("generation.num_cpus=3"), TWO_CPUS) == 3.0


def test_reservations_that_cannot_be_met_are_named():
    cfg = demo("generation.num_cpus=2")
    with pytest.raises(ResourceError, match=r"pass 2a \(generate\): 1 replicas x 2 CPUs \(generation\.num_cpus\) \+ 0\.25 for the "
                                            r"planning tasks = 2\.25 CPUs; the cluster has 2"):
        check_reservations(cfg, replica_cpus=2.0, cluster=TWO_CPUS, nodes=NODES)
    with pytest.raises(ResourceError, match=r"one replica asks 1 GPUs \(generation\.num_gpus\); the largest node has 0"):
        check_reservations(demo("generation.num_gpus=1"), replica_cpus=1.0, cluster=TWO_CPUS, nodes=NODES)
    with pytest.raises(ResourceError, match=r"pass 1 tasks ask 4 CPUs each \(classifier\.num_cpus\); the largest node has 2"):
        check_reservations(demo("classifier.num_cpus=4"), replica_cpus=1.0, cluster=TWO_CPUS, nodes=NODES)
    two_nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": True, "Resources": {"CPU": 2.0}}]
    with pytest.raises(ResourceError, match=r"one replica asks 3 CPUs .* the largest node has 2"):
        check_reservations(demo("generation.num_cpus=3"), replica_cpus=3.0, cluster={"CPU": 4.0}, nodes=two_nodes)
    check_reservations(demo("generation.num_cpus=auto"), replica_cpus=1.75, cluster=TWO_CPUS, nodes=NODES)
    check_reservations(demo("generation.num_gpus=8", "ray.autoscaling=true"), replica_cpus=1.0, cluster=TWO_CPUS, nodes=NODES)
    check_reservations(demo("generation.num_cpus=2", "generation.enabled=false"), replica_cpus=2.0, cluster=TWO_CPUS, nodes=NODES)


@pytest.mark.slow
def test_a_run_whose_replica_cannot_fit_stops_at_start(tmp_path):
    # Before: with generation.num_cpus=2 on a 2-CPU cluster the generation stage never started and
    # the run sat until killed. Now it stops before scoring, naming the stage and the numbers.
    proc = run_pipeline("--config", "configs/demo.yaml", "--limit", "20", "--output", str(tmp_path / "out"),
                        "--set", "generation.num_cpus=2", timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the cluster cannot run this config: pass 2a (generate): 1 replicas x 2 CPUs" in proc.stderr
    assert "the cluster has 2" in proc.stderr and not (tmp_path / "out").exists()
