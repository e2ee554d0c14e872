"""The stage contract: a stage loads heavy state once in `setup()` and maps a `pyarrow.Table`
batch to a batch. It declares the columns it reads and adds; `check_chain` verifies a pipeline
before any model loads. `core.ray_adapter` turns stages into Ray Data calls.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import Iterable

import pyarrow as pa

TIMING_PREFIX = "_seconds_"


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs. `concurrency` > 0 with state means an actor pool."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    concurrency: int = 1
    batch_size: int | None = 1024
    max_in_flight: int | None = None
    # Calls an actor runs at the same time, each in its own thread (a replica feeding one engine
    # from several batches); 1: one call after another.
    concurrent_calls: int = 1
    # Actor restarts before the stage fails the job (Ray Data's default, -1, retries forever,
    # which turns an engine that always crashes into a job that never ends).
    max_restarts: int | None = None


class Stage:
    """Base class: subclasses set `name`, `reads`, `adds`, and implement `process`."""

    name: str = "stage"
    reads: tuple[str, ...] = ()
    adds: tuple[str, ...] = ()
    stateful: bool = False
    resources: Resources = Resources()

    def setup(self) -> None:
        """Load heavy state (models, tokenizers). Called once per worker."""

    def process(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError

    def __repr__(self) -> str:
        # Stable across pickled copies (no addresses): `setup_key` tells workers' cached setups
        # apart by it, also for stages holding stages (`InProcess`).
        public = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()) if not k.startswith("_"))
        return f"{type(self).__qualname__}({public})"


class UnitStage(Stage):
    """The per-unit stage contract: each input row names one work unit (`unit`, decoded by
    `units.units_in`); `process_unit` turns one unit (and its input row) into output rows, a table
    with `output_schema`. Reading a unit, summarizing it, planning its engine batches and
    finalizing it are all this shape; the rows they emit are small (counts, plans, manifests)."""

    reads = ("unit",)
    output_schema: pa.Schema = pa.schema([])

    def process_unit(self, unit, row: dict) -> pa.Table | list[dict]:
        raise NotImplementedError

    def process(self, batch: pa.Table) -> pa.Table:
        from annotator.core.units import units_in

        rows = batch.to_pylist()
        outs = []
        for unit, row in zip(units_in(batch), rows):
            out = self.process_unit(unit, row)
            outs.append(out if isinstance(out, pa.Table) else pa.Table.from_pylist(out, schema=self.output_schema))
        if not outs:
            return self.output_schema.empty_table()
        return pa.concat_tables(outs, promote_options="permissive") if len(outs) > 1 else outs[0]


class InProcess(Stage):
    """Stages run one after another in one worker on each input batch, each over its own batch
    size. For work units: one task reads a unit, counts its tokens, scores and writes it, so the
    documents never cross the object store, a worker holds one unit at a time, and every CPU runs
    the whole chain (no stage waits for another's output)."""

    def __init__(self, stages: list[Stage], *, resources: Resources):
        if any(stage.resources.num_gpus for stage in stages):
            raise PipelineError("InProcess runs CPU stages; a GPU stage needs its own actor pool")
        self.stages = list(stages)
        self.name = "+".join(stage.name for stage in stages)
        self.reads = stages[0].reads
        self.adds = tuple(dict.fromkeys(c for stage in stages for c in (*stage.adds, TIMING_PREFIX + stage.name)))
        self.stateful = any(stage.stateful for stage in stages)
        self.resources = resources
        check_chain(stages[1:], (*stages[0].reads, *stages[0].adds))

    def setup(self) -> None:
        for stage in self.stages:
            stage.setup()

    def process(self, batch: pa.Table) -> pa.Table:
        for stage in self.stages:
            size = stage.resources.batch_size
            if size is None or batch.num_rows <= size:
                batch = timed(stage, batch)
            else:
                batch = pa.concat_tables([timed(stage, batch.slice(start, size)) for start in range(0, batch.num_rows, size)])
        return batch


class PipelineError(ValueError):
    """A pipeline whose stages do not fit together."""


def check_chain(stages: Iterable[Stage], available: Iterable[str]) -> set[str]:
    """Fail fast when a stage reads a column no earlier stage (or the input) provides."""
    cols = set(available)
    for stage in stages:
        missing = [c for c in stage.reads if c not in cols]
        if missing:
            raise PipelineError(
                f"stage {stage.name!r} reads {missing} but only {sorted(c for c in cols if not c.startswith('_'))} exist at that point"
            )
        cols.update(stage.adds)
        cols.add(TIMING_PREFIX + stage.name)
    return cols


class BusyClock:
    """Seconds of a stage's calls that may overlap (a replica running batches together): each call
    is charged its share of the time, 1/n while n calls run, so the charges of all calls add up
    to the time the stage was busy, as they do for calls one after another."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running = 0
        self._shares = 0.0          # seconds per running call, accumulated since the start
        self._last = time.perf_counter()

    def _advance(self) -> float:
        now = time.perf_counter()
        if self._running:
            self._shares += (now - self._last) / self._running
        self._last = now
        return self._shares

    def start(self) -> float:
        with self._lock:
            mark = self._advance()
            self._running += 1
            return mark

    def stop(self, mark: float) -> float:
        with self._lock:
            charged = self._advance() - mark
            self._running -= 1
            return charged


_STATE_LOCK = threading.Lock()


def stage_state(registry: weakref.WeakKeyDictionary, stage: Stage, *, make):
    """A stage's process-local object in `registry` (made on first use, shared by the threads
    that call the stage, never pickled with it)."""
    with _STATE_LOCK:
        value = registry.get(stage)
        if value is None:
            value = registry[stage] = make()
        return value


_CLOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def busy_clock(stage: Stage) -> BusyClock:
    return stage_state(_CLOCKS, stage, make=BusyClock)


def timed(stage: Stage, batch: pa.Table) -> pa.Table:
    clock = busy_clock(stage)
    mark = clock.start()
    try:
        out = stage.process(batch)
    finally:
        seconds = clock.stop(mark)
    per_row = seconds / max(1, out.num_rows)
    col = TIMING_PREFIX + stage.name
    values = pa.array([per_row] * out.num_rows, pa.float64())
    if col in out.column_names:
        return out.set_column(out.column_names.index(col), col, values)
    return out.append_column(col, values)


def run_batch(stage: Stage, batch: pa.Table) -> pa.Table:
    out = timed(stage, batch)
    # Arrow's allocator (mimalloc) keeps freed memory for reuse: a worker that just held a whole
    # unit would otherwise stay that large while idle or running a small stage.
    pa.default_memory_pool().release_unused()
    _trim_malloc()
    return out


def _trim_malloc() -> None:
    """Hand the C heap's free pages back to the OS (glibc keeps them after a batch's Python
    strings are freed, which left finalize workers ~0.4 GiB larger while idle)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None
