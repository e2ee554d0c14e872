"""Progress, speed and time left of a run, for the person watching a multi-day job.

The driver feeds `Progress.update` the counts of each result row as it arrives. In a terminal
Ray Data's own progress bars show the stages; elsewhere (`ray job submit` logs, stdout not a
TTY) those bars are turned off and `Progress` logs one status line every `interval_s` seconds.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

# Speed and ETA come from the last few minutes, not the whole run: a multi-day job that slows
# down (a GPU node lost) should say so within minutes, and engine start-up stops weighing on it.
DEFAULT_WINDOW_S = 300.0


def _log_flushed(line: str) -> None:
    print(line, flush=True)


def format_duration(seconds: float) -> str:
    """`41s`, `4m41s`, `3h04m`, `2d05h`: two units at most, for a status line."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


@dataclass(frozen=True)
class _Sample:
    at: float
    documents: int
    generated_tokens: int


class Progress:
    """Counts of a pass so far and the status line they make.

    `clock` is injectable so tests can drive time; `interactive=None` asks `sys.stdout.isatty()`.
    As a context manager it also logs between result rows (a heartbeat thread), since one row
    can stand for minutes of work, and logs the final line on exit.
    """

    def __init__(
        self,
        *,
        total_documents: int | None,
        interval_s: float,
        interactive: bool | None = None,
        log: Callable[[str], None] = _log_flushed,
        label: str = "pass 2",
        clock: Callable[[], float] = time.monotonic,
        window_s: float = DEFAULT_WINDOW_S,
        expected_docs_per_s: float | None = None,
        metrics=None,
    ):
        self.total_documents = total_documents
        self.interval_s = interval_s
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self.label = label
        self.window_s = window_s
        # The cost plan's rate (`--plan`): the ETA before the first documents are done.
        self.expected_docs_per_s = expected_docs_per_s
        self._log = log
        self._clock = clock
        self.started = clock()
        self._last_logged = self.started
        self.documents = 0
        self.selected = 0
        self.generated_tokens = 0
        self.failures = 0
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.batches_retried = 0
        # `core.metrics.RunMetrics` (or None): the same counts as live Ray metrics.
        self.metrics = metrics
        self._samples: deque[_Sample] = deque([_Sample(self.started, 0, 0)])
        self.closed = False
        self._final_line = ""
        # update() runs on the driver's thread, maybe_log() also on the heartbeat's.
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> "Progress":
        self.publish()
        if not self.interactive or self.metrics is not None:   # status lines off a terminal; metrics in every mode
            self._heartbeat = threading.Thread(target=self._beat, name="spp-progress", daemon=True)
            self._heartbeat.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.interval_s)):
            self.maybe_log()
            self.publish()

    def configure_ray_data(self) -> None:
        """Ray Data's bars in a terminal; off otherwise, where Ray would log a multi-line
        block every 10 s that buries the status lines."""
        from annotator.core.ray_adapter import configure_ray_data_console

        configure_ray_data_console(interactive=self.interactive)


    def update(self, *, documents: int, selected: int = 0, generated_tokens: int = 0, failures: int = 0, prompt_tokens: int = 0,
               cached_prompt_tokens: int = 0, batches_retried: int = 0) -> None:
        """Add the counts of one result row (a written shard); logs when a status line is due."""
        with self._lock:
            self.documents += documents
            self.selected += selected
            self.generated_tokens += generated_tokens
            self.failures += failures
            self.prompt_tokens += prompt_tokens
            self.cached_prompt_tokens += cached_prompt_tokens
            self.batches_retried += batches_retried
            now = self._clock()
            self._samples.append(_Sample(now, self.documents, self.generated_tokens))
            # Keep one sample at or before the window's start so the rate always spans the window.
            while len(self._samples) > 2 and self._samples[1].at <= now - self.window_s:
                self._samples.popleft()
        self.maybe_log()
        self.publish()

    def publish(self) -> None:
        """The counts so far as live metrics (`core.metrics`), when this pass has them."""
        if self.metrics is None:
            return
        with self._lock:
            now = self._clock()
            docs_per_s, _ = self.rates(now)
            values = {
                "spp_documents_total": self.total_documents, "spp_documents_in": self.documents,
                "spp_documents_out": self.documents - self.failures, "spp_documents_rejected": self.failures,
                "spp_generated_tokens": self.generated_tokens, "spp_prompt_tokens": self.prompt_tokens,
                "spp_cached_prompt_tokens": self.cached_prompt_tokens,
                "spp_prefix_cache_hit_rate": self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else None,
                "spp_batches_retried": self.batches_retried, "spp_documents_per_second": docs_per_s,
                "spp_eta_seconds": 0.0 if self.closed else self.eta_seconds(now),
            }
        self.metrics.publish(values)

    def rates(self, now: float | None = None) -> tuple[float, float]:
        """(documents/s, generated tokens/s) over the recent window."""
        now = self._clock() if now is None else now
        first = self._samples[0]
        elapsed = now - first.at
        if elapsed <= 0:
            return 0.0, 0.0
        return (self.documents - first.documents) / elapsed, (self.generated_tokens - first.generated_tokens) / elapsed

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Seconds left at the recent rate (before any document: at the plan's rate, if there is
        one); None without a total or a rate."""
        if self.total_documents is None:
            return None
        remaining = max(0, self.total_documents - self.documents)
        if remaining == 0:
            return 0.0
        docs_per_s, _ = self.rates(now)
        if not (docs_per_s > 0 and self.documents) and self.expected_docs_per_s:
            docs_per_s = self.expected_docs_per_s
        return remaining / docs_per_s if docs_per_s > 0 else None

    def status_line(self, now: float | None = None) -> str:
        with self._lock:
            return self._status_line(self._clock() if now is None else now)

    def _status_line(self, now: float) -> str:
        docs_per_s, tokens_per_s = self.rates(now)
        if self.total_documents:
            done = f"{self.documents:,}/{self.total_documents:,} docs ({100 * self.documents / self.total_documents:.1f}%)"
        else:
            done = f"{self.documents:,} docs"
        share = f"{100 * self.selected / self.documents:.1f}%" if self.documents else "-"
        if self.closed:
            tail = f"done in {format_duration(now - self.started)}"
        else:
            # Elapsed time too: job logs carry no timestamps, and lines between rows look alike.
            eta = self.eta_seconds(now)
            tail = f"elapsed {format_duration(now - self.started)}  ETA {format_duration(eta) if eta is not None else '?'}"
        return (
            f"[spp] {self.label}  {done}  {docs_per_s:,.1f} docs/s  {tokens_per_s:,.0f} gen tok/s  "
            f"selected {share}  failed {self.failures:,}  {tail}"
        )

    def maybe_log(self) -> bool:
        """Log a status line if this is a non-interactive run and `interval_s` has passed."""
        with self._lock:
            now = self._clock()
            if self.interactive or self.closed or now - self._last_logged < self.interval_s:
                return False
            self._last_logged = now
            line = self._status_line(now)
        self._log(line)
        return True

    def close(self) -> str:
        """The final line (rates over the whole pass), logged in every mode, also returned."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        with self._lock:
            if self.closed:
                return self._final_line
            now = self._clock()
            self.closed = True
            self._samples = deque([_Sample(self.started, 0, 0)])
            line = self._final_line = self._status_line(now)
        self._log(line)
        self.publish()
        return line


def _parquet_files(path: str) -> tuple[object, list[str]]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if any(ch in root for ch in "*?["):
        files = sorted(fs.glob(root))
    elif fs.isdir(root):
        # As a directory read: Parquet files below it, not markers like _SUCCESS or .crc.
        files = sorted(f for f in fs.find(root) if f.endswith(".parquet") and not f.rsplit("/", 1)[-1].startswith(("_", ".")))
    else:
        files = [root]
    return fs, files


def count_input_documents(paths: list[str], *, limit: int | None = None, max_workers: int = 16) -> int:
    """Documents in the input: the sum of the Parquet footers' row counts; no page is read.
    Footers are fetched in parallel since on object stores each is a round trip."""
    import pyarrow.parquet as pq

    def rows(fs_and_file: tuple[object, str]) -> int:
        fs, f = fs_and_file
        # Small read-ahead blocks: remote filesystems otherwise fetch megabytes around the footer.
        with fs.open(f, "rb", block_size=1 << 16) as handle:
            return pq.ParquetFile(handle).metadata.num_rows

    jobs = [(fs, f) for p in paths for fs, files in [_parquet_files(p)] for f in files]
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(jobs)))) as pool:
        total = sum(pool.map(rows, jobs))
    return min(total, limit) if limit else total
