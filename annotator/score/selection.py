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
OTHER_LANGUAGE = "other_language"
# The key of a per-language probability table for languages it does not list.
OTHER = "*"


def add_counts(into: dict[int, int], counts: dict) -> dict[int, int]:
    """Adds `{score: n}` counts (score keys as ints or, from JSON, strings) into `into`."""
    for score, n in counts.items():
        into[int(score)] = into.get(int(score), 0) + n
    return into


@dataclass(frozen=True)
class TokenTotals:
    """Corpus totals from the scoring pass, per safety score. `unconfident_tokens`: per bad score,
    the tokens of documents below `min_confidence`, which selection does not treat as bad."""

    documents: dict[int, int]
    tokens: dict[int, int]
    unconfident_tokens: dict[int, int] = field(default_factory=dict)
    by_language: dict[str, "TokenTotals"] = field(default_factory=dict)  # the same totals per identified language

    def split(self, threshold: int) -> tuple[int, int]:
        """(tokens of documents selection treats as bad, tokens of all others)."""
        bad = sum(t - self.unconfident_tokens.get(s, 0) for s, t in self.tokens.items() if s >= threshold)
        return bad, sum(self.tokens.values()) - bad

    def of_languages(self, languages: list[str]) -> "TokenTotals":
        """The totals of the documents in these languages."""
        parts = [self.by_language[lang] for lang in languages if lang in self.by_language]

        def total(attr: str) -> dict[int, int]:
            out: dict[int, int] = {}
            for part in parts:
                add_counts(out, getattr(part, attr))
            return out

        return TokenTotals(documents=total("documents"), tokens=total("tokens"), unconfident_tokens=total("unconfident_tokens"),
                           by_language={lang: self.by_language[lang] for lang in languages if lang in self.by_language})


def _matched(cfg: SelectionConfig, totals: TokenTotals) -> float:
    bad_tokens, other_tokens = totals.split(cfg.bad_threshold)
    if other_tokens == 0:
        return 0.0
    return min(1.0, cfg.matched_token_ratio * bad_tokens / other_tokens)


def sample_probability(cfg: SelectionConfig, totals: TokenTotals) -> float | dict[str, float]:
    """Probability with which each non-bad document is selected: one number, or with
    `stratify: language` one per language (OTHER for the languages the corpus totals lack)."""
    if cfg.mode == "random_fraction":
        return cfg.fraction
    if cfg.mode == "filtered_baseline":
        return 0.0
    if cfg.languages:
        totals = totals.of_languages(cfg.languages)
    if cfg.stratify == "language":
        return {OTHER: 0.0, **{lang: round(_matched(cfg, t), 12) for lang, t in sorted(totals.by_language.items())}}
    return _matched(cfg, totals)


class SelectForReflection(Stage):
    """Adds `is_bad`, `selected` and `selected_reason` (bad / token_matched_sample /
    random_fraction / not_selected / dropped_bad / other_language). `probability`: one for every
    document, or per language (`sample_probability` with `stratify: language`)."""

    name = "select"
    reads = ("doc_id", "safety_score", "safety_confidence")
    adds = ("is_bad", "selected", "selected_reason")

    def __init__(self, cfg: SelectionConfig, *, probability: float | dict[str, float]):
        self.cfg = cfg
        self.probability = probability
        self.resources = Resources(num_cpus=0.5, batch_size=4096)
        if cfg.languages or cfg.stratify == "language":
            self.reads = (*self.reads, "language")

    def decide(self, doc_id: str, score: int, *, confidence: float, language: str | None = None) -> tuple[bool, bool, str]:
        is_bad = score >= self.cfg.bad_threshold and confidence >= self.cfg.min_confidence
        mode = self.cfg.mode
        if mode == "filtered_baseline":
            return is_bad, False, DROPPED_BAD if is_bad else NOT_SELECTED
        if self.cfg.languages and language not in self.cfg.languages:
            return is_bad, False, OTHER_LANGUAGE
        p = self.probability
        if isinstance(p, dict):
            p = p.get(language, p.get(OTHER, 0.0))
        sampled = unit_hash("select", self.cfg.seed, doc_id) < p
        if mode == "random_fraction":
            return is_bad, sampled, RANDOM_SAMPLE if sampled else NOT_SELECTED
        if is_bad:
            return True, True, BAD
        return False, sampled, MATCHED_SAMPLE if sampled else NOT_SELECTED

    def process(self, batch: pa.Table) -> pa.Table:
        languages = batch.column("language").to_pylist() if "language" in batch.column_names else [None] * batch.num_rows
        decisions = [
            self.decide(doc_id, score, confidence=confidence, language=language)
            for doc_id, score, confidence, language in zip(
                batch.column("doc_id").to_pylist(),
                batch.column("safety_score").to_pylist(),
                batch.column("safety_confidence").to_pylist(),
                languages,
            )
        ]
        is_bad, selected, reason = zip(*decisions) if decisions else ((), (), ())
        return (
            batch.append_column("is_bad", pa.array(is_bad, pa.bool_()))
            .append_column("selected", pa.array(selected, pa.bool_()))
            .append_column("selected_reason", pa.array(reason, pa.string()))
        )
