"""The status words (`core/statuses.py`): one spelling of `ok` and `failed:<reason>`, read back."""

from __future__ import annotations

from annotator.core.statuses import NOT_SELECTED, OK, SKIP, failed, failure_reason, is_failed


def test_failures_are_spelled_and_read_back_one_way():
    assert failed("too_long") == "failed:too_long"
    assert failed("request_error:Timeout") == "failed:request_error:Timeout"
    assert failure_reason(failed("request_error:Timeout")) == "request_error:Timeout"
    assert [is_failed(s) for s in (failed("x"), OK, SKIP, NOT_SELECTED, None, "")] == [True, False, False, False, False, False]
    assert failure_reason(OK) == "ok"
