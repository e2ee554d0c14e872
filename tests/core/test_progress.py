"""Progress lines: formatting, rates over the recent window, ETA, when lines are logged, and
counting input documents from Parquet footers. Time comes from a fake clock."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotator.config import load_config
from annotator.core.progress import Progress, count_input_documents, format_duration
from tests.support import require_shared_data


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(total=100_000, *, interval=30.0, interactive=False, window=300.0):
    clock, lines = FakeClock(), []
    progress = Progress(total_documents=total, interval_s=interval, interactive=interactive, log=lines.append,
                        clock=clock, window_s=window)
    return progress, clock, lines


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (41.4, "41s"), (59.6, "1m00s"), (281, "4m41s"), (3600, "1h00m"), (3 * 3600 + 4 * 60 + 59, "3h04m"),
    (2 * 86400 + 5 * 3600, "2d05h"), (-3, "0s"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_status_line_has_every_figure():
    progress, clock, _ = make()
    clock.advance(40)
    progress.update(documents=12_345, selected=1_210, generated_tokens=49_360, failures=2)
    # 12,345 docs in 40 s; 87,655 left at 308.6 docs/s = 284 s.
    assert progress.status_line() == (
        "[spp] pass 2  12,345/100,000 docs (12.3%)  308.6 docs/s  1,234 gen tok/s  selected 9.8%  failed 2  elapsed 40s  ETA 4m44s"
    )


def test_unknown_total_and_no_documents_yet():
    progress, clock, _ = make(total=None)
    assert progress.status_line() == "[spp] pass 2  0 docs  0.0 docs/s  0 gen tok/s  selected -  failed 0  elapsed 0s  ETA ?"
    clock.advance(10)
    progress.update(documents=50)
    assert progress.status_line().startswith("[spp] pass 2  50 docs  5.0 docs/s")
    assert progress.eta_seconds() is None


def test_eta_is_remaining_over_rate_and_zero_when_done():
    progress, clock, _ = make(total=1_000)
    clock.advance(10)
    progress.update(documents=250)
    assert progress.rates() == (25.0, 0.0)
    assert progress.eta_seconds() == pytest.approx(30.0)
    progress.update(documents=750)
    assert progress.eta_seconds() == 0.0
    assert progress.status_line().endswith("ETA 0s")


def test_rate_follows_the_recent_window():
    """A job that slows down shows the new speed within one window, not a lifetime average."""
    progress, clock, _ = make(total=1_000_000, window=300)
    for _ in range(10):  # 100 docs/s for 1000 s
        clock.advance(100)
        progress.update(documents=10_000)
    for _ in range(6):  # then 10 docs/s for 600 s
        clock.advance(100)
        progress.update(documents=1_000)
    docs_per_s, _ = progress.rates()
    # The window keeps one sample at or before its start: 300 s of 10 docs/s.
    assert docs_per_s == pytest.approx(10.0)
    assert progress.eta_seconds() == pytest.approx((1_000_000 - 106_000) / 10.0)


def test_rate_decays_while_no_row_arrives():
    progress, clock, _ = make(total=1_000)
    clock.advance(10)
    progress.update(documents=100, generated_tokens=500)
    clock.advance(10)
    assert progress.rates() == (5.0, 25.0)


def test_logs_every_interval_in_non_interactive_runs():
    progress, clock, lines = make(interval=30)
    for _ in range(12):  # a row every 10 s for 120 s
        clock.advance(10)
        progress.update(documents=1_000, selected=100)
    assert len(lines) == 4  # at 30, 60, 90, 120 s
    assert lines[0].startswith("[spp] pass 2  3,000/100,000 docs (3.0%)  100.0 docs/s")
    assert "selected 10.0%" in lines[-1]


def test_interactive_runs_leave_the_terminal_to_ray_bars_until_close():
    progress, clock, lines = make(interactive=True)
    clock.advance(100)
    progress.update(documents=100_000, selected=5_000, generated_tokens=1_000_000)
    assert lines == []
    final = progress.close()
    assert lines == [final]
    assert final == (
        "[spp] pass 2  100,000/100,000 docs (100.0%)  1,000.0 docs/s  10,000 gen tok/s  selected 5.0%  failed 0  done in 1m40s"
    )
    assert progress.close() == final and len(lines) == 1


def test_close_reports_whole_pass_rate():
    progress, clock, lines = make(total=2_000, window=100)
    clock.advance(1_000)
    progress.update(documents=1_000)
    clock.advance(100)
    progress.update(documents=1_000)
    assert progress.rates()[0] == pytest.approx(10.0)  # the recent window
    assert "1.8 docs/s" in progress.close()  # 2,000 docs in 1,100 s
    assert progress.maybe_log() is False  # nothing after close


def test_interactive_defaults_to_stdout_isatty(monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert Progress(total_documents=1, interval_s=1, log=lambda _: None).interactive is False
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert Progress(total_documents=1, interval_s=1, log=lambda _: None).interactive is True


def test_heartbeat_logs_between_rows_with_the_real_clock():
    lines: list[str] = []
    with Progress(total_documents=10, interval_s=0.05, interactive=False, log=lines.append) as progress:
        progress.update(documents=1)
        time.sleep(1.3)  # no row arrives; the heartbeat (1 s tick at most) still logs
        assert lines and lines[-1].startswith("[spp] pass 2  1/10 docs (10.0%)")
    assert "done in" in lines[-1]


def test_progress_interval_is_a_config_field():
    base = {"input": {"paths": ["x"]}, "output": {"path": "o"}}
    assert load_config(base=base).ray.progress_interval_s == 30.0
    assert load_config(base=base, overrides=["ray.progress_interval_s=5"]).ray.progress_interval_s == 5.0


def test_count_input_documents_reads_footers(tmp_path):
    corpus = require_shared_data()
    files = sorted(corpus.glob("*.parquet"))
    expected = sum(pq.read_metadata(f).num_rows for f in files)
    assert count_input_documents([str(corpus / "*.parquet")]) == expected == 3_573
    assert count_input_documents([str(files[0]), str(files[1])]) == 2 * 1_191
    assert count_input_documents([str(corpus / "*.parquet")], limit=100) == 100
    # A directory as Ray reads it: Parquet files below it, markers ignored; also via a file:// URL.
    (tmp_path / "sub").mkdir()
    pq.write_table(pa.table({"text": ["a"] * 7}), tmp_path / "sub" / "a.parquet", row_group_size=3)
    pq.write_table(pa.table({"text": ["b"] * 5}), tmp_path / "b.parquet")
    (tmp_path / "_SUCCESS").write_text("")
    assert count_input_documents([str(tmp_path)]) == 12
    assert count_input_documents([f"file://{tmp_path}/*.parquet"]) == 5


def test_count_input_documents_does_not_read_pages(tmp_path):
    """Only the footer is read: a file whose data pages are garbage still counts."""
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": ["x" * 1000] * 2000}), path, compression="none", use_dictionary=False)
    raw = bytearray(path.read_bytes())
    assert len(raw) > 2_000_000
    raw[4:1_000_000] = bytes(1_000_000 - 4)  # data pages, far before the footer
    path.write_bytes(bytes(raw))
    with pytest.raises(Exception):
        pq.read_table(path)
    assert count_input_documents([str(path)]) == 2000


@pytest.mark.parametrize("interactive", [False, True])
def test_ray_data_bars_only_in_a_terminal(interactive):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.enable_progress_bars
    try:
        Progress(total_documents=None, interval_s=30, interactive=interactive, log=lambda _: None).configure_ray_data()
        assert ctx.enable_progress_bars is interactive
    finally:
        ctx.enable_progress_bars = before


def test_eta_starts_from_the_cost_plan_until_the_run_has_its_own_rate():
    now = [0.0]
    lines: list[str] = []
    p = Progress(total_documents=100, interval_s=10, interactive=False, log=lines.append, clock=lambda: now[0],
                 expected_docs_per_s=4.0)
    assert p.eta_seconds() == 25.0 and "ETA 25s" in p.status_line()
    now[0] = 10.0
    p.update(documents=10)  # 1 document/s measured: the run's own rate wins
    assert p.eta_seconds() == pytest.approx(90.0)
    unplanned = Progress(total_documents=100, interval_s=10, interactive=False, log=lines.append, clock=lambda: 0.0)
    assert unplanned.eta_seconds() is None and "ETA ?" in unplanned.status_line()
