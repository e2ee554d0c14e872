"""Exact merging of block statistics: nested counters summed key by key, lists concatenated, and
each block's finishing time folded into a bounded timeline of documents per time bucket.
"""

from __future__ import annotations

from collections import Counter

# Distinct values kept per annotation key while merging: beyond this the rarest values are folded
# into one count (`_pruned`), so a 100M-document run cannot grow the accumulator without bound.
MAX_ANNOTATION_VALUES = 10_000
# Timeline buckets kept while merging; the bucket width doubles when a run outgrows them.
MAX_TIMELINE_BUCKETS = 1024


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
