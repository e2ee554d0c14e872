"""Where and how a run writes (shards, token streams, tokenizer), and publishing to the Hub."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from annotator.config.base import Section
from annotator.config.generation import TemplateConfig


class OutputConfig(Section):
    path: str = Field(
        description="Output directory (created), or an object-storage prefix (s3://bucket/prefix, or any fsspec filesystem; credentials from the environment): text shards in `shards/`, token streams in `tokenized/`, the extended tokenizer in `tokenizer/`, statistics in `stats.json`."
    )
    tokenizer: str = Field(
        "builtin:smollm2-135m-instruct",
        description="Target tokenizer of the training data (independent of the generator): a Hub id (HuggingFaceTB/SmolLM2-1.7B), a local directory, or builtin:...; token counts, pause points, the budget and selection use it.",
    )
    eos_token: str = Field(
        "<|endoftext|>", description="End-of-document token of the training data (SmolLM2: <|endoftext|> = id 0, not the instruct default <|im_end|>)."
    )
    layout: Literal["windows", "documents"] = Field(
        "windows",
        description="windows: annotated documents one per seq_length+1 window (content clipped, reflection spliced, EOS, padding) plus a dense-packed compact stream of the rest; documents: one sequence per document, EOS appended.",
    )
    seq_length: int = Field(2048, ge=64, description="Training sequence length; a window holds seq_length + 1 tokens.")
    voices: list[Literal["1p", "3p"]] = Field(
        default_factory=lambda: ["1p"],
        description="Reflection voices written as training streams (one annotated stream per voice, same windows); the first is the shards' training_text.",
    )
    clipped_tail: Literal["drop", "compact"] = Field(
        "drop", description="windows: tokens of an annotated document past the kept content are dropped (the method), or packed into the compact stream."
    )
    pad_token_id: int | None = Field(None, ge=0, description="Padding id of annotated windows; null: the EOS id.")
    template: TemplateConfig = Field(default_factory=TemplateConfig, description="Template around reflections.")
    overwrite: bool = Field(False, description="Replace an existing non-empty output directory.")
    compression: str = Field("zstd", description="Parquet compression of the output shards.")
    rows_per_shard: int = Field(50_000, ge=1, description="Target rows per output text shard.")
    shuffle_seed: int = Field(0, description="Seed of the interleaved row order within each shard (and of window order).")
    tokenized: bool = Field(True, description="Also write Megatron indexed-dataset token streams (.bin/.idx) and reflection masks.")
    keep_work: bool = Field(
        False, description="Keep `_work/` (the scored corpus and cached generations) after a successful run; manifests are always kept."
    )

    @field_validator("path")
    @classmethod
    def _writable_path(cls, path: str) -> str:
        from annotator.core.storage import check_writable_url

        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path):
            check_writable_url(path)
            rest = path.split("://", 1)[1]
            if not rest.strip("/"):
                raise ValueError(f"{path!r} names no bucket")
            if "@" in rest.split("/", 1)[0] or "?" in rest:
                raise ValueError(f"{path!r} must not carry credentials or options: they come from the environment "
                                 "(AWS_* variables, profiles, instance roles), never from a config file")
        if not path.strip():
            raise ValueError("output.path is empty")
        return path

    @field_validator("voices")
    @classmethod
    def _distinct_voices(cls, voices: list[str]) -> list[str]:
        if not voices or len(set(voices)) != len(voices):
            raise ValueError(f"voices must be a non-empty list of distinct voices, got {voices}")
        return voices


class PublishConfig(Section):
    repo_id: str | None = Field(None, description="Hugging Face dataset repository to publish to (null: do not publish).")
    private: bool = Field(True, description="Create the Hub repository as private.")
    sample_rows: int = Field(2000, ge=1, description="Rows in the published stratified sample.")
    columns: list[str] | None = Field(
        None, description="Columns of the published sample, as an allowlist; null: every column of the shards except local paths (source_file)."
    )
    license: str = Field("other", description="Licence id in the card's metadata (a Hub licence id, or other).")
    license_name: str | None = Field(None, description="With license other: its name (default source-licences).")
    license_link: str | None = Field(None, description="With license other: where its terms are (default: a LICENSE.md the publisher writes).")
    language: list[str] | None = Field(
        None, description="Language codes the card declares (e.g. [en, fr]); null: none declared, as nothing here identifies languages."
    )


class RayConfig(Section):
    autoscaling: bool = Field(
        False, description="The cluster adds nodes on demand (cluster.yaml): stage reservations are not checked against the cluster at start."
    )
    address: str | None = Field(
        None, description="Ray cluster address; null uses RAY_ADDRESS or the cluster of `ray job submit`, else starts a local one."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started Ray instance (null: all).")
    object_store_memory_gb: float | None = Field(None, gt=0, description="Object store size of a locally started Ray instance.")
    worker_logs_to_driver: bool = Field(
        False, description="Copy every worker's output (vLLM engines, replicas) to this console; off: it stays in Ray's log files (the run prints where)."
    )
    progress_interval_s: float = Field(
        30.0, gt=0, description="Seconds between one-line progress logs when stdout is not a terminal (e.g. `ray job submit` logs)."
    )
