"""The stage adapter: stages run in one task (`InProcess`) and how pass 1 groups its stages."""

from __future__ import annotations

import os
import pickle
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotator.config import RunConfig
from annotator.run.pipeline import scoring_ops, scoring_stages
from annotator.core.ray_adapter import setup_key
from annotator.core.stages import TIMING_PREFIX, InProcess, PipelineError, Resources, Stage, timed
from tests.support import in_child_process, require_shared_data


class Batched(Stage):
    def __init__(self, batch_size):
        self.resources = Resources(batch_size=batch_size)


class Double(Batched):
    """Each input row becomes two; `y` is the size of the batch it was given."""

    name = "double"
    reads = ("x",)
    adds = ("y",)

    def process(self, batch):
        xs = batch.column("x").to_pylist()
        return pa.table({"x": [x for x in xs for _ in (0, 1)], "y": [len(xs)] * (2 * len(xs))})


class Sizes(Batched):
    name = "sizes"
    reads = ("y",)
    adds = ("seen",)

    def process(self, batch):
        return batch.append_column("seen", pa.array([batch.num_rows] * batch.num_rows))


def test_in_process_gives_each_stage_its_own_batch_size():
    op = InProcess([Double(batch_size=None), Sizes(batch_size=4)], resources=Resources(batch_size=1))
    out = op.process(pa.table({"x": list(range(5))}))
    assert out.column("x").to_pylist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert out.column("y").to_pylist() == [5] * 10  # the first stage saw the whole input
    assert out.column("seen").to_pylist() == [4] * 8 + [2] * 2  # the second, slices of 4
    assert {TIMING_PREFIX + "double", TIMING_PREFIX + "sizes"} <= set(out.column_names)
    assert op.name == "double+sizes" and op.reads == ("x",) and op.adds[:2] == ("y", TIMING_PREFIX + "double")


def test_in_process_refuses_a_broken_chain_and_gpu_stages():
    with pytest.raises(PipelineError, match="'double' reads \\['x'\\]"):
        InProcess([Sizes(batch_size=4), Double(batch_size=None)], resources=Resources())
    gpu = Sizes(batch_size=4)
    gpu.resources = Resources(num_gpus=1)
    with pytest.raises(PipelineError, match="GPU"):
        InProcess([Double(batch_size=None), gpu], resources=Resources())


class _Sleep(Stage):
    name = "sleep"

    def process(self, batch: pa.Table) -> pa.Table:
        time.sleep(batch.column("s")[0].as_py())
        return batch


def test_overlapping_calls_are_charged_their_share_so_seconds_add_up_to_the_busy_time():
    """A replica runs batches together: 0.4 s, and 0.4 s starting 0.2 s later, keep the stage busy
    0.6 s; each is charged 0.2 s alone plus half of the 0.2 s shared."""
    stage, charged = _Sleep(), []

    def call(delay: float) -> None:
        time.sleep(delay)
        out = timed(stage, pa.table({"s": [0.4, 0.4]}))
        charged.append(sum(out.column(TIMING_PREFIX + "sleep").to_pylist()))

    threads = [threading.Thread(target=call, args=(d,)) for d in (0.0, 0.2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert charged == pytest.approx([0.3, 0.3], abs=0.05) and sum(charged) == pytest.approx(0.6, abs=0.05)
    alone = timed(stage, pa.table({"s": [0.1]}))  # one call at a time: its own time
    assert alone.column(TIMING_PREFIX + "sleep")[0].as_py() == pytest.approx(0.1, abs=0.03)


def test_setup_key_survives_pickling():
    """Workers keep a stateless stage's loaded state by this key; each task gets a fresh
    unpickled copy, so the key must not depend on object addresses."""
    op = InProcess([Double(batch_size=None), Sizes(batch_size=4)], resources=Resources(batch_size=1))
    copy = pickle.loads(pickle.dumps(op))
    assert setup_key(copy) == setup_key(op) and "0x" not in setup_key(op)
    assert setup_key(InProcess([Double(batch_size=None), Sizes(batch_size=8)], resources=Resources())) != setup_key(op)


def test_pass_one_runs_a_cpu_scorer_in_the_unit_task_and_a_transformers_scorer_in_its_pool(tmp_path):
    cfg = RunConfig.model_validate({"input": {"paths": ["x.parquet"]}, "output": {"path": str(tmp_path)}})
    stages = scoring_stages(cfg, out_dir=tmp_path, extra_columns={})
    (op,) = scoring_ops(stages, num_cpus=1)
    assert op.name == "read+tokens+language+safety+write_scored" and not op.stateful and op.resources.batch_size == 1
    cfg = RunConfig.model_validate({"input": {"paths": ["x.parquet"]}, "output": {"path": str(tmp_path)},
                                    "classifier": {"backend": "transformers", "model": "m", "num_gpus": 1, "concurrency": 3}})
    read_count, scorer, write = scoring_ops(scoring_stages(cfg, out_dir=tmp_path, extra_columns={}), num_cpus=1)
    assert read_count.name == "read+tokens+language" and not read_count.stateful
    assert scorer.stateful and scorer.resources.num_gpus == 1 and scorer.resources.concurrency == 3
    assert write.name == "write_scored"


class Probe(Stage):
    """How many units one call of the chain holds, and how many setups its worker has done."""

    name = "probe"
    reads = ("_unit", "token_length")
    adds = ("units_in_call", "setups")
    resources = Resources(batch_size=None)

    def setup(self):
        os.environ["SPP_PROBE_SETUPS"] = str(int(os.environ.get("SPP_PROBE_SETUPS", "0")) + 1)

    def process(self, batch):
        n = batch.num_rows
        return (batch.append_column("units_in_call", pa.array([len(set(batch.column("_unit").to_pylist()))] * n))
                .append_column("setups", pa.array([int(os.environ["SPP_PROBE_SETUPS"])] * n)))


def probe_chain_on_ray(cfg, units, tokenizer: str) -> list[dict]:
    """The pass-1 reader, the token counter and the probe in one task, on a local Ray (run in a child
    process: see `in_child_process`)."""
    import ray

    from annotator.score.reader import ReadUnits, units_dataset
    from annotator.core.ray_adapter import apply_stages
    from annotator.core.tokens import TokenCounter

    chain = InProcess([ReadUnits(cfg, extra_columns={}), TokenCounter(tokenizer=tokenizer, resources=Resources(batch_size=16)),
                       Probe()], resources=Resources(num_cpus=1, batch_size=1))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        return apply_stages(units_dataset(units), [chain]).select_columns(
            ["_unit", "doc_id", "text", "token_length", "units_in_call", "setups"]).take_all()
    finally:
        ray.shutdown()


def test_one_task_reads_one_unit_and_sets_up_once_per_worker(tmp_path):
    """On real Ray, with the pass-1 reader and token counter: every call of the in-process chain
    holds exactly one work unit, and a worker loads the stages once however many units it runs."""
    from annotator.config import InputConfig
    from annotator.core.tokens import target_tokenizer
    from annotator.core.units import plan_input

    # 240 real documents in row groups of 40: six units.
    docs = pq.read_table(sorted(require_shared_data().glob("*.parquet"))[0], columns=["id", "text"]).slice(0, 240)
    path = str(tmp_path / "docs.parquet")
    pq.write_table(docs, path, row_group_size=40)
    cfg = InputConfig(paths=[path], rows_per_unit=40)
    units = plan_input([path], cfg).units
    assert len(units) == 6
    tokenizer = "builtin:smollm2-135m-instruct"
    rows = in_child_process(probe_chain_on_ray, cfg, units, tokenizer)
    assert len(rows) == 240 and len({r["doc_id"] for r in rows}) == 240
    assert {r["_unit"] for r in rows} == {u.key for u in units}
    assert {r["units_in_call"] for r in rows} == {1}
    assert {r["setups"] for r in rows} == {1}  # however many units a worker ran
    expected = target_tokenizer(tokenizer).count([r["text"] for r in rows])
    assert [r["token_length"] for r in rows] == expected and sum(expected) > 240
