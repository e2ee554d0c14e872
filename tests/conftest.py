"""Session hooks: the test process ends without interpreter teardown once pytest has reported.

The test process loads torch, tokenizers, pyarrow (with its jemalloc thread), `datasets` and
vLLM's Python side together. One CI run (2026-12-02) died with SIGSEGV after printing "207 passed":
the Ray drivers that two tests hosted here left gRPC and core-worker threads alive until exit.
Those tests now run their driver in a child process (`support.in_child_process`); this hook makes
the rest of native teardown unable to turn a reported result into a different exit status. Every
result is decided and printed by then; pipelines under test run in their own processes and their
exit codes are asserted by the tests.
"""

from __future__ import annotations

import os
import sys

import pytest

EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if EXIT_STATUS not in config.stash or os.environ.get("SPP_TEST_FULL_TEARDOWN"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash[EXIT_STATUS])
