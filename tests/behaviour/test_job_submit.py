"""`ray job submit` of the pipeline against a local Ray head started here, with token auth."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.ray_cluster import LocalRayCluster, ray_cli, token_auth_env
from tests.behaviour.test_pipeline_e2e import check_output


@pytest.fixture
def ray_head(tmp_path):
    """A fresh single-node Ray head with token auth; its own token file and temp dir."""
    cluster = LocalRayCluster(token_auth_env(tmp_path), temp_root=Path("/tmp") / f"spp-ray-{os.getpid()}")
    try:
        cluster.start_head(num_cpus=2)
        yield cluster.env, cluster.dashboard
    finally:
        cluster.stop()


@pytest.mark.slow
def test_ray_job_submit_runs_pipeline(demo_run):
    """The suite's shared demo run went through `ray job submit` to a token-auth head
    (`tests.support.plan_then_submit`, which also asserts the job succeeded)."""
    assert re.search(r"Job 'raysubmit_\w+' succeeded", demo_run.submit.stdout + demo_run.submit.stderr)
    assert "[spp] pass 2a" in demo_run.submit.stdout  # the driver's own output, tailed by the CLI
    check_output(demo_run.out)


@pytest.mark.slow
def test_job_submit_without_token_is_refused(ray_head, tmp_path):
    env, address = ray_head
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 32)
    proc = ray_cli("job", "list", f"--address={address}", env={**env, "RAY_AUTH_TOKEN_PATH": str(wrong)}, timeout=120)
    assert proc.returncode != 0
    listed = ray_cli("job", "list", f"--address={address}", env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
