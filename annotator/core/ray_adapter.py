"""Ray in one place: the stages of a pipeline as Ray Data calls (actor pools for stateful stages,
tasks otherwise), datasets of small work items, the cluster's resources, Ray Data's console, and
the statistics aggregation. Nothing else in the package calls Ray's API.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from typing import Iterable, Iterator

import pyarrow as pa
from ray.data.aggregate import AggregateFnV2

from annotator.core.stages import Resources, Stage, run_batch
from annotator.output.stats_merge import merge_stats


class _StageActor:
    """Ray Data actor wrapper: one `setup()` per actor, then batches."""

    def __init__(self, stage: Stage):
        self.stage = stage
        stage.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return run_batch(self.stage, batch)


# Stateless stages that still load something (a small model) do it once per worker process:
# each task receives a fresh copy of the stage, so the loaded copy is kept here by its identity.
_READY: dict[str, Stage] = {}


def setup_key(stage: Stage) -> str:
    """Identity of a stage's settings (`Stage.__repr__`: its public attributes; loaded state
    lives in attributes starting with '_')."""
    return f"{type(stage).__module__}.{stage!r}"


def _run_stateless(batch: pa.Table, stage: Stage) -> pa.Table:
    key = setup_key(stage)
    ready = _READY.get(key)
    if ready is None:
        stage.setup()
        ready = _READY[key] = stage
    return run_batch(ready, batch)


# A stage's blocks are whole work units (10,000 documents, ~100 MB): Ray Data's default release
# of one more block per scheduling round when an operator is out of budget lets a fast upstream
# stage queue units in the object store faster than the next stage drains them. These bound the
# queue to about two units ahead of what the next stage has in flight, once the store is half used.
DOWNSTREAM_CAPACITY_RATIO = 2.0
GUARD_RELEASE_INTERVAL_S = 5.0


def configure_backpressure() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.downstream_capacity_backpressure_ratio = DOWNSTREAM_CAPACITY_RATIO
    ctx.output_backpressure_guard_release_interval_s = GUARD_RELEASE_INTERVAL_S


def apply_stages(ds, stages: Iterable[Stage]):
    """Chain `stages` onto Ray Dataset `ds`: actor pools for stateful stages, tasks otherwise."""
    for stage in stages:
        res = stage.resources
        common = dict(batch_size=res.batch_size, batch_format="pyarrow", num_cpus=res.num_cpus)
        if res.num_gpus:
            common["num_gpus"] = res.num_gpus
        if stage.stateful:
            if res.max_restarts is not None:
                common["max_restarts"] = res.max_restarts
            with warnings.catch_warnings():
                # Ray 2.60 deprecates free remote args but has no named parameter for max_restarts yet.
                warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
                ds = ds.map_batches(
                    _StageActor,
                    fn_constructor_kwargs={"stage": stage},
                    compute=_actor_pool(res),
                    **common,
                )
        else:
            ds = ds.map_batches(_run_stateless, fn_kwargs={"stage": stage}, **common)
    return ds


def _actor_pool(res: Resources):
    import ray.data

    if res.concurrent_calls > 1:  # calls run together, each in its own thread of the actor
        return ray.data.ActorPoolStrategy(size=res.concurrency, max_tasks_in_flight_per_actor=max(res.max_in_flight or 1, res.concurrent_calls),
                                          max_concurrent_calls_per_actor=res.concurrent_calls, enable_true_multi_threading=True)
    return ray.data.ActorPoolStrategy(size=res.concurrency, max_tasks_in_flight_per_actor=res.max_in_flight)


def start_ray(cfg) -> None:
    """Join the configured cluster (`ray.address` or RAY_ADDRESS), or start a local one with the
    config's CPUs and object store; says where worker output goes when it stays in Ray's logs."""
    import ray

    to_driver = cfg.ray.worker_logs_to_driver
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        context = ray.init(address=cfg.ray.address, log_to_driver=to_driver)
    else:
        object_store = int(cfg.ray.object_store_memory_gb * 2**30) if cfg.ray.object_store_memory_gb else None
        context = ray.init(num_cpus=cfg.ray.num_cpus, object_store_memory=object_store, log_to_driver=to_driver)
    from annotator.core.metrics import endpoint

    dashboard = getattr(context, "dashboard_url", None)
    print(f"[spp] live metrics (ray_spp_*): {endpoint() or 'no metrics endpoint on this node'} (Prometheus)"
          + (f"; Ray dashboard: http://{dashboard}" if dashboard else ""), flush=True)
    if not to_driver:
        print(f"[spp] worker output (vLLM engines, replicas) goes to Ray's logs: {worker_log_dir()}/worker-*.err "
              "(ray.worker_logs_to_driver=true copies it here)", flush=True)


def worker_log_dir() -> str:
    try:
        from ray._private.worker import _global_node

        return _global_node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 - a remote cluster: its nodes' own session folders
        return "/tmp/ray/session_latest/logs (on each node)"


def items_dataset(items: list[dict], *, blocks: int | None = None):
    """A Ray Dataset of small work items (units, planned batches), one block per item by default."""
    import ray.data

    return ray.data.from_items(items, override_num_blocks=blocks or max(1, len(items)))


def run_stages(ds, stages: Iterable[Stage]) -> Iterator[dict]:
    """The result rows of `stages` applied to `ds` (a dataset, or a list of work items)."""
    if isinstance(ds, list):
        ds = items_dataset(ds)
    return apply_stages(ds, stages).iter_rows()


def cluster_resources() -> dict:
    import ray

    return ray.cluster_resources()


def cluster_nodes() -> list[dict]:
    import ray

    return ray.nodes()


def on_every_node(fn, *args, timeout_s: float = 120.0) -> dict[str, tuple[str, object]]:
    """`fn(*args)` once on every alive node with CPUs or GPUs (pinned there, no resources held);
    node id -> (node address, its result, or the exception it raised or a TimeoutError). Only the
    driver's node: {} (nothing to ask another node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive") and (n["Resources"].get("CPU") or n["Resources"].get("GPU"))]
    if all(n["NodeID"] == here for n in nodes):
        return {}
    remote = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = {n["NodeID"]: (n["NodeManagerAddress"], remote.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)).remote(*args)) for n in nodes}
    ready, _ = ray.wait([ref for _, ref in refs.values()], num_returns=len(refs), timeout=timeout_s)
    out = {}
    for node_id, (address, ref) in refs.items():
        if ref not in ready:
            ray.cancel(ref, force=True)
            out[node_id] = (address, TimeoutError(f"no answer in {timeout_s:.0f}s"))
            continue
        try:
            out[node_id] = (address, ray.get(ref))
        except Exception as err:  # noqa: BLE001 - reported per node by the caller
            out[node_id] = (address, err)
    return out


def configure_ray_data_console(*, interactive: bool | None = None) -> None:
    """Ray Data's bars in a terminal only (`interactive`, default: stdout is a terminal), and its
    INFO lines (execution plans, 'Tip:' lines, per-dataset timings) off the console: they stay in
    Ray Data's own log file (ray-data.log in the session's logs), warnings still show."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty() if interactive is None else interactive
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))


class MergeStats(AggregateFnV2):
    """Ray Data aggregation merging a column of JSON block statistics (`stats_json`) with
    `merge_stats`. `field` picks one entry of each JSON object (e.g. "stats" of a manifest); with
    `as_key`, the values are lists (the writer's `shard` names), merged as {as_key: [...]}."""

    def __init__(self, on: str = "stats_json", *, field: str | None = None, as_key: str | None = None):
        # JSON strings as accumulators: nested counters with varying keys do not fit an Arrow struct.
        name = f"merge_stats({on}{'.' + field if field else ''})"
        super().__init__(name=name, zero_factory=lambda: None, on=on, ignore_nulls=True)
        self.field = field
        self.as_key = as_key

    def aggregate_block(self, block) -> str | None:
        from ray.data.block import BlockAccessor

        values = [json.loads(s) for s in BlockAccessor.for_block(block).to_arrow().column(self.get_target_column()).to_pylist() if s]
        if self.field:
            values = [v[self.field] for v in values]
        if not values:
            return None
        return json.dumps(merge_stats([{self.as_key: v} for v in values] if self.as_key else values))

    def combine(self, current_accumulator: str, new: str) -> str:
        return json.dumps(merge_stats([json.loads(current_accumulator), json.loads(new)]))


def aggregate_stats(ds, *, stats_column: str = "stats_json", shard_column: str | None = "shard",
                    stats_field: str | None = None, shard_field: str | None = None) -> dict:
    """Runs `ds` (the writer's output: one row per block with `stats_json` and its `shard` names;
    or a JSON column holding both, picked by `stats_field`/`shard_field`) and returns the
    statistics merged inside Ray, with `shards` the sorted shard names."""
    aggs = [MergeStats(stats_column, field=stats_field)]
    if shard_column:
        aggs.append(MergeStats(shard_column, field=shard_field, as_key="shards"))
    result = ds.aggregate(*aggs)
    stats = json.loads(result[aggs[0].name] or "{}")
    shards = json.loads(result[aggs[1].name] or "{}").get("shards", []) if shard_column else []
    stats["shards"] = sorted(shards)
    return stats
