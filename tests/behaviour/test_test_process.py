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
PLUGINS = ["-p", "tests.conftest", "-p", "no:cacheprovider"]


def run_python(tmp_path, verdict: bool, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python ARGS...` on a test file whose session leaves a crashing teardown; the caller's own
    SPP_TEST_FULL_TEARDOWN does not reach it."""
    test = tmp_path / f"test_teardown_{verdict}.py"
    test.write_text(CRASHING_TEARDOWN.replace("VERDICT", str(verdict)))
    base = {k: v for k, v in os.environ.items() if k != "SPP_TEST_FULL_TEARDOWN"}
    return subprocess.run([sys.executable, *args, str(test)], cwd=REPO, env={**base, **env}, capture_output=True,
                          text=True, timeout=120)


def test_exit_status_is_the_verdict_even_when_teardown_crashes(tmp_path):
    assert run_python(tmp_path, True, "-m", "pytest", "-q", *PLUGINS).returncode == 0
    assert run_python(tmp_path, False, "-m", "pytest", "-q", *PLUGINS).returncode == 1
    # Without the hook the same passing session dies at exit.
    assert run_python(tmp_path, True, "-m", "pytest", "-q", *PLUGINS, SPP_TEST_FULL_TEARDOWN="1").returncode == -11


def test_pytest_main_called_from_a_program_returns_to_it(tmp_path):
    program = f"import sys, pytest; code = pytest.main(['-q', *{PLUGINS!r}, sys.argv[1]]); print('returned', int(code))"
    proc = run_python(tmp_path, False, "-c", program)
    assert "returned 1" in proc.stdout  # the caller ran on; its own exit then meets the crashing atexit
