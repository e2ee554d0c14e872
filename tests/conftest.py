"""Session hooks: seconds per test file at the end of the report, and the test process ending
without interpreter teardown once pytest has reported.

The test process loads torch, transformers, tokenizers, fastText, pyarrow (with its jemalloc
thread), `datasets` and Ray's client together. One CI run (2026-12-02) died with SIGSEGV after
printing "207 passed": the Ray drivers that two tests hosted here left gRPC and core-worker threads
alive until exit. Those tests now run their driver in a child process (`support.in_child_process`);
this hook makes the rest of native teardown unable to turn a reported result into a different exit
status. Every result is decided and printed by then; pipelines under test run in their own
processes and their exit codes are asserted by the tests. Only a pytest that owns its process (the
`pytest` / `python -m pytest` command line) exits early; `pytest.main()` called from a program
returns to it as usual.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict

import pytest

EXIT_STATUS = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter) -> None:
    """Seconds per test file (setup, call and teardown of its tests), slowest first: where the
    suite's time goes, file by file."""
    per_file: dict[str, float] = defaultdict(float)
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) in ("setup", "call", "teardown"):
                per_file[report.nodeid.split("::")[0]] += report.duration
    if per_file:
        terminalreporter.write_sep("=", f"seconds per test file (total {sum(per_file.values()):.0f}s)")
        for path, seconds in sorted(per_file.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{seconds:8.1f}s  {path}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    owns_process = config.invocation_params.args == tuple(sys.argv[1:])
    if EXIT_STATUS not in config.stash or not owns_process or os.environ.get("SPP_TEST_FULL_TEARDOWN"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash[EXIT_STATUS])


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo config on 100 real documents: `--plan`, then the run through `ray job submit`
    (`tests.support.plan_then_submit`). Shared read-only: a test that writes into a run copies it."""
    from tests.support import plan_then_submit

    return plan_then_submit(tmp_path_factory.mktemp("demo-run"))
