"""Faults: an engine call that hangs is detected; a job-level failure exits non-zero and says why."""

from __future__ import annotations

import threading
import time

import pytest

from annotator.engine.vllm_engine import EngineWatchdog
from tests.support import require_shared_data, run_pipeline


def test_watchdog_declares_a_hung_engine_call():
    fired = threading.Event()
    watchdog = EngineWatchdog(timeout_s=0.3, on_hang=fired.set)
    with watchdog:
        time.sleep(0.1)  # a call well inside the limit
    assert not fired.wait(0.6)
    with watchdog:
        assert fired.wait(3), "a call that outlives batch_timeout_s was not declared hung"


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
