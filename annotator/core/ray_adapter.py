"""Where the engine meets Ray beyond running stages: merging block statistics inside a Ray Data
aggregation, so per-block counts never gather in the driver.
"""

from __future__ import annotations

import json

from ray.data.aggregate import AggregateFnV2

from annotator.output.stats_merge import merge_stats


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
