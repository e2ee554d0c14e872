"""The Ray adapter's statistics aggregation (`core/ray_adapter.py`): block statistics of a real
run output merged inside a Ray Data aggregation equal the exact merge, also from unit manifests, and
the driver's merge of a small run's manifests."""

from __future__ import annotations

import json

import pytest

from annotator.core.ray_adapter import aggregate_stats
from annotator.output.stats import finalize_stats
from annotator.output.stats_merge import merge_stats
from tests.output.test_stats import build_run_output
from tests.support import in_child_process


@pytest.fixture(scope="module")
def run_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("stats") / "out"
    return out, build_run_output(out, limit=120, block_rows=40)


def aggregate_on_ray(rows: list[dict], manifests: list[dict]) -> tuple[dict, dict]:
    """`aggregate_stats` over per-unit rows and over unit manifests, on a local Ray (run in a child
    process: see `in_child_process`)."""
    import ray
    import ray.data

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        merged = aggregate_stats(ray.data.from_items(rows, override_num_blocks=3))
        from_manifests = aggregate_stats(ray.data.from_items(manifests, override_num_blocks=2), stats_column="manifest",
                                         stats_field="stats", shard_column="manifest", shard_field="shards")
        return merged, from_manifests
    finally:
        ray.shutdown()


def test_ray_aggregation_merges_block_stats_inside_ray(run_output):
    _, built = run_output
    rows = [{"stats_json": json.dumps(p), "shard": json.dumps([f"part-{i}-0000", f"part-{i}-0001"])}
            for i, p in enumerate(built["parts"])]
    # The same from one JSON column per unit holding both (a unit manifest).
    manifests = [{"manifest": json.dumps({"stats": json.loads(r["stats_json"]), "shards": json.loads(r["shard"])})} for r in rows]
    merged, from_manifests = in_child_process(aggregate_on_ray, rows, manifests)
    expected = merge_stats(built["parts"])
    assert merged.pop("shards") == sorted(n for r in rows for n in json.loads(r["shard"]))
    assert merged == expected
    assert finalize_stats(merged) == finalize_stats(expected)
    assert from_manifests == {**expected, "shards": sorted(n for r in rows for n in json.loads(r["shard"]))}
    # A run of a few units merges its manifests in the driver instead (`run.pipeline.merge_manifests`): the same result.
    from annotator.run.pipeline import DRIVER_MERGE_UNITS, merge_manifests

    assert len(manifests) <= DRIVER_MERGE_UNITS
    assert merge_manifests([json.loads(m["manifest"]) for m in manifests]) == from_manifests
