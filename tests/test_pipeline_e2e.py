"""End to end on 100 real web documents: real Ray, real fastText, real vLLM on CPU, real model."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from annotator.reflection_prompt import CITATION
from annotator.tokens import load_tokenizer
from annotator.writer import render_citations
from tests.support import read_input, require_shared_data, run_pipeline
from tests.test_writer import check_tokenized

OPEN, CLOSE = "<assistant>", "</assistant>"
LIMIT = 100
# 100 documents hold only 1-3 bad ones; sampling 5x their tokens from the rest gives a dozen
# or so reflections to check while still exercising token-matched selection.
# Small shards and charter tokens exercise the writer: several shards, <charter_X.Y> in the text.
E2E_ARGS = ["--limit", str(LIMIT), "--set", "selection.matched_token_ratio=5", "--set", "output.rows_per_shard=30",
            "--set", "output.template.charter_tokens=true"]


def check_output(out_dir, *, limit: int = LIMIT) -> dict:
    """The checks every end-to-end run must pass; returns the stats for further checks."""
    source = read_input()
    rows = pq.read_table(out_dir / "shards").to_pylist()
    stats = json.loads((out_dir / "stats.json").read_text())

    ids = [r["doc_id"] for r in rows]
    assert len(ids) == limit == stats["documents_in"] == stats["documents_out"]
    assert len(set(ids)) == len(ids)
    assert set(ids) <= set(source)

    tokenizer = load_tokenizer("builtin:smollm2-135m-instruct")
    with_reflection = 0
    for r in rows:
        src = source[r["doc_id"]]
        if not r["selected"]:
            assert r["text"] == src, r["doc_id"]
            assert OPEN not in r["text"]
            continue
        assert r["reflection_status"] == "ok", (r["doc_id"], r["reflection_status"])
        with_reflection += 1
        assert r["text"].count(OPEN) == 1 and r["text"].count(CLOSE) == 1
        before, rest = r["text"].split(OPEN)
        reflection, after = rest.split(CLOSE)
        assert reflection == render_citations(r["reflection_1p"]) and reflection.strip()
        assert not CITATION.search(reflection)  # real citations became <charter_X.Y> tokens
        assert before + after == src
        assert before == src[: r["reflection_char_index"]]
        assert len(tokenizer(before, add_special_tokens=False)["input_ids"]) == r["reflection_token_index"]
        assert len(tokenizer(reflection, add_special_tokens=False)["input_ids"]) <= 128
        assert r["prompt_version"] == "reflect-v1" and r["model"] == "builtin:smollm2-135m-instruct"

    # stats.json agrees with what was written
    assert stats["score_histogram"] == {str(k): v for k, v in Counter(r["safety_score"] for r in rows).items()}
    assert stats["selected_documents"] == sum(r["selected"] for r in rows) == with_reflection
    assert stats["selected_tokens"] == sum(r["token_length"] for r in rows if r["selected"])
    assert stats["tokens_in"] == sum(r["token_length"] for r in rows)
    assert stats["selected_by_reason"] == dict(Counter(r["selected_reason"] for r in rows))
    assert stats["reflection_status"] == dict(Counter(r["reflection_status"] for r in rows))
    bad = [r for r in rows if r["safety_score"] >= 3]
    assert all(r["selected"] and r["selected_reason"] == "bad" for r in bad)
    assert all(r["source_text"] == source[r["doc_id"]] for r in rows)
    assert len(stats["shards"]) == 4  # 100 rows at 30 per shard
    assert check_tokenized(out_dir) == limit
    return stats


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    require_shared_data()
    out = tmp_path_factory.mktemp("e2e") / "out"
    proc = run_pipeline("--config", "configs/demo.yaml", "--output", str(out), *E2E_ARGS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc


@pytest.mark.slow
def test_end_to_end_output_is_exact(demo_run):
    out, _ = demo_run
    stats = check_output(out)
    assert stats["selected_documents"] >= 5, "too few reflections to test anything"
    assert stats["selected_by_reason"].get("token_matched_sample", 0) >= 1


@pytest.mark.slow
def test_end_to_end_prints_summary(demo_run):
    out, proc = demo_run
    assert f"output:      {out / 'shards'}" in proc.stdout
    assert f"documents:   {LIMIT} in, {LIMIT} out" in proc.stdout
    assert "sample:" in proc.stdout


@pytest.mark.slow
def test_existing_output_is_not_overwritten_by_default(demo_run):
    out, _ = demo_run
    proc = run_pipeline("--config", "configs/demo.yaml", "--output", str(out), "--set", "output.overwrite=false", *E2E_ARGS, timeout=120)
    assert proc.returncode == 2
    assert "output.overwrite" in proc.stderr
    assert (out / "stats.json").exists()
