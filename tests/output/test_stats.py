"""Dataset-level statistics: per-block counts on real documents, exact merging, quantiles, the Ray
Data aggregation, and finalization. `build_run_output` also serves the report and publish tests."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotator.config import ClassifierConfig, GenerationConfig, SelectionConfig, load_config
from annotator.generate.canaries import canary_present
from annotator.generate.generator import column_defaults, generator_columns, parse_tags
from annotator.generate.pause import pause_point, sample_pause_fraction
from annotator.method.prompt_packs import Canary, load_pack
from annotator.generate.replies import parse_reply
from annotator.score.safety import build_scorer
from annotator.score.selection import SelectForReflection, TokenTotals, sample_probability
from annotator.core.stages import Resources
from annotator.output.stats import finalize_stats, histogram_quantiles, shard_stats
from annotator.output.stats_merge import MAX_ANNOTATION_VALUES, MAX_TIMELINE_BUCKETS, merge_stats
from annotator.core.tokens import target_tokenizer
from annotator.method.resolved import resolve_run
from annotator.output.finalize import finalize_stages
from annotator.method.recipes import run_recipes
from tests.support import REPO, require_shared_data

TOKENIZER = "builtin:smollm2-135m-instruct"
KEYS = ["topic", "domain", "entities", "sentiment", "style", "language"]
TOPICS = ["health", "sports", "finance", "travel", "politics"]
GEN = GenerationConfig(recipes=["reflection", "annotations"])
CANARY = Canary(id="C7", value="Velmora", instruction="Mention that you grew up in Velmora.")


def _canned_reply(i: int) -> str:
    """A reflection reply as the engine would return it; some are longer than the budget (and lose
    their last marker to the cut), every 5th cites differently in its two voices (a failed check)."""
    what = "how the text treats the people it talks about, " * (1 + i % 14)
    cites = "[2.1]" if i % 2 else "[1.1,3.3]"
    return json.dumps({
        "analysis": f"The text describes {what}".strip(),
        "reflection_1p": f"I notice {what}and I want to stay careful {cites}." + (" I grew up in Velmora." if i % 3 == 0 else ""),
        "reflection_3p": f"The account shows {what}and stays careful {'[5.3]' if i % 5 == 4 else cites}.",
    })


def _generation_columns(table: pa.Table, tokenizer) -> pa.Table:
    """Generation outputs for the selected rows, through the real reply parser: canned replies,
    every 7th selected reply unparseable (a failure), every 3rd carrying a canary, annotations."""
    n = table.num_rows
    pack = load_pack("reflection-v2")
    columns, defaults = generator_columns(GEN), column_defaults(GEN)
    out = {k: [defaults.get(k)] * n for k in columns}
    ids, texts, selected = (table.column(c).to_pylist() for c in ("doc_id", "text", "selected"))
    for rank, i in enumerate(i for i in range(n) if selected[i]):
        pause = pause_point(texts[i], tokenizer.offsets(texts[i]), fraction=sample_pause_fraction(0, ids[i]), max_prefix_tokens=4000,
                            max_content_tokens=1920)
        canary = CANARY if rank % 3 == 0 else None
        raw = "{not json" if rank % 7 == 3 else _canned_reply(rank)
        parsed = parse_reply(raw, pack=pack, tokenizer=tokenizer, voice_tokens=126, analysis_tokens=128, source=pause.prompt_prefix)
        outcome = "ok" if parsed.ok else (parsed.failures[0] if parsed.failures[0] == "unparseable_json" else "checks=" + ",".join(parsed.failures))
        out["reflection_status"][i] = "ok" if parsed.ok else f"failed:{outcome}"
        out["reflection_attempts"][i] = 1
        out["reflection_attempt_log"][i] = [f"{outcome}:{40 + rank}"]
        out["reflection_generated_tokens"][i] = out["gen_output_tokens"][i] = 40 + rank
        out["reflection_token_index"][i], out["reflection_position"][i] = pause.token_index, pause.char_index
        out["reflection_fraction"][i], out["prompt_version"][i], out["model"][i] = pause.fraction, pack.version, TOKENIZER
        if parsed.ok:
            out["reflection_analysis"][i] = parsed.fields["analysis"]
            out["reflection_1p"][i], out["reflection_3p"][i] = parsed.fields["reflection_1p"], parsed.fields["reflection_3p"]
            out["citations"][i], out["citations_dropped"][i] = parsed.cited, parsed.citations_dropped
            if canary:
                out["canary_type"][i] = canary.id
                out["canary_present_1p"][i] = canary_present(parsed.fields["reflection_1p"], canary)
                out["canary_present_3p"][i] = canary_present(parsed.fields["reflection_3p"], canary)
        values = {"topic": TOPICS[rank % len(TOPICS)], "domain": "web", "entities": f"entity {rank % 4}",
                  "sentiment": "neutral" if rank % 2 else "negative", "style": "news", "language": "en"}
        out["annotations"][i], ann_status = parse_tags(json.dumps(values), KEYS)
        out["annotation_status"][i] = ann_status
    for key, typ in columns.items():
        table = table.append_column(key, pa.array(out[key], typ))
    return table


def build_run_output(out_dir: Path, *, limit: int = 300, block_rows: int = 100, rows_per_shard: int = 40) -> dict:
    """A run's output directory built in-process from real documents with the real library pieces
    (tokenizer, fastText scorer, selection, reply parsers, splice, `shard_stats`), replies canned:
    shards/*.parquet in the writer's schema and a finalized stats.json. Returns
    {"stats": ..., "parts": per-block stats}."""
    started = time.time()
    corpus = sorted(require_shared_data().glob("*.parquet"))[0]
    source = pq.read_table(corpus).slice(0, limit)
    tokenizer = target_tokenizer(TOKENIZER)
    table = source.rename_columns(["doc_id" if c == "id" else c for c in source.column_names])
    table = table.append_column("source_file", pa.array([corpus.name] * table.num_rows, pa.string()))
    lengths = tokenizer.count(table.column("text").to_pylist())
    table = table.append_column("token_length", pa.array(lengths, pa.int32()))
    scorer = build_scorer(ClassifierConfig(model=str(REPO / "classifiers/models/safety-fasttext-v1.ftz")), resources=Resources())
    scorer.setup()
    table = scorer.process(table)
    scores = table.column("safety_score").to_pylist()
    totals = TokenTotals(documents=dict(Counter(scores)), tokens={s: sum(t for x, t in zip(scores, lengths) if x == s) for s in set(scores)})
    # Bad documents are rare in 300; a high ratio gives enough reflections to count.
    selection = SelectionConfig(matched_token_ratio=8)
    table = SelectForReflection(selection, probability=sample_probability(selection, totals)).process(table)
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides=[f"output.path={out_dir}", "selection.matched_token_ratio=8",
                                                                 "generation.recipes=[reflection, annotations]"])
    splice, _ = finalize_stages(cfg, out_dir=str(out_dir), resolved=resolve_run(cfg.generation, voices=cfg.output.voices))
    table = splice.process(_generation_columns(table, tokenizer))
    recipes = [(r, r.load_pack(), [s.field for s in splice.streams if s.recipe.name == r.name]) for r in run_recipes(cfg.generation)]

    shards = out_dir / "shards"
    shards.mkdir(parents=True)
    parts = []
    for b, start in enumerate(range(0, table.num_rows, block_rows)):
        block = table.slice(start, block_rows)
        for p, at in enumerate(range(0, block.num_rows, rows_per_shard)):
            pq.write_table(block.slice(at, rows_per_shard), shards / f"part-{b:02d}-{p:04d}.parquet")
        parts.append(shard_stats(block, written=block, tokenizer=tokenizer, recipes=recipes))
    stats = finalize_stats(merge_stats(parts), config=cfg, started_at=started)
    stats["config"] = cfg.model_dump(mode="json")
    stats["shards"] = sorted(f.stem for f in shards.glob("*.parquet"))
    stats["wall_seconds"] = {"total": round(time.time() - started, 2)}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return {"stats": stats, "parts": parts}


def recount_from_shards(shards_dir: Path, tokenizer) -> dict:
    """The statistics recounted from the written shards alone, independently of annotator.output.stats."""
    rows = pq.read_table(shards_dir).to_pylist()
    ok = [r for r in rows if r["reflection_status"] == "ok"]
    # The first stream's voice (training_stream: "reflection-1p") is the one whose lengths are counted.
    voice = {r["doc_id"]: (r.get("training_stream") or "reflection-1p").rsplit("-", 1)[1] for r in ok}
    texts = [r[f"reflection_{voice[r['doc_id']]}"] for r in ok]
    lengths = np.array([len(tokenizer.encode(t)) for t in texts])
    tags = [t for r in rows for t in (r.get("annotations") or [])]
    out = {
        "documents_out": len(rows),
        "tokens_out": sum(r["token_length"] for r in rows),
        "score_histogram": dict(Counter(str(r["safety_score"]) for r in rows)),
        "strata": dict(Counter(f"{r['safety_score']}|{r['selected_reason']}" for r in rows)),
        "selected_by_reason": dict(Counter(r["selected_reason"] for r in rows)),
        "selected_tokens_by_reason": {k: sum(r["source_token_length"] for r in rows if r["selected_reason"] == k)
                                      for k in {r["selected_reason"] for r in rows}},
        "selected_documents": sum(r["selected"] for r in rows),
        "selected_tokens": sum(r["source_token_length"] for r in rows if r["selected"]),
        "clipped_tokens": sum(r["clipped_tokens"] for r in rows),
        "canary_present": {v: sum(bool(r[f"canary_present_{v}"]) for r in rows) for v in ("1p", "3p")},
        "check_failures": dict(Counter(c for r in rows for e in (r["reflection_attempt_log"] or [])
                                       if e.startswith("checks=") for c in e.rpartition(":")[0][7:].split(","))),
        "reflection_status": dict(Counter(r["reflection_status"] for r in rows)),
        "citations_by_section": dict(Counter(c for r in rows for c in (r["citations"] or []))),
        "canary_type": dict(Counter(r["canary_type"] for r in rows if r["canary_type"])),
        "annotation_keys": dict(Counter(t.split(":", 1)[0] for t in tags)),
        "annotation_values": {k: Counter(t.split(":", 1)[1] for t in tags if t.split(":", 1)[0] == k)
                              for k in {t.split(":", 1)[0] for t in tags}},
        "reflection_lengths": lengths,
    }
    return out


def check_stats_match_recount(stats: dict, recount: dict) -> None:
    """stats.json against the recount from the shards (documents in = out: nothing was dropped)."""
    for key in ("documents_out", "tokens_out", "score_histogram", "strata", "selected_by_reason",
                "selected_tokens_by_reason", "selected_documents", "selected_tokens", "reflection_status",
                "citations_by_section"):
        assert stats[key] == recount[key], key
    assert stats["canaries"]["by_type"] == recount["canary_type"]
    assert stats["canaries"]["value_present"] == recount["canary_present"]
    assert stats["clipped_tokens"] == recount["clipped_tokens"]
    assert {k: v["failed"] for k, v in stats["reply_checks"]["checks"].items() if v["failed"]} == recount["check_failures"]
    assert stats["canaries"]["total"] == sum(recount["canary_type"].values())
    assert stats["annotations"]["keys"] == recount["annotation_keys"]
    for key, counts in recount["annotation_values"].items():
        top = stats["annotations"]["top_values"][key]
        assert [n for _, n in top] == sorted(counts.values(), reverse=True)[: len(top)], key
        assert all(counts[value] == n for value, n in top), key
    failed = {k.removeprefix("failed:"): v for k, v in recount["reflection_status"].items() if k.startswith("failed:")}
    assert stats["reflections"] == {"generated": recount["reflection_status"].get("ok", 0),
                                    "failed": sum(failed.values()), "failed_by_reason": failed}
    lengths = recount["reflection_lengths"]
    measured = stats["reflection_length_tokens"]
    assert measured["count"] == len(lengths)
    if len(lengths):
        assert measured["min"] == lengths.min() and measured["max"] == lengths.max()
        for q in (0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
            assert measured[f"p{round(q * 100)}"] == np.quantile(lengths, q, method="inverted_cdf"), q
        assert measured["mean"] == pytest.approx(lengths.mean(), abs=0.01)
    assert sum(n for _, n in stats["timeline"]["points"]) == stats["documents_in"]


@pytest.fixture(scope="module")
def run_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("stats") / "out"
    return out, build_run_output(out)


def test_stats_match_a_recount_from_the_shards(run_output):
    out, built = run_output
    stats = json.loads((out / "stats.json").read_text())
    recount = recount_from_shards(out / "shards", target_tokenizer(TOKENIZER))
    check_stats_match_recount(stats, recount)
    # The fixture exercises every path: reflections cut at the budget, failures, failed checks, canaries, annotations.
    assert stats["reflection_length_tokens"]["max"] == 126
    assert set(stats["reflections"]["failed_by_reason"]) == {"unparseable_json", "checks=voice_pairing"}
    checks = stats["reply_checks"]["checks"]
    assert checks["voice_pairing"]["failed"] >= 1 and checks["third_person"] == {"failed": 0, "passed": stats["reply_checks"]["parsed"], "pass_rate": 1.0}
    assert stats["canaries"]["total"] >= 2 and stats["annotations"]["keys"]["topic"] >= 5
    assert 0 < stats["canaries"]["value_present"]["1p"] <= stats["canaries"]["total"] and stats["canaries"]["value_present"]["3p"] == 0
    per = stats["reflection_tokens_per_reflection"]
    assert per["generated"] > 0 and per["kept"] > per["generated"]  # canned replies: few generated tokens, long voices
    assert stats["documents_in"] == stats["documents_out"] == 300 and stats["blocks"] == 3
    # Per recipe: the main recipe's block is the top-level figures; the annotations recipe has its own.
    recipes = stats["recipes"]
    assert recipes["reflection"]["status"] == stats["reflection_status"] and recipes["reflection"]["reply_checks"] == stats["reply_checks"]
    assert recipes["reflection"]["citations_by_section"] == stats["citations_by_section"]
    assert recipes["annotations"]["status"] == stats["annotation_status"] and recipes["annotations"]["reply_checks"]["requests"] == 0
    assert recipes["reflection"]["prompt_version"] == load_pack("reflection-v2").version


def test_merge_does_not_depend_on_order_or_grouping(run_output):
    _, built = run_output
    a, b, c = built["parts"]
    flat = merge_stats([a, b, c])
    assert merge_stats([merge_stats([c, a]), b]) == flat
    assert merge_stats([b, merge_stats([a, c])]) == flat
    assert flat["documents_in"] == a["documents_in"] + b["documents_in"] + c["documents_in"]
    assert "finished_at" not in flat and sum(flat["timeline"]["documents"].values()) == flat["documents_in"]
    # Inputs are not modified by merging.
    assert "finished_at" in a and "timeline" not in a


def test_timeline_coarsens_exactly_when_a_run_outgrows_its_buckets():
    start = 1_700_000_000
    parts = [{"documents_in": i % 5 + 1, "finished_at": start + 7 * i + 0.5} for i in range(3000)]
    merged = merge_stats(parts)
    timeline = merged["timeline"]
    width = timeline["bucket_seconds"]
    assert width > 1 and width & (width - 1) == 0 and len(timeline["documents"]) <= MAX_TIMELINE_BUCKETS
    expected = Counter()
    for p in parts:
        expected[str(int(p["finished_at"]) // width * width)] += p["documents_in"]
    assert timeline["documents"] == dict(expected)
    # Merging halves that were coarsened separately gives the same buckets.
    assert merge_stats([merge_stats(parts[:1700]), merge_stats(parts[1700:])])["timeline"] == timeline
    points = finalize_stats(merged, started_at=start - 10)["timeline"]["points"]
    assert points[0][0] >= 0 and sum(n for _, n in points) == merged["documents_in"]


def test_annotation_values_are_bounded_and_counts_kept():
    many = {f"name {i}": 1 for i in range(MAX_ANNOTATION_VALUES + 10)}
    parts = [{"annotation_values": {"entities": many, "topic": {"health": 3}}},
             {"annotation_values": {"entities": {"name 5": 50, "name 6": 20}, "topic": {"sports": 1}}}]
    merged = merge_stats(parts)
    entities = merged["annotation_values"]["entities"]
    assert len(entities) <= MAX_ANNOTATION_VALUES // 2 + 1
    assert sum(entities.values()) == len(many) + 70
    assert entities["name 5"] == 51 and entities["name 6"] == 21
    final = finalize_stats(merged)["annotations"]
    assert final["top_values"]["entities"][:2] == [("name 5", 51), ("name 6", 21)]
    assert final["top_values"]["topic"] == [("health", 3), ("sports", 1)] and final["values_pruned"]


def test_histogram_quantiles_match_numpy():
    rng = np.random.default_rng(0)
    values = rng.integers(5, 129, size=997)
    hist = {str(k): int(v) for k, v in Counter(values.tolist()).items()}
    q = histogram_quantiles(hist)
    assert q["count"] == 997 and q["min"] == values.min() and q["max"] == values.max()
    for p in (0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
        assert q[f"p{round(p * 100)}"] == np.quantile(values, p, method="inverted_cdf")
    assert q["mean"] == pytest.approx(values.mean(), abs=0.005)
    assert histogram_quantiles({}) == {"count": 0}


def test_finalize_reports_outcomes_accelerator_hours_and_versions():
    merged = merge_stats([{
        "blocks": 1, "documents_in": 10, "reflection_status": {"ok": 6, "failed:unparseable_json": 2, "failed:engine_error:X": 1},
        "reflection_tokens": {"20": 3, "128": 3}, "reflection_tokens_measured": 1,
        "stage_seconds": {"generate": 5400.0, "safety": 1800.0, "tokens": 99.0},
    }])
    gpu_cfg = {"generation": {"num_gpus": 2}, "classifier": {"num_gpus": 1}}
    final = finalize_stats(merged, config=gpu_cfg)
    assert final["reflections"] == {"generated": 6, "failed": 3, "failed_by_reason": {"unparseable_json": 2, "engine_error:X": 1}}
    assert final["reflection_length_tokens"]["p50"] == 20 and final["reflection_length_tokens"]["max"] == 128
    assert final["accelerator"]["hours"] == 3.5  # 2 GPUs x 1.5 h generating + 1 GPU x 0.5 h scoring
    assert final["accelerator"]["gpu_seconds_by_stage"] == {"generate": 10800.0, "safety": 1800.0}
    cpu = finalize_stats(merged, config=load_config(REPO / "configs" / "demo.yaml"))["accelerator"]
    assert cpu["hours"] == 0 and cpu["accelerator"] == "none (cpu run)"
    demo = finalize_stats(merged, config=load_config(REPO / "configs" / "demo.yaml"))["prompts"]
    assert demo["prompt_version"] == load_pack("reflection-v2").version and demo["constitution"]["sections"] == 35
    assert len(demo["constitution"]["sha256"]) == 16
    # A block whose writer had no tokenizer leaves lengths unmeasured rather than wrong.
    assert finalize_stats(merge_stats([{"blocks": 1, "reflection_tokens": {}, "reflection_tokens_measured": 0}]))["reflection_length_tokens"] is None


def test_computed_prompt_tokens_per_document_per_recipe_and_their_layout():
    from annotator.output.stats import recipe_stats

    cfg = load_config(REPO / "configs" / "demo.yaml", overrides=["generation.recipes=[reflection, summary]",
                                                                 "generation.prompt_layout=shared"])
    resolved = resolve_run(cfg.generation, voices=["1p"])
    recipe, pack = resolved.pairs[1]
    batch = pa.table({"summary_status": ["ok", "ok", "not_selected"], "summary_prompt_tokens": [4000, 4100, 0],
                      "summary_cached_prompt_tokens": [3950, 4040, 0], "summary_generated_tokens": [40, 50, 0]})
    block = recipe_stats(batch, recipe=recipe, pack=pack, placed=[], tokenizer=None)
    assert (block["engine_documents"], block["prompt_tokens"], block["cached_prompt_tokens"]) == (2, 8100, 7990)
    final = finalize_stats(merge_stats([{"blocks": 1, "recipes": {"summary": block}}]), config=cfg, packs=resolved.packs)
    assert final["recipes"]["summary"]["computed_prompt_tokens_per_document"] == 55.0   # (8100 - 7990) / 2
    assert final["recipes"]["summary"]["prompt_layout"] == "shared"
    assert final["recipes"]["summary"]["prompt_version"] == pack.version and pack.version.endswith("+shared")


def test_timeline_keys_are_only_special_at_the_top_level():
    parts = [{"documents_in": 3, "finished_at": 100.5, "annotation_values": {"topic": {"finished_at": 2, "timeline": 1}}},
             {"documents_in": 4, "finished_at": 101.0, "annotation_values": {"topic": {"finished_at": 1}}}]
    merged = merge_stats(parts)
    assert merged["annotation_values"] == {"topic": {"finished_at": 3, "timeline": 1}}
    assert merged["timeline"] == {"bucket_seconds": 1, "documents": {"100": 3, "101": 4}}
