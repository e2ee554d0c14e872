"""Selection decisions: seeded, order-independent, token-matched as specified."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from annotator.config import SelectionConfig
from annotator.score.selection import SelectForReflection, TokenTotals, sample_probability


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
