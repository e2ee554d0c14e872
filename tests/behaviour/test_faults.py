"""Faults: a job-level failure (a replica that cannot start) exits non-zero and says why; the
watchdog that declares a hung engine call is tested with the engine (`tests/engine`)."""

from __future__ import annotations

import pytest

from tests.support import require_shared_data, run_pipeline


@pytest.mark.slow
def test_a_replica_that_cannot_start_fails_the_job_with_a_reason(tmp_path):
    require_shared_data()
    proc = run_pipeline("--config", "configs/demo.yaml", "--limit", "40", "--output", str(tmp_path / "out"),
                        "--set", "selection.mode=random_fraction", "--set", "selection.fraction=0.2",
                        "--set", f"generation.model={tmp_path / 'no-such-model'}", "--set", "generation.max_replica_restarts=0",
                        timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: the run failed" in proc.stderr and "no-such-model" in proc.stderr
    assert "rerun the same command to resume" in proc.stderr
    assert (tmp_path / "out" / "_work" / "selection.json").exists()  # scoring finished and is kept for the rerun
