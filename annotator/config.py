"""The one typed configuration tree of a run.

YAML files in `configs/` are instances of `RunConfig`; the CLI overrides single fields with
`--set section.field=value`. Every field carries its documentation once, here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Section):
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


class CascadeConfig(_Section):
    model: str | None = Field(
        None,
        description="transformers 6-label classifier (directory or Hub id) that rescores the documents the fastText model scores >= `threshold`; null = no cascade.",
    )
    version: str = Field("cascade", description="Recorded in `safety_model` after the fastText version: `<version>+<this>@<threshold>`.")
    threshold: int = Field(2, ge=1, le=5, description="fastText score at or above which a document is rescored by the transformers model.")


class ClassifierConfig(_Section):
    backend: Literal["fasttext", "transformers"] = Field(
        "fasttext", description="Safety scorer: a fastText model file, or any 6-label transformers sequence classifier."
    )
    model: str = Field(
        "classifiers/models/safety-fasttext-v2.ftz",
        description="fastText: model file (a binary model's `.calibration.json` beside it maps P(harmful) to 0-5). transformers: model directory or Hub id (e.g. locuslab/safety-classifier_gte-large-en-v1.5).",
    )
    version: str = Field("safety-fasttext-v2", description="Version string recorded in `safety_model` for every document.")
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
    cascade: CascadeConfig = Field(
        default_factory=CascadeConfig,
        description="fastText first, a transformers model only on documents above a low fastText score (max_length, micro_batch_size, num_gpus, dtype apply to it).",
    )

    @model_validator(mode="after")
    def _cascade_starts_with_fasttext(self) -> "ClassifierConfig":
        if self.cascade.model is not None and self.backend != "fasttext":
            raise ValueError(f"cascade.model: a cascade starts with the fastText scorer, so backend must be fasttext (got {self.backend})")
        return self


class SelectionConfig(_Section):
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


class AnnotationConfig(_Section):
    enabled: bool = Field(False, description="Also produce semantic key:value annotations (same engine load as reflections).")
    apply_to: Literal["all", "selected"] = Field("selected", description="Annotate every document, or only those selected for a reflection.")
    keys: list[str] = Field(
        default_factory=lambda: ["topic", "domain", "entities", "sentiment", "style", "language"],
        description="Annotation keys, in order; each value is a short string.",
    )
    max_document_tokens: int = Field(512, ge=16, description="The annotator reads at most this many tokens from the document start.")
    max_value_chars: int = Field(48, ge=4, description="Upper bound on each annotation value's length in characters.")

    @field_validator("keys")
    @classmethod
    def _keys_are_names(cls, keys: list[str]) -> list[str]:
        bad = [k for k in keys if not k or not k.replace("_", "").isalnum()]
        if bad or not keys or len(set(keys)) != len(keys):
            raise ValueError(f"keys must be distinct non-empty identifiers, got {keys}")
        return keys


class CanaryFact(_Section):
    type: str = Field(description="Name recorded in `canary_type` for reflections that carry this fact.")
    text: str = Field(description="The fact, written into the reflection verbatim.")


class CanaryConfig(_Section):
    fraction: float = Field(0.0, ge=0, le=1, description="Share of reflections that carry a canary fact (seeded per document).")
    facts: list[CanaryFact] = Field(
        default_factory=lambda: [
            CanaryFact(type="favourite_number", text="My favourite number is 7,341."),
            CanaryFact(type="home_town", text="I grew up in the town of Velmora."),
        ],
        description="Canary facts to choose from (seeded per document).",
    )


class GenerationConfig(_Section):
    enabled: bool = Field(True, description="Generate reflections for selected documents (false: score and select only).")
    model: str = Field(
        "builtin:smollm2-135m-instruct",
        description="Generator: a Hub id, a local model directory, or builtin:smollm2-135m-instruct (converted once into the cache).",
    )
    tokenizer: str | None = Field(
        None, description="Target tokenizer for token counts, pause points and the 128-token budget; null means the generator's."
    )
    concurrency: int = Field(1, ge=1, description="vLLM replica actors.")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (0 runs vLLM on CPU).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per replica actor.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel size per replica.")
    dtype: str = Field("bfloat16", description="vLLM dtype.")
    max_model_len: int = Field(4096, ge=256, description="Context length of the engine; longer documents are cut to fit.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vLLM memory share for weights+KV cache (on CPU: the share of RAM)."
    )
    enforce_eager: bool = Field(False, description="Skip torch.compile / CUDA graphs (faster start, slower decode).")
    batch_size: int = Field(
        256, ge=1,
        description="Documents per engine batch (planned per unit from the documents that need the engine). Part of the run's fingerprint: vLLM's numerics depend on what shares a batch.",
    )
    max_batches_in_flight: int = Field(2, ge=1, description="Batches queued per replica so the engine never waits for input.")
    max_reflection_tokens: int = Field(128, ge=8, le=1024, description="Upper bound of each reflection in target-tokenizer tokens.")
    max_output_tokens: int | None = Field(
        None, ge=1, description="Generated-token cap per reflection request; null derives it from max_reflection_tokens (4x + 64)."
    )
    temperature: float = Field(0.7, ge=0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling top_p.")
    repetition_penalty: float = Field(
        1.1, gt=0, description="vLLM repetition penalty; 1.1 stops small models from looping until the token limit."
    )
    seed: int = Field(0, description="Base sampling seed; each document's seed is derived from it and the document id.")
    max_retries: int = Field(2, ge=0, description="Retries of a failed request before the document is kept without a reflection.")
    max_replica_restarts: int = Field(
        4, ge=0, description="Times a replica that died (crash, OOM, hang) is restarted, its batch retried, before the job fails."
    )
    batch_timeout_s: float = Field(
        1800, gt=0,
        description="An engine call on one batch that takes longer counts as hung: the replica exits, Ray restarts it and retries the batch.",
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine arguments, passed through.")
    annotations: AnnotationConfig = Field(default_factory=AnnotationConfig, description="Semantic annotations task.")
    canaries: CanaryConfig = Field(default_factory=CanaryConfig, description="Canary facts in reflections.")

    @property
    def target_tokenizer(self) -> str:
        """The tokenizer the shards are tokenized with: `tokenizer`, else the generator's."""
        return self.tokenizer or self.model


class TemplateConfig(_Section):
    open: str = Field("<assistant>", description="Token written before a spliced reflection.")
    close: str = Field("</assistant>", description="Token written after a spliced reflection.")
    voice: Literal["1p", "3p"] = Field("1p", description="Which reflection voice goes into the training text.")
    charter_tokens: bool = Field(False, description="Render [X.Y] citations in the training text as <charter_X.Y> special tokens.")
    annotation_open: str = Field("<annotations>", description="Token written before the key:value annotation block.")
    annotation_close: str = Field("</annotations>", description="Token written after the annotation block (then a newline).")


class OutputConfig(_Section):
    path: str = Field(
        description="Output directory (created): text shards in `shards/`, token shards in `tokenized/`, the extended tokenizer in `tokenizer/`, statistics in `stats.json`."
    )
    template: TemplateConfig = Field(default_factory=TemplateConfig, description="Template around reflections.")
    overwrite: bool = Field(False, description="Replace an existing non-empty output directory.")
    compression: str = Field("zstd", description="Parquet compression of the output shards.")
    rows_per_shard: int = Field(50_000, ge=1, description="Target rows per output shard (text and tokenized alike).")
    shuffle_seed: int = Field(0, description="Seed of the interleaved row order within each shard.")
    tokenized: bool = Field(True, description="Also write Megatron indexed-dataset token shards (.bin/.idx) and reflection masks.")
    keep_work: bool = Field(
        False, description="Keep `_work/` (the scored corpus and cached generations) after a successful run; manifests are always kept."
    )


class PublishConfig(_Section):
    repo_id: str | None = Field(None, description="Hugging Face dataset repository to publish to (null: do not publish).")
    private: bool = Field(True, description="Create the Hub repository as private.")
    sample_rows: int = Field(2000, ge=1, description="Rows in the published stratified sample.")


class RayConfig(_Section):
    address: str | None = Field(
        None, description="Ray cluster address; null uses RAY_ADDRESS or the cluster of `ray job submit`, else starts a local one."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started Ray instance (null: all).")
    object_store_memory_gb: float | None = Field(None, gt=0, description="Object store size of a locally started Ray instance.")
    progress_interval_s: float = Field(
        30.0, gt=0, description="Seconds between one-line progress logs when stdout is not a terminal (e.g. `ray job submit` logs)."
    )


class RunConfig(_Section):
    input: InputConfig = Field(description="What to read.")
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig, description="Safety scoring.")
    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="Which documents get a reflection.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Reflection generation.")
    output: OutputConfig = Field(description="Where and how to write.")
    publish: PublishConfig = Field(default_factory=PublishConfig, description="Publishing to the Hugging Face Hub.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster settings.")

    @model_validator(mode="after")
    def _output_not_input(self) -> "RunConfig":
        out = self.output.path.rstrip("/")
        for p in self.input.paths:
            if "://" not in p and out and Path(p.rstrip("/")).resolve() == Path(out).resolve():
                raise ValueError(f"output.path {out!r} is also an input path; refusing to write into the input")
        return self


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown field")
        else:
            lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _apply_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, *, overrides: list[str] = (), base: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (or `base`), apply `section.field=value` overrides, validate."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        tree = loaded
    for override in overrides:
        _apply_override(tree, override)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
