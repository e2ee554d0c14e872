"""Selection: which documents get a reflection (or are dropped), decided from the score columns.

Decisions are pure functions of (seed, doc_id) and a sampling probability computed once from
corpus-level token totals, so they do not depend on batch order, worker count or restarts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from annotator.config import SelectionConfig
from annotator.core.seeding import unit_hash
from annotator.core.stages import Resources, Stage

BAD = "bad"
MATCHED_SAMPLE = "token_matched_sample"
RANDOM_SAMPLE = "random_fraction"
NOT_SELECTED = "not_selected"
DROPPED_BAD = "dropped_bad"


@dataclass(frozen=True)
class TokenTotals:
    """Corpus totals from the scoring pass, per safety score. `unconfident_tokens`: per bad score,
    the tokens of documents below `min_confidence`, which selection does not treat as bad."""

    documents: dict[int, int]
    tokens: dict[int, int]
    unconfident_tokens: dict[int, int] = field(default_factory=dict)

    def split(self, threshold: int) -> tuple[int, int]:
        """(tokens of documents selection treats as bad, tokens of all others)."""
        bad = sum(t - self.unconfident_tokens.get(s, 0) for s, t in self.tokens.items() if s >= threshold)
        return bad, sum(self.tokens.values()) - bad


def sample_probability(cfg: SelectionConfig, totals: TokenTotals) -> float:
    """Probability with which each non-bad document is selected."""
    if cfg.mode == "random_fraction":
        return cfg.fraction
    if cfg.mode == "filtered_baseline":
        return 0.0
    bad_tokens, other_tokens = totals.split(cfg.bad_threshold)
    if other_tokens == 0:
        return 0.0
    return min(1.0, cfg.matched_token_ratio * bad_tokens / other_tokens)


class SelectForReflection(Stage):
    """Adds `is_bad`, `selected` and `selected_reason` (bad / token_matched_sample /
    random_fraction / not_selected / dropped_bad)."""

    name = "select"
    reads = ("doc_id", "safety_score", "safety_confidence")
    adds = ("is_bad", "selected", "selected_reason")

    def __init__(self, cfg: SelectionConfig, *, probability: float):
        self.cfg = cfg
        self.probability = probability
        self.resources = Resources(num_cpus=0.5, batch_size=4096)

    def decide(self, doc_id: str, score: int, *, confidence: float) -> tuple[bool, bool, str]:
        is_bad = score >= self.cfg.bad_threshold and confidence >= self.cfg.min_confidence
        mode = self.cfg.mode
        if mode == "filtered_baseline":
            return is_bad, False, DROPPED_BAD if is_bad else NOT_SELECTED
        sampled = unit_hash("select", self.cfg.seed, doc_id) < self.probability
        if mode == "random_fraction":
            return is_bad, sampled, RANDOM_SAMPLE if sampled else NOT_SELECTED
        if is_bad:
            return True, True, BAD
        return False, sampled, MATCHED_SAMPLE if sampled else NOT_SELECTED

    def process(self, batch: pa.Table) -> pa.Table:
        decisions = [
            self.decide(doc_id, score, confidence=confidence)
            for doc_id, score, confidence in zip(
                batch.column("doc_id").to_pylist(),
                batch.column("safety_score").to_pylist(),
                batch.column("safety_confidence").to_pylist(),
            )
        ]
        is_bad, selected, reason = zip(*decisions) if decisions else ((), (), ())
        return (
            batch.append_column("is_bad", pa.array(is_bad, pa.bool_()))
            .append_column("selected", pa.array(selected, pa.bool_()))
            .append_column("selected_reason", pa.array(reason, pa.string()))
        )
