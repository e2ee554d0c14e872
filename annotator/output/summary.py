"""A short human-readable summary of a finished run, printed by the entry point."""

from __future__ import annotations

import pyarrow.compute as pc

from annotator.core import layout, storage
from annotator.core.statuses import OK, is_failed


def sample_reflection(output: str) -> dict | None:
    """The first document with a reflection in the written shards, or None."""
    for shard in layout.text_shards(output):
        table = storage.read_table(shard, columns=["doc_id", "safety_score", "selected_reason", "reflection_1p", "reflection_status"])
        hits = table.filter(pc.equal(table.column("reflection_status"), OK))
        if hits.num_rows:
            return hits.slice(0, 1).to_pylist()[0]
    return None


def format_summary(stats: dict, *, output: str) -> str:
    out = storage.location(output)
    status = stats.get("reflection_status", {})
    failed = {k: v for k, v in status.items() if is_failed(k)}
    lines = [
        f"output:      {out / layout.TEXT_DIR} ({len(stats['shards'])} shards), stats: {out / layout.STATS_FILE}",
        f"documents:   {stats['documents_in']} in, {stats['documents_out']} out, {stats['tokens_in']} tokens",
        f"safety:      score histogram {dict(sorted(stats['score_histogram'].items()))}",
        f"selected:    {stats['selected_documents']} documents, {stats['selected_tokens']} tokens, by reason {stats['selected_by_reason']}",
        f"reflections: {status.get('ok', 0)} written, {sum(failed.values())} failed {failed or ''}".rstrip(),
        f"generation:  {stats['generation_tokens']['output']} output tokens, {stats['generation_throughput']['output_tokens_per_second']} "
        f"tokens/s per replica, prefix-cache hit rate {stats['generation_throughput']['prefix_cache_hit_rate']}",
        f"time:        {stats['wall_seconds']['total']}s wall; documents/s {stats['documents_per_second']}",
    ]
    checks = (stats.get("reply_checks") or {}).get("checks") or {}
    if checks:
        per = stats.get("reflection_tokens_per_reflection") or {}
        rates = ", ".join(f"{k} {v['pass_rate']}" for k, v in checks.items())
        lines.insert(5, f"checks:      pass rate per parsed reply {rates}; "
                        f"tokens per reflection generated {per.get('generated')} / kept {per.get('kept')}")
    streams = (stats.get("tokenized") or {}).get("streams") or {}
    if streams:
        lines.insert(-1, "streams:     " + "; ".join(f"{k} {v['sequences']:,} windows, {v['tokens']:,} tokens" for k, v in streams.items()))
    if stats.get("annotation_status", {}).get(OK) or any(is_failed(k) for k in stats.get("annotation_status", {})):
        lines.insert(5, f"annotations: {stats['annotation_status']}")
    sample = sample_reflection(output)
    if sample:
        lines.append(f"sample:      [{sample['doc_id']}, score {sample['safety_score']}, {sample['selected_reason']}] {sample['reflection_1p']}")
    return "\n".join(lines)
