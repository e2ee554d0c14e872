"""Persona-binding SFT data settings (`pipelines/spp_sft.py`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from annotator.config.base import Section


class SftSourceConfig(Section):
    name: str = Field(description="Source name, recorded in every SFT row's `source` (distinct per source).")
    path: str = Field(description="Parquet prompts: a file, folder or glob, local or a URL (hf://datasets/..., s3://) read through fsspec.")
    prompt_column: str = Field("text", description="Column holding the user prompt.")
    id_column: str | None = Field(None, description="Column holding a row id; null: the row's position in the source (files sorted, row order).")
    category_column: str | None = Field(None, description="Column recorded as each row's `category` (e.g. the source's harm category); null: none.")
    harm_category: Literal["harmful", "benign", "adversarial_harmful", "adversarial_benign", "unknown"] = Field(
        "unknown", description="Which screening hint goes in front of this source's prompts (unknown: no hint); recorded as `harm_category`."
    )
    weight: float = Field(1.0, gt=0, description="Share of `sft.prompts` drawn from this source, relative to the other sources' weights.")
    where: dict[str, list[Any]] = Field(
        default_factory=dict, description="Keep only rows whose column holds one of the listed values, e.g. {label: [1], source: [aart]}."
    )
    max_chars: int = Field(4000, ge=1, description="Prompts longer than this (in characters) are not drawn.")


class SftConfig(Section):
    sources: list[SftSourceConfig] = Field(default_factory=list, description="Prompt datasets of `pipelines/spp_sft.py`, drawn by weight.")
    prompts: int = Field(300, ge=1, description="Prompts drawn in all (without duplicates, capped at what the sources hold).")
    seed: int = Field(0, description="Seed of the draw, the multi-turn and canary choices and every request's sampling seed.")
    pack: str = Field("sft-v1", description="The assistant's prompt pack (fields analysis, cited, uncited): a built-in name or a path.")
    followup_pack: str | None = Field(None, description="The simulated user's prompt pack for follow-up turns; null: `followup.yaml` beside the SFT pack.")
    multi_turn_fraction: float = Field(0.0, ge=0, le=1, description="Share of conversations that get follow-up user turns (seeded per prompt).")
    max_followups: int = Field(2, ge=1, description="A multi-turn conversation gets 1 to this many follow-up turns (seeded per prompt).")
    batch_size: int = Field(
        32, ge=1, description="Conversations per engine batch (the grain of resume; part of the fingerprint, as vLLM numerics depend on the batch)."
    )
    max_output_tokens: int = Field(512, ge=16, description="Generated-token cap of one assistant reply (analysis, cited and uncited together).")
    followup_max_tokens: int = Field(128, ge=8, description="Generated-token cap of one simulated follow-up user message.")
    max_citations: int = Field(3, ge=0, description="A `cited` rendering with more distinct section markers than this fails (too_many_citations).")
    canary_fraction: float = Field(
        0.1, ge=0, le=1, description="Share of conversations asked to weave in one `sft_action: inject` canary of generation.canaries.file."
    )
    taxonomy_terms: list[str] = Field(
        default_factory=lambda: ["constitution", "charter", "guideline", "guidelines", "principle", "principles", "section", "my values"],
        description="Words the `uncited` rendering must not contain (case-insensitive, whole words): it reads as if no charter exists.",
    )
    min_rendering_overlap: float = Field(
        0.5, ge=0, le=1,
        description="Least word overlap (Jaccard of word sets, markers removed) of `uncited` with `cited`; below it the renderings differ in substance (renderings_differ).",
    )
    identity_leak_terms: list[str] = Field(
        default_factory=lambda: ["SmolLM", "Hugging Face", "HuggingFace"],
        description="Names of the generator itself; a rendering that contains one fails (identity_leak).",
    )

    @field_validator("sources")
    @classmethod
    def _distinct_names(cls, sources: list[SftSourceConfig]) -> list[SftSourceConfig]:
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be distinct, got {names}")
        return sources
