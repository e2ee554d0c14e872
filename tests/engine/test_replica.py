"""The one replica stage (`engine/replica.py`) with a small task of its own: the engine loads once
per actor and only for a batch that needs it, a saved batch is skipped, every batch is saved
atomically under the task's path, and only counts come back."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from annotator.config import GenerationConfig
from annotator.engine.replica import ENGINE_LOADS, ReplicaStage, ReplicaTask, replica_resources


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
    assert stage.adds == ("batch_index", "words", "letters", ENGINE_LOADS)
    out = stage.process(plans([], ["ab", "cde"], ["f"]))
    # The empty batch does not load the engine; the first batch with rows does, once.
    assert out.to_pylist() == [{"batch_index": 0, "words": 0, "letters": 0, ENGINE_LOADS: 0},
                               {"batch_index": 1, "words": 2, "letters": 5, ENGINE_LOADS: 1},
                               {"batch_index": 2, "words": 1, "letters": 1, ENGINE_LOADS: 0}]
    assert task.loads == 1
    assert pq.read_table(tmp_path / "batch-00001.parquet").column("word").to_pylist() == ["AB", "CDE"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch-00000.parquet", "batch-00001.parquet", "batch-00002.parquet"]


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
