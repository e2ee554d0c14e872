"""Dataset-level statistics: counts per written block, merged exactly across blocks, finalized once.

The writer computes `shard_stats` for every block it writes; `stats_merge.merge_stats` sums them
(inside Ray through `core.ray_adapter.aggregate_stats`), and `finalize_stats` turns the merged counters into the report form
(quantiles, top annotation values, throughput timeline, accelerator-hours).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from annotator.core.stages import TIMING_PREFIX
from annotator.core.tokens import count_tokens, target_tokenizer
from annotator.core.statuses import OK, failure_reason, is_failed

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
# Annotation values per key that the report lists.
TOP_ANNOTATION_VALUES = 10
# Stages whose workers hold accelerators, and the config section that says how many.
ACCELERATOR_STAGES = {"generate": "generation", "safety": "classifier"}
STRATUM_SEPARATOR = "|"


def stratum_key(score: int, reason: str) -> str:
    """Key of the (safety score, selection reason) stratum the published sample is drawn by."""
    return f"{score}{STRATUM_SEPARATOR}{reason}"


def attempt_counts(logs: list) -> dict:
    """From `reflection_attempt_log`: requests, replies parsed, and per reply check the replies
    that failed it (every check runs on every parsed reply)."""
    out = {"requests": 0, "parsed": 0, "outcomes": Counter(), "check_failures": Counter()}
    for log in logs:
        for entry in log or ():
            outcome, _, _ = entry.rpartition(":")
            out["requests"] += 1
            if outcome.startswith("checks="):
                out["parsed"] += 1
                out["check_failures"].update(outcome.removeprefix("checks=").split(","))
                outcome = "checks_failed"
            elif outcome == OK:
                out["parsed"] += 1
            out["outcomes"][outcome] += 1
    return {"requests": out["requests"], "parsed": out["parsed"], "outcomes": dict(out["outcomes"]),
            "check_failures": dict(out["check_failures"])}


def _annotation_counts(tags: list) -> tuple[Counter, dict[str, Counter]]:
    keys, values = Counter(), {}
    for row in tags:
        for tag in row or ():
            key, _, value = tag.partition(":")
            keys[key] += 1
            values.setdefault(key, Counter())[value] += 1
    return keys, values


def recipe_stats(batch: pa.Table, *, recipe, pack, placed: list[str], tokenizer) -> dict:
    """Counts of one recipe's columns in a block: outcomes, attempts and reply checks, generated and
    kept tokens, the length of its placed text, citations, canaries, prompt versions, tags."""
    cols = batch.column_names
    c = recipe.column

    def values(key: str) -> list | None:
        return batch.column(c(key)).to_pylist() if c(key) in cols else None

    status = values("status") or [None] * batch.num_rows
    ok = [s == OK for s in status]
    out: dict = {"status": dict(Counter(s for s in status if s is not None))}
    log = values("attempt_log")
    if log is not None:
        out["attempts"] = attempt_counts(log)
    for key in ("generated_tokens", "prompt_tokens", "cached_prompt_tokens"):
        out[key] = int(sum(v or 0 for v in values(key) or []))
    out["engine_documents"] = sum(1 for v in values("prompt_tokens") or [] if v)  # documents this recipe sent to the engine
    tok = (target_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer) if tokenizer is not None else None
    if pack.format != "tags" and tok is not None:
        texts = {f: [v for v, good in zip(values(f) or [], ok) if good and v] for f in placed}
        out["kept_tokens"] = sum(sum(count_tokens(tok, t)) for t in texts.values() if t)
        first = texts.get(placed[0], []) if placed else []
        out["lengths"] = {str(k): v for k, v in Counter(count_tokens(tok, first) if first else []).items()}
    cited = values("citations")
    if cited is not None:
        out["citations_by_section"] = dict(Counter(x for cs in cited if cs for x in cs))
        out["citations_dropped"] = int(sum(v or 0 for v in values("citations_dropped") or []))
    canaries = values("canary_type")
    if canaries is not None:
        out["canary_type"] = dict(Counter(x for x in canaries if x))
        out["canary_present"] = {v: sum(bool(x) for x in values(f"canary_present_{v}") or [])
                                 for v in sorted(set(pack.voices.values()))}
    versions = values("prompt_version")
    if versions is not None:
        out["prompt_versions"] = dict(Counter(v for v in versions if v))
    if pack.format == "tags":
        keys, vals = _annotation_counts(values("tags") or [])
        out["annotation_keys"], out["annotation_values"] = dict(keys), {k: dict(v) for k, v in vals.items()}
    return out


def column_total(table: pa.Table, col: str, *, where=None) -> int:
    """The sum of a column (0 when the table has no such column), over the rows `where` marks."""
    if col not in table.column_names:
        return 0
    values = table.column(col) if where is None else pc.if_else(where, table.column(col), 0)
    return int(pc.sum(values).as_py() or 0)


def _main_recipe_figures(main: dict, annotations: dict, *, measured: bool) -> dict:
    """The top-level reflection and annotation figures of a block: the main recipe's counts (and
    the annotation recipe's), under the names stats.json has always used."""
    return {
        "reflection_status": main.get("status", {}),
        "reflection_tokens": main.get("lengths", {}) if measured else {},
        "reflection_tokens_measured": 1 if measured else 0,
        "annotation_status": annotations.get("status", {}),
        "annotation_keys": annotations.get("annotation_keys", {}),
        "annotation_values": annotations.get("annotation_values", {}),
        "canary_type": main.get("canary_type", {}),
        "canary_present": main.get("canary_present", {}),
        "prompt_versions": main.get("prompt_versions", {}),
        "reflection_attempts": main.get("attempts", {}),
        "reflection_generated_tokens": main.get("generated_tokens", 0),
        "reflection_kept_tokens": main.get("kept_tokens", 0),
        "citations_by_section": main.get("citations_by_section", {}),
        "citations_dropped": main.get("citations_dropped", 0),
    }


def _language_counts(batch: pa.Table) -> dict:
    """Documents per identified language (`language` column): all of them, and those selected."""
    if "language" not in batch.column_names:
        return {}
    languages = batch.column("language").to_pylist()
    return {"languages": dict(Counter(languages)),
            "selected_by_language": dict(Counter(lang for lang, s in zip(languages, batch.column("selected").to_pylist()) if s))}


def shard_stats(batch: pa.Table, *, written: pa.Table, tokenizer=None, recipes: list = ()) -> dict:
    """Counts for one written block, merged across blocks by `merge_stats`. `batch` is the block as
    it reached the writer, `written` the rows that went to the shards; `tokenizer` (a tokenizer or
    its spec) measures placed-text lengths in target tokens (not measured when None); `recipes` are
    (recipe, pack, placed fields): each gets its counts under `recipes`, and the first one's are
    also the top-level reflection figures."""
    if not batch.num_rows:
        return {"blocks": 1, "documents_in": 0, "documents_out": 0, "finished_at": time.time()}
    selected = batch.column("selected")
    scores = batch.column("safety_score").to_pylist()
    reasons = batch.column("selected_reason").to_pylist()
    source_tokens = "source_token_length" if "source_token_length" in batch.column_names else "token_length"
    tokens = batch.column(source_tokens).to_pylist()
    tokens_by_reason: Counter = Counter()
    for reason, n in zip(reasons, tokens):
        tokens_by_reason[reason] += n or 0
    blocks = {r.name: recipe_stats(batch, recipe=r, pack=p, placed=placed, tokenizer=tokenizer) for r, p, placed in recipes}
    main = blocks[recipes[0][0].name] if recipes else {}
    annotations = next((blocks[r.name] for r, p, _ in recipes if p.format == "tags"), {})
    measured = tokenizer is not None and "lengths" in main
    return {
        "blocks": 1,
        "documents_in": batch.num_rows,
        "documents_out": written.num_rows,
        "tokens_in": column_total(batch, source_tokens),
        # Document content tokens the training data keeps (dropped documents and clipped tails
        # excluded); template, annotation and reflection tokens are in `streams`.
        "tokens_out": column_total(written, "token_length"),
        "clipped_tokens": column_total(written, "clipped_tokens"),
        "score_histogram": {str(k): v for k, v in Counter(scores).items()},
        # Over the written rows: the published sample is drawn from the shards by these strata.
        "strata": dict(Counter(stratum_key(s, r) for s, r in zip(written.column("safety_score").to_pylist(),
                                                                  written.column("selected_reason").to_pylist()))),
        "selected_by_reason": dict(Counter(reasons)),
        "selected_tokens_by_reason": dict(tokens_by_reason),
        "selected_documents": int(pc.sum(selected.cast(pa.int64())).as_py() or 0),
        "selected_tokens": column_total(batch, source_tokens, where=selected),
        **_language_counts(batch),
        **_main_recipe_figures(main, annotations, measured=measured),
        "recipes": {name: {k: v for k, v in b.items() if k not in ("annotation_values",)} for name, b in blocks.items()},
        "generation_tokens": {
            "prompt": column_total(batch, "gen_prompt_tokens"),
            "cached_prompt": column_total(batch, "gen_cached_prompt_tokens"),
            "output": column_total(batch, "gen_output_tokens"),
            "documents": int(pc.sum(pc.greater(batch.column("gen_prompt_tokens"), 0).cast(pa.int64())).as_py() or 0)
            if "gen_prompt_tokens" in batch.column_names else 0,
        },
        "stage_seconds": {
            c[len(TIMING_PREFIX):]: float(pc.sum(batch.column(c)).as_py() or 0.0)
            for c in batch.column_names if c.startswith(TIMING_PREFIX)
        },
        # When this block was written; merging turns these into the throughput timeline.
        "finished_at": time.time(),
    }


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


def run_packs(config) -> dict:
    """{recipe name: its prompt pack} of a recorded config (a RunConfig or its dump, possibly partial)."""
    from annotator.config import GenerationConfig
    from annotator.method.resolved import resolve_run

    if config is None:
        return {}
    gen = config.generation if hasattr(config, "generation") else GenerationConfig.model_validate(config.get("generation") or {})
    return resolve_run(gen, voices=[]).packs


def provenance(config, *, packs: dict | None = None) -> dict:
    """The prompt packs (name, version = name@content hash) and constitution the run was configured
    with (`packs`, resolved by the caller, or those of `config`), the main recipe's at the top; the
    versions found in the rows are in `prompt_versions`."""
    packs = run_packs(config) if packs is None else packs
    if not packs:
        return {}
    pack = next(iter(packs.values()))
    constitution = pack.constitution or next((p.constitution for p in packs.values() if p.constitution), None)
    return {
        "prompt_pack": pack.name,
        "prompt_version": pack.version,
        "prompt_pack_source": pack.source,
        "recipes": {name: p.version for name, p in packs.items()},
        "constitution": {"sections": len(constitution.sections), "domains": len(constitution.domains),
                         "sha256": hashlib.sha256(constitution.text.encode()).hexdigest()[:16]} if constitution else None,
    }


def reply_checks(attempts: dict, pack) -> dict:
    """Per reply check, replies that failed and passed it, and the pass rate per parsed reply;
    every check the pack enables is listed (0 when it never failed)."""
    from annotator.method.prompt_packs import CHECKS

    failures = dict(attempts.get("check_failures") or {})
    names = list(CHECKS)
    if pack is not None:
        names = [c for c in CHECKS if pack.check_enabled(c) and (c != "voice_pairing" or len(pack.voices) > 1)
                 and (c != "third_person" or "3p" in pack.voices.values())]
    parsed = attempts.get("parsed", 0)
    return {
        "requests": attempts.get("requests", 0),
        "parsed": parsed,
        "outcomes": attempts.get("outcomes", {}),
        "checks": {name: {"failed": n, "passed": parsed - n, "pass_rate": round((parsed - n) / parsed, 4) if parsed else None}
                   for name in [*names, *sorted(set(failures) - set(names))] for n in [failures.get(name, 0)]},
    }


def tokens_per_output(*, ok: int, generated: int, kept: int | None) -> dict:
    """Per reply kept; `kept` None where the placed text is not measured (tags: the block is built
    at write time from the tags that fit)."""
    return {
        "generated": round(generated / ok, 1) if ok else None,
        "kept": round(kept / ok, 1) if ok and kept is not None else None,
        "basis": "generated: output tokens of every request (retries included) per reply kept; "
                 "kept: target tokens of the placed text per reply kept",
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


def computed_per_document(prompt: int, cached: int, *, documents: int) -> float | None:
    """Prompt tokens computed (prompt minus prefix-cached) per document, to one decimal."""
    return round((prompt - cached) / documents, 1) if documents else None


def finalize_stats(merged: dict, *, config=None, packs: dict | None = None, started_at: float | None = None) -> dict:
    """The report form of merged statistics: every merged counter, plus reflection outcomes and
    length quantiles, top annotation values, the throughput timeline (seconds since `started_at`),
    accelerator-hours (from `config`, a RunConfig or its dump) and prompt/constitution versions."""
    stats = {k: v for k, v in merged.items() if k not in ("annotation_values", "timeline", "reflection_tokens")}
    status = merged.get("reflection_status", {})
    failed = {failure_reason(k): v for k, v in status.items() if is_failed(k)}
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
    stats["canaries"] = {"total": sum(merged.get("canary_type", {}).values()), "by_type": merged.get("canary_type", {}),
                         "value_present": merged.get("canary_present", {})}
    stats["timeline"] = _timeline_points(merged.get("timeline"), started_at)
    stats["accelerator"] = accelerator_usage(merged.get("stage_seconds", {}), config)
    packs = run_packs(config) if packs is None else packs
    stats["prompts"] = provenance(config, packs=packs)
    main_pack = next(iter(packs.values()), None)
    stats["reply_checks"] = reply_checks(merged.get("reflection_attempts") or {}, main_pack)
    stats["reflection_tokens_per_reflection"] = tokens_per_output(
        ok=status.get(OK, 0), generated=merged.get("reflection_generated_tokens", 0), kept=merged.get("reflection_kept_tokens", 0))
    engine_seconds = float(merged.get("stage_seconds", {}).get("generate", 0.0))
    stats["recipes"] = {}
    for name, block in (merged.get("recipes") or {}).items():
        st = block.get("status", {})
        failed_r = {failure_reason(k): v for k, v in st.items() if is_failed(k)}
        stats["recipes"][name] = {
            "prompt_version": packs[name].version if name in packs else None,
            "status": st,
            "outputs": {"kept": st.get(OK, 0), "failed": sum(failed_r.values()), "failed_by_reason": failed_r},
            "reply_checks": reply_checks(block.get("attempts") or {}, packs.get(name)),
            "tokens_per_output": tokens_per_output(ok=st.get(OK, 0), generated=block.get("generated_tokens", 0),
                                                   kept=block.get("kept_tokens")),
            # The engine serves every recipe in the same calls: each recipe's share of its output.
            "generated_tokens": block.get("generated_tokens", 0),
            "prompt_tokens": block.get("prompt_tokens", 0),
            "prefix_cache_hit_rate": round(block.get("cached_prompt_tokens", 0) / block["prompt_tokens"], 4) if block.get("prompt_tokens") else None,
            # Prompt tokens the engine computed (not read from its prefix cache) per document it was asked about.
            "computed_prompt_tokens_per_document": computed_per_document(block.get("prompt_tokens", 0), block.get("cached_prompt_tokens", 0),
                                                                         documents=block.get("engine_documents", 0)),
            "prompt_layout": packs[name].layout if name in packs else None,
            "generated_tokens_per_engine_second": round(block.get("generated_tokens", 0) / engine_seconds, 2) if engine_seconds else None,
            "citations_by_section": block.get("citations_by_section", {}),
            "canaries": {"by_type": block.get("canary_type", {}), "value_present": block.get("canary_present", {})}
            if "canary_type" in block else None,
        }
    return stats
