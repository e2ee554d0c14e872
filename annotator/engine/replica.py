"""The one replica stage: an actor that holds an engine and turns planned batches into saved ones.

Generation, SFT conversations and the audit's judge are tasks of this stage. Per planned batch
(one input row) the stage loads the task's engine once per actor, skips a batch an earlier
attempt already saved, lets the task produce the batch's table (retries of failed items are the
task's, seeded by `core.seeding.sampling_seed`), saves it atomically where the task's layout says,
and returns only counts, so generated text never travels back through the object store.
"""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

from annotator.config import GenerationConfig
from annotator.core import storage
from annotator.core.checkpoint import write_table
from annotator.core.stages import Resources, Stage, stage_state
from annotator.engine.stream import HOST

ENGINE_LOADS = "engine_loads"
# Batches this replica started although an earlier attempt of them had started (a lost replica's
# batches Ray hands to another, a resumed run's unfinished ones): told by a claim written at start,
# `.<batch file>.started`, hidden from the globs that find saved batches.
BATCHES_RETRIED = "batches_retried"
CLAIM_SUFFIX = ".started"


def claim_path(path):
    return path.with_name(f".{path.name}{CLAIM_SUFFIX}")


class ReplicaTask:
    """What a replica does with one planned batch. Subclasses set `name`, `reads` (the plan's
    columns), `keys` (plan columns echoed into the result row, with their types) and `counts`
    (the count columns `count` returns), and implement the methods below."""

    name: str = "task"
    reads: tuple[str, ...] = ()
    keys: dict[str, pa.DataType] = {}
    counts: tuple[str, ...] = ()

    __repr__ = Stage.__repr__  # settings only, no addresses (see `Stage.__repr__`)

    @property
    def loaded(self) -> bool:
        raise NotImplementedError

    def load(self, *, num_cpus: float) -> int:
        """Load the engine (and warm it); returns the engine loads this made (0 for an endpoint)."""
        raise NotImplementedError

    def needs_engine(self, plan: dict) -> bool:
        """Whether this batch calls the engine at all (an empty batch does not load it)."""
        return True

    def echo(self, plan: dict) -> dict:
        """The result row's key columns, from the plan."""
        return {k: plan[k] for k in self.keys}

    def batch_path(self, plan: dict) -> Path:
        raise NotImplementedError

    def run(self, plan: dict) -> pa.Table:
        raise NotImplementedError

    def save(self, table: pa.Table, path: Path) -> None:
        write_table(path, table)

    def count(self, table: pa.Table) -> dict[str, int]:
        raise NotImplementedError


def replica_resources(gen: GenerationConfig, *, num_cpus: float, num_gpus: float | None = None,
                      concurrency: int | None = None, max_in_flight: int | None = None) -> Resources:
    """An engine actor pool: one planned batch per call, `concurrency` replicas (default: the
    generation engine's), each holding its CPUs and GPUs; restarts bounded by the config. Unless
    `gen.reproducible`, a replica runs its batches in flight together (continuous batching)."""
    concurrent = 1 if max_in_flight is None else min(max_in_flight, gen.concurrent_batches)
    return Resources(num_cpus=num_cpus, num_gpus=gen.num_gpus if num_gpus is None else num_gpus,
                     concurrency=gen.concurrency if concurrency is None else concurrency, batch_size=1,
                     max_in_flight=max_in_flight, concurrent_calls=concurrent, max_restarts=gen.max_replica_restarts)


class ReplicaStage(Stage):
    """An engine replica running `task` on one planned batch per call (see the module docstring)."""

    stateful = True

    def __init__(self, task: ReplicaTask, *, resources: Resources):
        self.task = task
        self.name = task.name
        self.reads = task.reads
        self.adds = (*task.keys, *task.counts, ENGINE_LOADS, BATCHES_RETRIED)
        self.resources = resources

    @property
    def output_schema(self) -> pa.Schema:
        return pa.schema([*self.task.keys.items(), *[(c, pa.int64()) for c in (*self.task.counts, ENGINE_LOADS, BATCHES_RETRIED)]])

    def process(self, batch: pa.Table) -> pa.Table:
        """Each planned batch of the call; with `concurrent_calls` > 1 they run together (a call
        holds all batches of a unit), each in its own thread, at most `concurrent_calls` per
        replica across calls; host work takes turns (`stream.HOST`), engine work overlaps."""
        plans = batch.to_pylist()
        if self.resources.concurrent_calls > 1 and len(plans) > 1:
            with ThreadPoolExecutor(max_workers=len(plans), thread_name_prefix="batch") as pool:
                rows = list(pool.map(self._one, plans))
        else:
            rows = [self._one(plan) for plan in plans]
        return pa.Table.from_pylist(rows, schema=self.output_schema)

    def _one(self, plan: dict) -> dict:
        with batch_slots(self), HOST:
            keys = self.task.echo(plan)
            path = self.task.batch_path(plan)
            if path.exists():  # saved by an earlier attempt of this batch
                return {**keys, **dict.fromkeys(self.task.counts, 0), ENGINE_LOADS: 0, BATCHES_RETRIED: 0}
            retried = 0 if storage.create_exclusive(claim_path(path), b"") else 1
            loads = 0
            if not self.task.loaded and self.task.needs_engine(plan):
                loads = self.task.load(num_cpus=self.resources.num_cpus)
            table = self.task.run(plan)
            self.task.save(table, path)
            return {**keys, **self.task.count(table), ENGINE_LOADS: loads, BATCHES_RETRIED: retried}


_SLOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def batch_slots(stage: ReplicaStage) -> threading.BoundedSemaphore:
    """The replica's batches in flight: `concurrent_calls` at once, over all of its calls."""
    return stage_state(_SLOTS, stage, make=lambda: threading.BoundedSemaphore(stage.resources.concurrent_calls))
