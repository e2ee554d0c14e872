"""Selection decisions and pause points: seeded, order-independent, distributed as specified."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from annotator.config import SelectionConfig
from annotator.generation import cut_to_tokens, parse_reply, pause_point
from annotator.reflection_prompt import pause_fraction_from_uniform, sample_pause_fraction
from annotator.selection import SelectForReflection, TokenTotals, sample_probability
from annotator.tokens import load_tokenizer


def test_pause_point_distribution_matches_ramp_then_uniform():
    # The density rises linearly to x=0.2 and is flat after, so P(x<0.2) = 0.1/0.9 = 1/9 and
    # P(x<0.1) = 1/36; on [0.2,1] the CDF is linear. Kolmogorov-Smirnov on 50k seeded points.
    xs = np.sort([sample_pause_fraction(7, f"doc-{i}") for i in range(50_000)])
    cdf = np.where(xs < 0.2, (xs / 0.2) ** 2 / 9, 1 / 9 + (xs - 0.2) / 0.9)
    empirical = np.arange(1, len(xs) + 1) / len(xs)
    assert np.max(np.abs(empirical - cdf)) < 1.36 / np.sqrt(len(xs))  # 95% KS bound
    assert abs(np.mean(xs < 0.1) - 1 / 36) < 0.004
    assert xs.min() >= 0 and xs.max() <= 1
    assert pause_fraction_from_uniform(1 / 9) == pytest.approx(0.2)


def test_pause_point_is_seeded_per_document():
    assert sample_pause_fraction(0, "a") == sample_pause_fraction(0, "a")
    assert sample_pause_fraction(0, "a") != sample_pause_fraction(1, "a")


def test_pause_point_splits_text_at_a_token_boundary():
    tok = load_tokenizer("builtin:smollm2-135m-instruct")
    text = "The quick brown fox jumps over the lazy dog. It was not amused, and said so loudly."
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    p = pause_point(text, enc["offset_mapping"], 0.5, max_prefix_tokens=4)
    assert p.token_index == round(0.5 * len(enc["input_ids"]))
    assert tok(text[: p.char_index], add_special_tokens=False)["input_ids"] == enc["input_ids"][: p.token_index]
    assert len(tok(p.prompt_prefix, add_special_tokens=False)["input_ids"]) <= 5  # cut to the last 4 tokens
    assert text[: p.char_index].endswith(p.prompt_prefix)


def test_reflection_cut_to_token_budget():
    tok = load_tokenizer("builtin:smollm2-135m-instruct")
    long = "I notice that this text is careful and kind. " * 40
    cut = cut_to_tokens(long, tok, 128)
    assert len(tok(cut, add_special_tokens=False)["input_ids"]) <= 128
    assert long.startswith(cut) and len(cut) > 100


def test_parse_reply_drops_unknown_citations_and_rejects_empty():
    tok = load_tokenizer("builtin:smollm2-135m-instruct")
    fields, status = parse_reply(
        '{"analysis":"a","reflection_1p":"I see [2.1]","reflection_3p":"It sees","citations":["2.1","9.9"]}', tokenizer=tok, max_tokens=128
    )
    assert status == "ok" and fields["citations"] == ["2.1"] and fields["citations_dropped"] == 1
    assert parse_reply('{"analysis":"a","reflection_1p":" ","reflection_3p":"x","citations":[]}', tokenizer=tok, max_tokens=128) == (
        None, "empty_reflection_1p")
    assert parse_reply('{"analysis": "trunc', tokenizer=tok, max_tokens=128) == (None, "unparseable_json")


def _select(cfg: SelectionConfig, totals: TokenTotals, ids, scores, confidence=None):
    stage = SelectForReflection(cfg, probability=sample_probability(cfg, totals))
    confidence = np.ones(len(ids)) if confidence is None else confidence
    out = stage.process(pa.table({
        "doc_id": ids, "safety_score": pa.array(scores, pa.int8()), "safety_confidence": pa.array(confidence, pa.float32()),
    }))
    return out.to_pydict()


def test_token_matched_selection_samples_about_the_bad_token_count():
    rng = np.random.default_rng(0)
    n = 200_000
    ids = [f"d{i}" for i in range(n)]
    scores = np.where(rng.random(n) < 0.03, 4, 0)
    tokens = rng.integers(50, 2000, n)
    totals = TokenTotals(
        documents={s: int((scores == s).sum()) for s in (0, 4)},
        tokens={s: int(tokens[scores == s].sum()) for s in (0, 4)},
    )
    out = _select(SelectionConfig(mode="token_matched", seed=3), totals, ids, scores)
    selected = np.array(out["selected"])
    reasons = np.array(out["selected_reason"])
    assert (reasons[scores == 4] == "bad").all()
    sampled_tokens = tokens[reasons == "token_matched_sample"].sum()
    bad_tokens = tokens[scores == 4].sum()
    assert abs(sampled_tokens / bad_tokens - 1) < 0.05
    # order-independent: the same document gets the same decision in another batch
    again = _select(SelectionConfig(mode="token_matched", seed=3), totals, ids[::-1], scores[::-1])
    assert np.array_equal(np.array(again["selected"])[::-1], selected)


def test_random_fraction_and_filtered_baseline():
    ids = [f"d{i}" for i in range(20_000)]
    scores = [5 if i % 10 == 0 else 0 for i in range(20_000)]
    totals = TokenTotals(documents={}, tokens={})
    frac = _select(SelectionConfig(mode="random_fraction", fraction=0.1, seed=1), totals, ids, scores)
    assert abs(np.mean(frac["selected"]) - 0.1) < 0.01
    base = _select(SelectionConfig(mode="filtered_baseline"), totals, ids, scores)
    assert not any(base["selected"])
    assert base["selected_reason"].count("dropped_bad") == 2000


def test_min_confidence_turns_unsure_bad_scores_into_not_bad():
    ids = ["a", "b", "c"]
    totals = TokenTotals(documents={}, tokens={})
    out = _select(SelectionConfig(mode="random_fraction", fraction=0.0, min_confidence=0.6), totals, ids, [4, 4, 0],
                  confidence=[0.9, 0.4, 0.9])
    assert out["is_bad"] == [True, False, False]
