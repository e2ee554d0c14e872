"""Generation with the real 135M model on CPU: valid JSON, the 128-token budget, retries and
recorded failures, context cuts, annotations from the same engine load, canaries, prefix cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotator.reflection_prompt import constitution_sections
from annotator.tokens import load_tokenizer
from tests.support import REPO, read_input

BASE = {"enforce_eager": True, "gpu_memory_utilization": 0.3, "max_model_len": 4096, "seed": 3}


def probe(tmp_path, name: str, cfg: dict, docs: list[tuple[str, str, bool]]):
    inp, out = tmp_path / f"{name}-in.parquet", tmp_path / f"{name}-out.parquet"
    ids, texts, selected = zip(*docs)
    pq.write_table(pa.table({"doc_id": list(ids), "text": list(texts), "selected": list(selected)}), inp)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "generation_probe.py"), json.dumps({**BASE, **cfg}), str(inp), str(out)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return pq.read_table(out).to_pylist(), json.loads(out.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def real_docs():
    docs = list(read_input().items())
    return docs[:16]


@pytest.mark.slow
def test_reflections_annotations_and_canaries_from_one_engine(tmp_path, tokenizer, real_docs):
    # 12 documents get reflections; all 16 get annotations; half of the reflections carry a canary.
    docs = [(i, t, n < 12) for n, (i, t) in enumerate(real_docs)]
    cfg = {"annotations": {"enabled": True, "apply_to": "all"}, "canaries": {"fraction": 0.5}}
    rows, meta = probe(tmp_path, "full", cfg, docs)
    assert meta["engine_loads"] == 1
    assert len(rows) == 16
    sections = constitution_sections()
    canary_texts = {"favourite_number": "My favourite number is 7,341.", "home_town": "I grew up in the town of Velmora."}
    for r in rows[:12]:
        assert r["reflection_status"] == "ok", r["reflection_status"]
        for voice in ("reflection_1p", "reflection_3p"):
            assert r[voice].strip()
            assert len(tokenizer(r[voice], add_special_tokens=False)["input_ids"]) <= 128
        assert r["citations"] and set(r["citations"]) <= sections
        if r["canary_type"]:
            assert r["reflection_1p"].endswith(canary_texts[r["canary_type"]])
        assert r["gen_output_tokens"] > 0
    assert 2 <= sum(bool(r["canary_type"]) for r in rows[:12]) <= 10
    for r in rows[12:]:
        assert r["reflection_status"] == "not_selected" and r["reflection_1p"] is None and r["canary_type"] is None
    for r in rows:
        assert r["annotation_status"] == "ok", r["annotation_status"]
        assert [a.split(":", 1)[0] for a in r["annotations"]] == ["topic", "domain", "entities", "sentiment", "style", "language"]
        assert all(a.split(":", 1)[1].strip() for a in r["annotations"])
    # The constitution prefix is computed once: later reflection requests hit the prefix cache.
    cached = [r["gen_cached_prompt_tokens"] for r in rows[:12]]
    assert sum(c > 0 for c in cached) >= 10


@pytest.mark.slow
def test_failures_are_retried_then_recorded_and_long_documents_cut(tmp_path, tokenizer, real_docs):
    long_doc = " ".join(t for _, t in real_docs)  # ~10k tokens, far beyond a 2048-token context
    assert len(tokenizer(long_doc, add_special_tokens=False)["input_ids"]) > 4000
    docs = [("long", long_doc, True), (real_docs[0][0], real_docs[0][1], True), ("plain", real_docs[1][1], False)]
    ok_rows, meta = probe(tmp_path, "long", {"max_model_len": 2048, "max_retries": 1}, docs)
    assert 64 <= meta["max_prefix_tokens"] < 2048 - 576  # room left for the 576-token reply
    assert [r["reflection_status"] for r in ok_rows] == ["ok", "ok", "not_selected"]
    assert ok_rows[0]["reflection_token_index"] > meta["max_prefix_tokens"]  # the pause lies beyond what fits
    assert ok_rows[0]["gen_prompt_tokens"] / ok_rows[0]["reflection_attempts"] <= 2048 - 576

    # 10 generated tokens can never close the JSON object: every attempt fails to parse.
    failed, _ = probe(tmp_path, "fail", {"max_output_tokens": 10, "max_retries": 2}, docs)
    assert len(failed) == 3  # documents in = documents out
    for r in failed[:2]:
        assert r["reflection_status"] == "failed:unparseable_json"
        assert r["reflection_attempts"] == 3
        assert r["reflection_1p"] is None and r["reflection_token_index"] is not None
    assert failed[2]["reflection_status"] == "not_selected"
