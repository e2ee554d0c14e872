"""The one replica stage (`engine/replica.py`) with a small task of its own: the engine loads once
per actor and only for a batch that needs it, a saved batch is skipped, every batch is saved
atomically under the task's path, and only counts come back."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotator.config import GenerationConfig
from annotator.engine.replica import BATCHES_RETRIED, CLAIM_SUFFIX, ENGINE_LOADS, ReplicaStage, ReplicaTask, replica_resources
from annotator.engine.stream import HOST


class Upper(ReplicaTask):
    """Upper-cases a batch of words; its 'engine' is a flag, loads counted."""

    name = "upper"
    reads = ("batch_index", "words")
    keys = {"batch_index": pa.int64()}
    counts = ("words", "letters")

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.loads = 0

    @property
    def loaded(self) -> bool:
        return self.loads > 0

    def load(self, *, num_cpus: float) -> int:
        self.loads += 1
        return 1

    def needs_engine(self, plan: dict) -> bool:
        return bool(plan["words"])

    def batch_path(self, plan: dict) -> Path:
        return self.out_dir / f"batch-{plan['batch_index']:05d}.parquet"

    def run(self, plan: dict) -> pa.Table:
        return pa.table({"word": [w.upper() for w in plan["words"]]})

    def count(self, table: pa.Table) -> dict[str, int]:
        return {"words": table.num_rows, "letters": sum(len(w) for w in table.column("word").to_pylist())}


def plans(*batches: list[str]) -> pa.Table:
    return pa.table({"batch_index": pa.array(range(len(batches)), pa.int64()), "words": pa.array(list(batches), pa.list_(pa.string()))})


def test_batches_are_saved_once_and_only_counts_return(tmp_path):
    task = Upper(tmp_path)
    stage = ReplicaStage(task, resources=replica_resources(GenerationConfig(), num_cpus=1.5))
    assert stage.name == "upper" and stage.reads == ("batch_index", "words")
    assert stage.adds == ("batch_index", "words", "letters", ENGINE_LOADS, BATCHES_RETRIED)
    out = stage.process(plans([], ["ab", "cde"], ["f"]))
    # The empty batch does not load the engine; the first batch with rows does, once.
    assert out.to_pylist() == [{"batch_index": 0, "words": 0, "letters": 0, ENGINE_LOADS: 0, BATCHES_RETRIED: 0},
                               {"batch_index": 1, "words": 2, "letters": 5, ENGINE_LOADS: 1, BATCHES_RETRIED: 0},
                               {"batch_index": 2, "words": 1, "letters": 1, ENGINE_LOADS: 0, BATCHES_RETRIED: 0}]
    assert task.loads == 1
    assert pq.read_table(tmp_path / "batch-00001.parquet").column("word").to_pylist() == ["AB", "CDE"]
    # Each batch, and the claim its attempt made when it started.
    assert sorted(p.name for p in tmp_path.iterdir()) == [*(f".batch-0000{i}.parquet{CLAIM_SUFFIX}" for i in range(3)),
                                                          *(f"batch-0000{i}.parquet" for i in range(3))]


def test_a_batch_started_before_and_not_saved_counts_as_retried(tmp_path):
    """An earlier attempt (a replica lost with the batch in flight, a killed run) left its claim
    and no batch: this attempt makes the batch and says it was a retry."""
    (tmp_path / f".batch-00001.parquet{CLAIM_SUFFIX}").write_bytes(b"")
    out = ReplicaStage(Upper(tmp_path), resources=replica_resources(GenerationConfig(), num_cpus=1.0)).process(plans(["a"], ["b"]))
    assert out.column(BATCHES_RETRIED).to_pylist() == [0, 1] and out.column("words").to_pylist() == [1, 1]
    assert pq.read_table(tmp_path / "batch-00001.parquet").column("word").to_pylist() == ["B"]


def test_a_saved_batch_is_not_made_again(tmp_path):
    pq.write_table(pa.table({"word": ["KEPT"]}), tmp_path / "batch-00000.parquet")
    task = Upper(tmp_path)
    out = ReplicaStage(task, resources=replica_resources(GenerationConfig(), num_cpus=1.0)).process(plans(["new"], ["xy"]))
    assert out.column("words").to_pylist() == [0, 1] and out.column(ENGINE_LOADS).to_pylist() == [0, 1]
    assert pq.read_table(tmp_path / "batch-00000.parquet").column("word").to_pylist() == ["KEPT"]


def test_replica_resources_follow_the_engine_settings():
    gen = GenerationConfig(num_gpus=1, concurrency=3, max_replica_restarts=2)
    res = replica_resources(gen, num_cpus=2.0, max_in_flight=4)
    assert (res.num_cpus, res.num_gpus, res.concurrency, res.batch_size, res.max_in_flight, res.max_restarts) == (2.0, 1, 3, 1, 4, 2)
    light = replica_resources(gen, num_cpus=0.5, num_gpus=0, concurrency=1)
    assert (light.num_gpus, light.concurrency, light.max_in_flight) == (0, 1, None)
    # Batches in flight run together in the engine unless the run is reproducible.
    assert res.concurrent_calls == 4 and light.concurrent_calls == 1
    assert replica_resources(gen.model_copy(update={"reproducible": True}), num_cpus=2.0, max_in_flight=4).concurrent_calls == 1


def test_batches_in_flight_follow_the_mode_and_the_engine_size():
    assert (GenerationConfig().batches_in_flight, GenerationConfig().concurrent_batches) == (2, 2)  # 256 sequences, batches of 256
    assert GenerationConfig(batch_size=64).batches_in_flight == 5            # 256 / 64 + 1: the engine stays full
    assert GenerationConfig(batch_size=256, num_gpus=1).batches_in_flight == 5  # 1,024 sequences on a GPU
    assert GenerationConfig(batch_size=1).batches_in_flight == 64            # bounded
    slow = GenerationConfig(batch_size=64, reproducible=True)
    assert (slow.batches_in_flight, slow.concurrent_batches) == (2, 1)       # queued, one at a time
    assert GenerationConfig(max_batches_in_flight=3, max_num_seqs=8).concurrent_batches == 3


class WaitsTogether(Upper):
    """A batch 'waits for the engine' (giving the host turn up, as the engine stream does) until
    `together` batches wait at once; it records how many held the host turn at the same time."""

    def __init__(self, out_dir: Path, *, together: int, timeout: float = 10):
        super().__init__(out_dir)
        self.barrier, self.timeout = threading.Barrier(together), timeout
        self.in_host, self.most_in_host = 0, 0

    def run(self, plan: dict) -> pa.Table:
        self.in_host += 1
        self.most_in_host = max(self.most_in_host, self.in_host)
        self.in_host -= 1
        with HOST.waiting():
            self.barrier.wait(timeout=self.timeout)  # raises BrokenBarrierError unless `together` batches are in flight
        return super().run(plan)


def test_batches_of_one_call_run_together_up_to_the_replica_limit(tmp_path):
    """A call holds a unit's planned batches: streaming, they are all in the engine at once (no more
    than `concurrent_calls`), and the engine loads once."""
    task = WaitsTogether(tmp_path, together=3)
    stage = ReplicaStage(task, resources=replica_resources(GenerationConfig(batch_size=64), num_cpus=1.0, max_in_flight=3))
    out = stage.process(plans(["a"], ["bb"], ["ccc"]))
    assert out.column("letters").to_pylist() == [1, 2, 3] and out.column(ENGINE_LOADS).to_pylist().count(1) == 1
    assert task.loads == 1 and task.most_in_host == 1  # host work took turns
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == ["batch-00000.parquet", "batch-00001.parquet", "batch-00002.parquet"]

    # Reproducible: one batch at a time, so three batches never wait together.
    slow = ReplicaStage(WaitsTogether(tmp_path / "r", together=3, timeout=1),
                        resources=replica_resources(GenerationConfig(batch_size=64, reproducible=True), num_cpus=1.0, max_in_flight=3))
    (tmp_path / "r").mkdir()
    with pytest.raises(threading.BrokenBarrierError):
        slow.process(plans(["a"], ["bb"], ["ccc"]))
