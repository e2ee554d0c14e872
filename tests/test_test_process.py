"""The test process's exit status is pytest's verdict, whatever native teardown does afterwards
(`tests/conftest.py`)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import REPO

CRASHING_TEARDOWN = """
import atexit, ctypes

def test_leaves_a_teardown_that_crashes():
    atexit.register(lambda: ctypes.string_at(0))  # a NULL read at interpreter exit: SIGSEGV

def test_verdict():
    assert VERDICT
"""


def run_pytest(tmp_path, verdict: bool, **env: str) -> int:
    test = tmp_path / f"test_teardown_{verdict}.py"
    test.write_text(CRASHING_TEARDOWN.replace("VERDICT", str(verdict)))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider", str(test)],
                          cwd=REPO, env={**os.environ, **env}, capture_output=True, timeout=120).returncode


def test_exit_status_is_the_verdict_even_when_teardown_crashes(tmp_path):
    assert run_pytest(tmp_path, True) == 0
    assert run_pytest(tmp_path, False) == 1
    # Without the hook the same passing session dies at exit.
    assert run_pytest(tmp_path, True, SPP_TEST_FULL_TEARDOWN="1") == -11
