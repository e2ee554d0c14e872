"""Pass 1 settings: what to read, how to score safety, and which documents are selected."""

from __future__ import annotations

from pathlib import Path

from typing import Literal

from pydantic import Field, field_validator, model_validator

from annotator.config.base import Section


class InputConfig(Section):
    paths: list[str] = Field(
        description="Parquet inputs: files, directories, globs, or URLs (s3://, gs://, hf://datasets/...) passed to Ray/fsspec."
    )
    text_column: str = Field("text", description="Column holding the document text.")
    id_column: str | None = Field(
        "id", description="Column holding a document id; null (or a missing column) derives a stable id from the text."
    )
    limit: int | None = Field(None, ge=1, description="Read at most this many documents (for demos and smoke runs).")
    rows_per_unit: int = Field(
        10_000, ge=1,
        description=(
            "Rows per work unit (whole row groups of one file, so at least one row group): the grain of resume, "
            "output shard names and manifests; a finalize task holds one unit in memory."
        ),
    )
    unit_bytes: int | None = Field(
        256 * 2**20, ge=1,
        description=(
            "A unit also ends once its row groups hold this many bytes uncompressed (from the Parquet footers), so a task's "
            "memory is bounded however large the documents are. null: rows only (what runs written before this setting used)."
        ),
    )
    max_row_group_bytes: int | None = Field(
        2**30, ge=1,
        description=(
            "A file with a row group over this many bytes uncompressed is rejected at planning (rejects/files.jsonl): a row "
            "group is read whole, so it cannot be split into bounded units. Rewrite such a file with smaller row groups. null: no cap."
        ),
    )
    max_document_chars: int = Field(
        1_000_000, ge=1, description="Documents longer than this (in characters) are quarantined in rejects/ as too_long."
    )
    reject_duplicate_ids: bool = Field(
        True, description="A document id seen earlier in the input (file order, row order) is quarantined as duplicate_id."
    )

    @field_validator("paths")
    @classmethod
    def _non_empty(cls, paths: list[str]) -> list[str]:
        if not paths:
            raise ValueError("at least one input path is required")
        return paths


class CascadeConfig(Section):
    model: str | None = Field(
        None,
        description="transformers 6-label classifier (directory or Hub id) that rescores the documents the fastText model scores >= `threshold`; null = no cascade.",
    )
    version: str = Field("cascade", description="Recorded in `safety_model` after the fastText version: `<version>+<this>@<threshold>`.")
    threshold: int = Field(2, ge=1, le=5, description="fastText score at or above which a document is rescored by the transformers model.")


DEFAULT_MODEL = "classifiers/models/safety-fasttext-v3.ftz"
# The precision stage trained with the default model, found beside it.
DEFAULT_PRECISION = "safety-fasttext-v3-precision.ftz"


class PrecisionConfig(Section):
    model: str | None = Field(
        "default",
        description="fastText backend: a second binary fastText model (with its .calibration.json) that rescores the documents the first scores "
                    ">= `threshold`, trained on hard cases (benign tasks, safe uses of harm words, refusals, reporting). `default`: v3's "
                    "precision stage (beside the model) when `classifier.model` is v3, none after any other model; a file; null = off.",
    )
    version: str = Field("precision", description="Recorded in `safety_model` after the first model's version: `<version>+<this>@<threshold>`.")
    threshold: int = Field(2, ge=1, le=5, description="First-stage score at or above which the precision model decides the document.")


class ClassifierConfig(Section):
    backend: Literal["fasttext", "transformers"] = Field(
        "fasttext", description="Safety scorer: a fastText model file, or any 6-label transformers sequence classifier."
    )
    model: str = Field(
        DEFAULT_MODEL,
        description="fastText: model file (a binary model's `.calibration.json` beside it maps P(harmful) to 0-5). transformers: model directory or Hub id (e.g. locuslab/safety-classifier_gte-large-en-v1.5).",
    )
    version: str = Field("safety-fasttext-v3", description="Version string recorded in `safety_model` for every document.")
    batch_size: int = Field(1024, ge=1, description="Documents per scoring (and token-counting) call.")
    concurrency: int = Field(1, ge=1, description="transformers: scoring actors (one model load each). fastText runs in pass 1's tasks.")
    num_cpus: float = Field(
        1.0, gt=0,
        description="CPUs per pass-1 task (one task reads, counts, scores with fastText and writes one unit); transformers: also per scoring actor.",
    )
    num_gpus: float = Field(0, ge=0, description="GPUs per scoring actor (transformers backend).")
    max_length: int = Field(2048, ge=8, description="transformers: inputs are cut at this many tokens (and at the model's limit).")
    micro_batch_size: int = Field(32, ge=1, description="transformers: texts per forward pass, sorted by length.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="transformers on GPU: weights dtype (auto = bfloat16); CPU always runs float32."
    )
    trust_remote_code: bool = Field(False, description="transformers: allow model code from the Hub. Off unless set here.")
    precision: PrecisionConfig = Field(
        default_factory=PrecisionConfig,
        description="fastText backend: the precision stage, on by default (the transformers backend ignores it).",
    )
    cascade: CascadeConfig = Field(
        default_factory=CascadeConfig,
        description="fastText first, a transformers model only on documents above a low fastText score (max_length, micro_batch_size, num_gpus, dtype apply to it).",
    )

    @model_validator(mode="after")
    def _default_precision_follows_the_default_model(self) -> "ClassifierConfig":
        if self.precision.model == "default":
            first = Path(self.model)
            default = self.backend == "fasttext" and first.name == Path(DEFAULT_MODEL).name
            self.precision.model = str(first.with_name(DEFAULT_PRECISION)) if default else None
        return self

    @model_validator(mode="after")
    def _cascade_starts_with_fasttext(self) -> "ClassifierConfig":
        if self.cascade.model is not None and self.backend != "fasttext":
            raise ValueError(f"cascade.model: a cascade starts with the fastText scorer, so backend must be fasttext (got {self.backend})")
        return self


class SelectionConfig(Section):
    mode: Literal["token_matched", "random_fraction", "filtered_baseline"] = Field(
        "token_matched",
        description=(
            "token_matched: every bad document plus a seeded sample of the others with about as many tokens; "
            "random_fraction: a seeded random `fraction` of all documents; filtered_baseline: drop bad documents, no reflections."
        ),
    )
    bad_threshold: int = Field(3, ge=0, le=5, description="A document with safety_score >= this counts as bad.")
    min_confidence: float = Field(
        0.0, ge=0, le=1, description="A bad score whose safety_confidence is below this does not count as bad."
    )
    matched_token_ratio: float = Field(
        1.0, gt=0, description="token_matched: tokens of sampled non-bad documents per token of bad documents."
    )
    fraction: float = Field(0.1, ge=0, le=1, description="random_fraction: share of documents selected.")
    seed: int = Field(0, description="Seed of every random choice in selection.")
    languages: list[str] = Field(
        default_factory=list,
        description="Only documents identified as one of these languages (the `language` column's ISO 639 codes, e.g. [en, de]) are "
                    "selected; the others stay plain text (`selected_reason: other_language`). Empty: every language.",
    )
    stratify: Literal["none", "language"] = Field(
        "none",
        description="token_matched: language matches the sample within each language (each language's non-bad documents are sampled "
                    "to that language's bad tokens), so the annotated share follows each language's own bad share.",
    )

    @field_validator("languages")
    @classmethod
    def _language_codes(cls, codes: list[str]) -> list[str]:
        bad = [c for c in codes if not (2 <= len(c) <= 3 and c.isalpha() and c.islower())]
        if bad:
            raise ValueError(f"languages are ISO 639 codes as in the language column (en, de, ceb), got {bad}")
        return codes
