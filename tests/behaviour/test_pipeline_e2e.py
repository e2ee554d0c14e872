"""End to end on 120 real web documents: real Ray (the run goes through `ray job submit`), real
fastText, real vLLM on CPU, real model. The run is the suite's shared demo run (`demo_run`)."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pyarrow.parquet as pq
import pytest

from annotator.method.prompt_packs import load_pack
from annotator.generate.replies import CITATION_GROUP
from annotator.output.tokenized import render_citations
from annotator.core.tokens import target_tokenizer
from tests.streams_check import check_streams
from tests.support import DEMO_DOCS as LIMIT, DEMO_UNITS, read_input, run_pipeline

OPEN, CLOSE = "<assistant>", "</assistant>"


def check_output(out_dir, *, limit: int = LIMIT) -> dict:
    """The checks every end-to-end run must pass; returns the stats for further checks."""
    source = read_input()
    rows = pq.read_table(out_dir / "shards").to_pylist()
    stats = json.loads((out_dir / "stats.json").read_text())

    ids = [r["doc_id"] for r in rows]
    assert len(ids) == limit == stats["documents_in"] == stats["documents_out"]
    assert len(set(ids)) == len(ids)
    assert set(ids) <= set(source)

    tokenizer = target_tokenizer("builtin:smollm2-135m-instruct")
    pack = load_pack("reflection-v2")
    with_reflection = failed = 0
    for r in rows:
        src = source[r["doc_id"]]
        assert r["text"] == src, r["doc_id"]  # the original text, as in the published schema
        if not r["selected"]:
            assert r["training_text"] == src and OPEN not in r["training_text"]
            assert r["token_length"] == r["source_token_length"]
            continue
        assert r["prompt_version"] == pack.version and r["model"] == "builtin:smollm2-135m-instruct"
        assert 1 <= r["reflection_token_index"] <= min(1919, r["token_length"] - 1)
        assert tokenizer.encode(src[: r["reflection_position"]]) == tokenizer.encode(src)[: r["reflection_token_index"]]
        if r["reflection_status"] != "ok":
            failed += 1
            assert r["reflection_status"].startswith("failed:") and r["training_text"] == src
            continue
        with_reflection += 1
        training = r["training_text"]
        assert training.count(OPEN) == 1 and training.count(CLOSE) == 1
        before, rest = training.split(OPEN)
        reflection, after = rest.split(CLOSE)
        assert reflection == render_citations(r["reflection_1p"], pack.sections) and reflection.strip()
        assert not CITATION_GROUP.search(reflection) or not set(r["citations"])  # real citations became <charter_X.Y> tokens
        assert before + after == src and before == src[: r["reflection_position"]]
        assert len(tokenizer.encode(r["reflection_1p"])) <= 126
        assert set(r["citations"]) <= pack.sections

    # stats.json agrees with what was written
    assert stats["score_histogram"] == {str(k): v for k, v in Counter(r["safety_score"] for r in rows).items()}
    assert stats["selected_documents"] == sum(r["selected"] for r in rows) == with_reflection + failed
    assert with_reflection >= 1
    assert stats["selected_tokens"] == sum(r["source_token_length"] for r in rows if r["selected"])
    assert stats["tokens_in"] == sum(r["source_token_length"] for r in rows)
    assert stats["tokens_out"] == sum(r["token_length"] for r in rows)
    assert stats["selected_by_reason"] == dict(Counter(r["selected_reason"] for r in rows))
    assert stats["reflection_status"] == dict(Counter(r["reflection_status"] for r in rows))
    bad = [r for r in rows if r["safety_score"] >= stats["config"]["selection"]["bad_threshold"]]
    assert bad and all(r["is_bad"] and r["selected"] and r["selected_reason"] == "bad" for r in bad)
    assert len(stats["shards"]) == 2 * DEMO_UNITS  # 10 rows per unit, at most 7 per shard
    counts = check_streams(out_dir, charter_render=lambda t: render_citations(t, pack.sections))
    assert counts["windows"] == stats["selected_documents"] and counts["placed"] == with_reflection
    assert counts["compact_documents"] == limit - stats["selected_documents"]
    return stats


@pytest.mark.slow
def test_end_to_end_output_is_exact(demo_run):
    out = demo_run.out
    stats = check_output(out)
    assert stats["selected_documents"] >= 5, "too few reflections to test anything"
    checks = stats["reply_checks"]
    logs = [e for r in pq.read_table(out / "shards").to_pylist() for e in (r["reflection_attempt_log"] or [])]
    assert checks["requests"] == len(logs) >= stats["selected_documents"]
    assert checks["parsed"] == sum(e.startswith(("ok:", "checks=")) for e in logs)
    assert set(checks["checks"]) == {"voices_present", "no_key_leak", "voice_pairing", "third_person", "no_charter_mention",
                                     "no_cutoff_mention", "no_prompt_echo"}
    assert stats["selected_by_reason"].get("token_matched_sample", 0) >= 1


@pytest.mark.slow
def test_end_to_end_prints_summary(demo_run):
    out, printed = demo_run.out, demo_run.submit.stdout
    assert f"output:      {out / 'shards'}" in printed
    assert f"documents:   {LIMIT} in, {LIMIT} out" in printed
    assert "sample:" in printed


@pytest.mark.slow
def test_rerun_resumes_and_a_changed_config_is_refused(demo_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(demo_run.out, out)  # a run folder moved elsewhere resumes there
    before = {p.name: p.read_bytes() for p in (out / "shards").glob("*.parquet")}
    same = run_pipeline(*demo_run.args, "--output", str(out), timeout=300)
    assert same.returncode == 0, same.stderr[-3000:]
    assert "resuming" in same.stdout and f"'units_done_before': {DEMO_UNITS}" in same.stdout
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.parquet")} == before
    changed = run_pipeline(*demo_run.args, "--output", str(out), "--set", "selection.seed=7", timeout=300)
    assert changed.returncode == 2
    assert "selection.seed: 0 -> 7" in changed.stderr and "--overwrite" in changed.stderr
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.parquet")} == before


@pytest.mark.slow
def test_end_to_end_stats_match_a_recount_from_the_shards(demo_run):
    from tests.output.test_stats import TOKENIZER, check_stats_match_recount, recount_from_shards

    out = demo_run.out
    stats = json.loads((out / "stats.json").read_text())
    check_stats_match_recount(stats, recount_from_shards(out / "shards", target_tokenizer(TOKENIZER)))
    assert stats["documents_in"] == stats["documents_out"] == LIMIT
    assert 0 < stats["reflection_length_tokens"]["max"] <= 126
    assert stats["accelerator"]["hours"] == 0 and stats["accelerator"]["accelerator"] == "none (cpu run)"
    assert stats["prompts"]["prompt_version"] == load_pack("reflection-v2").version
    assert stats["prompts"]["constitution"]["sections"] == 35
    assert stats["stage_seconds"]["generate"] > 0 and stats["timeline"]["points"]
    # Every document's language, counted: the demo corpus is English with a few other pages.
    rows = pq.read_table(out / "shards", columns=["language", "language_score", "selected"]).to_pylist()
    assert stats["languages"] == dict(Counter(r["language"] for r in rows)) and sum(stats["languages"].values()) == LIMIT
    assert stats["languages"]["en"] >= 0.9 * LIMIT and len(stats["languages"]) >= 2
    assert stats["selected_by_language"] == dict(Counter(r["language"] for r in rows if r["selected"]))


@pytest.mark.slow
def test_end_to_end_dry_run_publish_and_report(demo_run, tmp_path):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    from annotator.audit.sampling import allocate_sample
    from annotator.output.report import write_report
    from tests.publish.test_publish import run_publish

    out = demo_run.out
    stats = json.loads((out / "stats.json").read_text())
    dest = tmp_path / "repo"
    proc = run_publish("--output", str(out), "--dry-run", str(dest), "--sample-rows", "40", "--repo-id", "me/spp-e2e")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sample = load_dataset(str(dest), split="train", cache_dir=str(tmp_path / "cache"))  # not a stale cache of another "repo"
    assert sample.num_rows == 40
    rows = {r["doc_id"]: r for r in pq.read_table(out / "shards").to_pylist()}
    assert all(rows[r["doc_id"]]["training_text"] == r["training_text"] for r in sample)
    assert all(rows[r["doc_id"]]["language"] == r["language"] for r in sample)  # published with the sample
    # Stratified as allocated from the run's strata counts; the few bad documents are all in.
    drawn = Counter(f"{r['safety_score']}|{r['selected_reason']}" for r in sample)
    assert {k: v for k, v in allocate_sample(stats["strata"], 40).items() if v} == dict(drawn)
    assert {d for d, r in rows.items() if r["selected_reason"] == "bad"} <= set(sample["doc_id"])
    card = DatasetCard.load(dest / "README.md")
    assert card.data.to_dict()["configs"][0]["config_name"] == "sample"
    assert f"| documents in / out | {stats['documents_in']:,} / {stats['documents_out']:,} |" in card.text
    # The card's languages: those the run identified above 2% of the documents, English first.
    share = {c: n / stats["documents_in"] for c, n in stats["languages"].items()}
    assert card.data.to_dict()["language"] == sorted((c for c, v in share.items() if v >= 0.02), key=lambda c: (-share[c], c))
    assert card.data.to_dict()["language"][0] == "en" and "English (`en`)" in card.text
    page = write_report(out, stats).read_text()
    assert f"en {stats['languages']['en']:,} ({stats['selected_by_language'].get('en', 0):,})" in page
    assert page.count("<div class='doc'>") == 3 and page.count("data:image/png;base64,") == 4
