"""The status words every output row and saved batch uses, written once: `ok`, the reasons a row
got no text (`not_selected`, `not_applicable`, `not_requested`, `skip`), and `failed:<reason>`.
"""

from __future__ import annotations

OK = "ok"
SKIP = "skip"
NOT_SELECTED = "not_selected"
NOT_APPLICABLE = "not_applicable"
NOT_REQUESTED = "not_requested"
FAILED_PREFIX = "failed:"


def failed(reason: str) -> str:
    """The status of an item that failed for `reason`."""
    return f"{FAILED_PREFIX}{reason}"


def is_failed(status: str | None) -> bool:
    return bool(status) and status.startswith("failed")


def failure_reason(status: str) -> str:
    """`reason` of `failed:<reason>` (the status itself when it is no failure)."""
    return status.removeprefix(FAILED_PREFIX)
