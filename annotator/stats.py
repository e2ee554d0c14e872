"""Dataset-level statistics: counts per written block, merged exactly across blocks, finalized once.

The writer computes `shard_stats` for every block it writes; a Ray Data aggregation (`MergeStats`)
merges those rows inside Ray, and `finalize_stats` turns the merged counters into the report form
(quantiles, top annotation values, throughput timeline, accelerator-hours).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import Counter
from functools import lru_cache

import pyarrow as pa
import pyarrow.compute as pc
from ray.data.aggregate import AggregateFnV2

from annotator.generation import OK
from annotator.reflection_prompt import ANNOTATION_PROMPT_VERSION, PROMPT_VERSION, constitution_text
from annotator.stages import TIMING_PREFIX
from annotator.tokens import count_tokens

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
# Distinct values kept per annotation key while merging: beyond this the rarest values are folded
# into one count, so a 100M-document run cannot grow the accumulator without bound.
MAX_ANNOTATION_VALUES = 10_000
TOP_ANNOTATION_VALUES = 10
# Timeline buckets kept while merging; the bucket width doubles when a run outgrows them.
MAX_TIMELINE_BUCKETS = 1024
# Stages whose workers hold accelerators, and the config section that says how many.
ACCELERATOR_STAGES = {"generate": "generation", "safety": "classifier"}
STRATUM_SEPARATOR = "|"


@lru_cache(maxsize=4)
def _tokenizer(spec: str):
    # The Rust tokenizer alone: a finalize worker that loads transformers (and torch) with it
    # stays ~0.4 GiB larger for the rest of the run.
    from annotator.tokens import load_counting_tokenizer

    return load_counting_tokenizer(spec)


def stratum_key(score: int, reason: str) -> str:
    """Key of the (safety score, selection reason) stratum the published sample is drawn by."""
    return f"{score}{STRATUM_SEPARATOR}{reason}"


def reflection_lengths(batch: pa.Table, tokenizer) -> list[int]:
    """Target-tokenizer length of each written reflection (the voice spliced into the text)."""
    status = batch.column("reflection_status").to_pylist()
    voices = batch.column("reflection_voice_used").to_pylist() if "reflection_voice_used" in batch.column_names else None
    texts = {v: batch.column(f"reflection_{v}").to_pylist() for v in ("1p", "3p")}
    chosen = [texts[(voices[i] if voices and voices[i] else "1p")][i] for i, s in enumerate(status) if s == OK]
    if not chosen:
        return []
    return count_tokens(_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer, chosen)


def _annotation_counts(tags: list) -> tuple[Counter, dict[str, Counter]]:
    keys, values = Counter(), {}
    for row in tags:
        for tag in row or ():
            key, _, value = tag.partition(":")
            keys[key] += 1
            values.setdefault(key, Counter())[value] += 1
    return keys, values


def shard_stats(batch: pa.Table, *, written: pa.Table, tokenizer=None) -> dict:
    """Counts for one written block, merged across blocks by `merge_stats`. `batch` is the block as
    it reached the writer, `written` the rows that went to the shards; `tokenizer` (a tokenizer or
    its spec) measures reflection lengths in target tokens (not measured when None)."""
    def total(table: pa.Table, col: str, where=None) -> int:
        if col not in table.column_names:
            return 0
        values = table.column(col) if where is None else pc.if_else(where, table.column(col), 0)
        return int(pc.sum(values).as_py() or 0)

    selected = batch.column("selected")
    scores = batch.column("safety_score").to_pylist()
    reasons = batch.column("selected_reason").to_pylist()
    tokens = batch.column("token_length").to_pylist()
    tokens_by_reason: Counter = Counter()
    for reason, n in zip(reasons, tokens):
        tokens_by_reason[reason] += n or 0
    keys, values = _annotation_counts(batch.column("annotations").to_pylist())
    lengths = Counter(reflection_lengths(batch, tokenizer)) if tokenizer is not None else None
    return {
        "blocks": 1,
        "documents_in": batch.num_rows,
        "documents_out": written.num_rows,
        "tokens_in": total(batch, "token_length"),
        # Source-text tokens of the written documents (dropped ones excluded); the reflections'
        # own tokens are in `reflection_tokens`.
        "tokens_out": total(written, "token_length"),
        "score_histogram": {str(k): v for k, v in Counter(scores).items()},
        # Over the written rows: the published sample is drawn from the shards by these strata.
        "strata": dict(Counter(stratum_key(s, r) for s, r in zip(written.column("safety_score").to_pylist(),
                                                                  written.column("selected_reason").to_pylist()))),
        "selected_by_reason": dict(Counter(reasons)),
        "selected_tokens_by_reason": dict(tokens_by_reason),
        "selected_documents": int(pc.sum(selected.cast(pa.int64())).as_py() or 0),
        "selected_tokens": total(batch, "token_length", where=selected),
        "reflection_status": dict(Counter(batch.column("reflection_status").to_pylist())),
        "reflection_tokens": {str(k): v for k, v in lengths.items()} if lengths is not None else {},
        "reflection_tokens_measured": 1 if lengths is not None else 0,
        "annotation_status": dict(Counter(batch.column("annotation_status").to_pylist())),
        "annotation_keys": dict(keys),
        "annotation_values": {k: dict(v) for k, v in values.items()},
        "canary_type": dict(Counter(c for c in batch.column("canary_type").to_pylist() if c)),
        "citations_by_section": dict(Counter(c for cs in batch.column("citations").to_pylist() if cs for c in cs)),
        "citations_dropped": total(batch, "citations_dropped"),
        "generation_tokens": {
            "prompt": total(batch, "gen_prompt_tokens"),
            "cached_prompt": total(batch, "gen_cached_prompt_tokens"),
            "output": total(batch, "gen_output_tokens"),
        },
        "stage_seconds": {
            c[len(TIMING_PREFIX):]: float(pc.sum(batch.column(c)).as_py() or 0.0)
            for c in batch.column_names if c.startswith(TIMING_PREFIX)
        },
        # When this block was written; merging turns these into the throughput timeline.
        "finished_at": time.time(),
    }


def _coarsen(timeline: dict, width: int) -> dict:
    out: Counter = Counter()
    for start, n in timeline["documents"].items():
        out[str(int(start) // width * width)] += n
    return {"bucket_seconds": width, "documents": dict(out)}


def merge_timelines(a: dict, b: dict) -> dict:
    """Documents written per time bucket; widths are powers of two, so coarsening stays exact."""
    width = max(a["bucket_seconds"], b["bucket_seconds"])
    merged = Counter(_coarsen(a, width)["documents"])
    merged.update(_coarsen(b, width)["documents"])
    out = {"bucket_seconds": width, "documents": dict(merged)}
    while len(out["documents"]) > MAX_TIMELINE_BUCKETS:
        out = _coarsen(out, out["bucket_seconds"] * 2)
    return out


def _prune_values(values: dict) -> dict:
    """Keeps the most frequent values of each annotation key; the rest count under `_pruned`."""
    for key, counts in values.items():
        if len(counts) > MAX_ANNOTATION_VALUES:
            kept = dict(Counter(counts).most_common(MAX_ANNOTATION_VALUES // 2))
            kept["_pruned"] = kept.get("_pruned", 0) + sum(counts.values()) - sum(kept.values())
            values[key] = kept
    return values


def _merge_into(merged: dict, part: dict, *, top: bool = True) -> dict:
    for key, value in part.items():
        if top and key == "finished_at":  # one block: its documents land in the bucket of its finishing second
            value = {"bucket_seconds": 1, "documents": {str(int(value)): part.get("documents_in", 0)}}
            key = "timeline"
        if top and key == "timeline":
            merged[key] = merge_timelines(merged[key], value) if key in merged else value
        elif isinstance(value, dict):
            merged[key] = _merge_into(merged.get(key, {}), value, top=False)
        elif isinstance(value, list):
            merged[key] = merged.get(key, []) + value
        else:
            merged[key] = merged.get(key, 0) + value
    return merged


def merge_stats(parts: list[dict]) -> dict:
    """Sum block statistics: nested counters key by key, lists concatenated; each block's
    `finished_at` and `documents_in` go into a timeline of documents per time bucket."""
    merged: dict = {}
    for part in parts:
        merged = _merge_into(merged, part)
    if "annotation_values" in merged:
        merged["annotation_values"] = _prune_values(merged["annotation_values"])
    return merged


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


def histogram_quantiles(histogram: dict, quantiles=QUANTILES) -> dict:
    """min, quantiles (nearest rank), max and mean of an exact {value: count} histogram."""
    items = sorted((int(k), v) for k, v in histogram.items() if v)
    count = sum(v for _, v in items)
    if not count:
        return {"count": 0}
    out = {"count": count, "min": items[0][0]}
    for q in quantiles:
        rank, seen = max(1, math.ceil(q * count)), 0  # nearest rank
        for value, n in items:
            seen += n
            if seen >= rank:
                out[f"p{round(q * 100)}"] = value
                break
    out["max"] = items[-1][0]
    out["mean"] = round(sum(k * v for k, v in items) / count, 2)
    return out


def constitution_version() -> dict:
    """The constitution's declared version (from its title) and a hash of its exact text."""
    text = constitution_text()
    declared = re.search(r"version\s+([\w.-]+)", text.splitlines()[0] if text else "", re.IGNORECASE)
    return {"version": declared.group(1) if declared else None, "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}


def provenance() -> dict:
    """Prompt and constitution versions the reflections were written with."""
    return {
        "prompt_version": PROMPT_VERSION,
        "annotation_prompt_version": ANNOTATION_PROMPT_VERSION,
        "constitution": constitution_version(),
    }


def accelerator_usage(stage_seconds: dict, config) -> dict:
    """Accelerator-hours: each accelerator stage's busy seconds (summed over its workers, engine
    load and idle time excluded) times the GPUs per worker in the config; 0 on CPU."""
    if config is not None and hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    gpu_seconds = {}
    for stage, section in ACCELERATOR_STAGES.items():
        gpus = float(((config or {}).get(section) or {}).get("num_gpus") or 0)
        gpu_seconds[stage] = round(gpus * float(stage_seconds.get(stage, 0.0)), 2)
    hours = sum(gpu_seconds.values()) / 3600
    return {
        "accelerator": "gpu" if hours else "none (cpu run)",
        "hours": round(hours, 4),
        "gpu_seconds_by_stage": gpu_seconds,
        "basis": "num_gpus per worker x busy seconds of the stage (sum over workers); engine load and idle time excluded",
    }


def _timeline_points(timeline: dict | None, started_at: float | None) -> dict:
    if not timeline:
        return {"bucket_seconds": None, "points": []}
    first = min(int(t) for t in timeline["documents"])
    # A resumed run holds blocks from earlier attempts: count from whichever came first.
    origin = min(started_at, first) if started_at is not None else first
    points = sorted((int(t) - origin, n) for t, n in timeline["documents"].items())
    return {"bucket_seconds": timeline["bucket_seconds"], "started_at": round(origin, 3),
            "points": [[round(t, 2), n] for t, n in points]}


def finalize_stats(merged: dict, *, config=None, started_at: float | None = None) -> dict:
    """The report form of merged statistics: every merged counter, plus reflection outcomes and
    length quantiles, top annotation values, the throughput timeline (seconds since `started_at`),
    accelerator-hours (from `config`, a RunConfig or its dump) and prompt/constitution versions."""
    stats = {k: v for k, v in merged.items() if k not in ("annotation_values", "timeline", "reflection_tokens")}
    status = merged.get("reflection_status", {})
    failed = {k.removeprefix("failed:"): v for k, v in status.items() if k.startswith("failed")}
    stats["reflections"] = {"generated": status.get(OK, 0), "failed": sum(failed.values()), "failed_by_reason": failed}
    measured = merged.get("reflection_tokens_measured", 0) == merged.get("blocks", 0) and merged.get("blocks", 0) > 0
    stats["reflection_length_tokens"] = (
        {**histogram_quantiles(merged.get("reflection_tokens", {})), "histogram": merged.get("reflection_tokens", {})}
        if measured else None
    )
    values = merged.get("annotation_values", {})
    stats["annotations"] = {
        "keys": merged.get("annotation_keys", {}),
        "top_values": {k: Counter({v: n for v, n in c.items() if v != "_pruned"}).most_common(TOP_ANNOTATION_VALUES)
                       for k, c in sorted(values.items())},
        "distinct_values": {k: len(c) - ("_pruned" in c) for k, c in sorted(values.items())},
        "values_pruned": any("_pruned" in c for c in values.values()),
    }
    stats["canaries"] = {"total": sum(merged.get("canary_type", {}).values()), "by_type": merged.get("canary_type", {})}
    stats["timeline"] = _timeline_points(merged.get("timeline"), started_at)
    stats["accelerator"] = accelerator_usage(merged.get("stage_seconds", {}), config)
    stats["prompts"] = provenance()
    return stats
