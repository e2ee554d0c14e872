"""cluster.yaml: valid for Ray's cluster launcher (its own JSON schema), a CPU head and an
autoscaling GPU worker group, the project installed with the `gpu` extra, token auth on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.support import REPO


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_matches_the_launchers_schema(cluster):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)


def test_cpu_head_and_autoscaling_gpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert not head["resources"].get("GPU") and head["resources"]["CPU"] >= 8
    gpu_groups = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_groups and cluster["head_node_type"] not in gpu_groups
    for name, group in gpu_groups.items():
        # Autoscaling: from none up to many, within the cluster-wide bound.
        assert 0 == group["min_workers"] < group["max_workers"] <= cluster["max_workers"], name
        assert group["node_config"]["InstanceType"]
    assert cluster["idle_timeout_minutes"] > 0


def test_setup_installs_the_project_with_the_gpu_extra(cluster):
    setup = cluster["setup_commands"]
    installs = [c for c in setup if re.search(r"pip install .*-e '/home/ubuntu/spp-annotator\[gpu\]'", c)]
    assert len(installs) == 1
    assert cluster["file_mounts"]["/home/ubuntu/spp-annotator"] == "."
    assert any("--python 3.11" in c for c in setup)
    # The extra it installs exists and carries vLLM.
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^gpu = \[.*"vllm"', pyproject, re.M)


def test_every_node_starts_ray_with_token_auth(cluster):
    assert "~/.ray/auth_token" in cluster["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster[key] if " ray start " in f" {c.replace('~/venv/bin/', '')} "]
        assert len(starts) == 1 and starts[0].startswith("RAY_AUTH_MODE=token "), key
        assert "~/venv/bin/ray" in starts[0]
    assert "--head" in cluster["head_start_ray_commands"][-1]
    assert "$RAY_HEAD_IP" in cluster["worker_start_ray_commands"][-1]
