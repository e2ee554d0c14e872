"""`ray job submit` of the pipeline against a local Ray head started here, with token auth."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from annotator.models import cache_dir
from tests.support import CORPUS, REPO, require_shared_data
from tests.test_pipeline_e2e import E2E_ARGS, check_output

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture
def ray_head(tmp_path):
    """A fresh single-node Ray head with token auth; its own token file and temp dir."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        # Workers see the same model cache as the test process.
        "SPP_CACHE": str(cache_dir()),
    }
    env.pop("RAY_ADDRESS", None)
    # `--generate` writes ~/.ray/auth_token; a scratch HOME keeps the user's own token untouched.
    token = _ray("get-auth-token", "--generate", env={**env, "HOME": str(tmp_path)}, timeout=60)
    assert token.returncode == 0, token.stderr
    token_file = tmp_path / ".ray" / "auth_token"
    assert token_file.read_text().strip()
    env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    dash = _free_port()
    tmp_ray = Path("/tmp") / f"spp-ray-{os.getpid()}"
    started = _ray(
        "start", "--head", "--num-cpus=2", f"--port={_free_port()}", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}", "--include-dashboard=true", f"--temp-dir={tmp_ray}", "--disable-usage-stats",
        env=env,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        _ray("stop", "--force", env=env, timeout=120)
        shutil.rmtree(tmp_ray, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_runs_pipeline(ray_head, tmp_path):
    require_shared_data()
    env, address = ray_head
    out = tmp_path / "out"
    # The job runs from an uploaded copy of the repo, so data and output paths are absolute.
    proc = _ray(
        "job", "submit", f"--address={address}", "--working-dir", ".", "--",
        "python", "pipelines/spp_reflections.py", "--config", "configs/demo.yaml",
        "--set", f"input.paths=['{CORPUS}/*.parquet']", "--output", str(out), *E2E_ARGS,
        env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", proc.stdout + proc.stderr)
    check_output(out)


@pytest.mark.slow
def test_job_submit_without_token_is_refused(ray_head, tmp_path):
    env, address = ray_head
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 32)
    proc = _ray("job", "list", f"--address={address}", env={**env, "RAY_AUTH_TOKEN_PATH": str(wrong)}, timeout=120)
    assert proc.returncode != 0
    listed = _ray("job", "list", f"--address={address}", env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
