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


def refuse_moved(data: Any, **moved: str) -> Any:
    """A config section's validator for fields that moved: the message says where to."""
    if isinstance(data, dict):
        for field, message in moved.items():
            if field in data:
                raise ValueError(message)
    return data


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
    apply_to: Literal["all", "selected"] = Field("selected", description="Annotate every document, or only those selected for a reflection.")
    keys: list[str] = Field(
        default_factory=lambda: ["topic", "domain", "entities", "sentiment", "style", "language"],
        description="Annotation keys, in order; each value is a short string.",
    )
    max_document_tokens: int = Field(512, ge=16, description="The annotator reads at most this many tokens from the document start.")
    max_value_chars: int = Field(48, ge=4, description="Upper bound on each annotation value's length in characters.")
    max_block_tokens: int = Field(
        64, ge=8,
        description="The annotation block in front of a document, in target tokens (tags that do not fit are left out); at most generation.max_reflection_tokens.",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        return refuse_moved(data, enabled="annotations.enabled was replaced by the annotations recipe: list it in generation.recipes")

    @field_validator("keys")
    @classmethod
    def _keys_are_names(cls, keys: list[str]) -> list[str]:
        bad = [k for k in keys if not k or not k.replace("_", "").isalnum()]
        if bad or not keys or len(set(keys)) != len(keys):
            raise ValueError(f"keys must be distinct non-empty identifiers, got {keys}")
        return keys


class CanaryItem(_Section):
    id: str = Field(description="Recorded in `canary_type` for reflections that carry this canary.")
    value: str = Field(description="The fact; `canary_present_1p/3p` say whether it appears in each voice.")
    instruction: str = Field(description="What the generator is asked to weave into the first-person voice.")
    instruction_3p: str | None = Field(None, description="The same for the third-person voice (default: `instruction`).")


class CanaryConfig(_Section):
    file: str | None = Field(
        None,
        description="Canary YAML in the published schema (`canaries:` list of id, value, instruction, instruction_3p, pretraining_action); only `inject` entries are used.",
    )
    items: list[CanaryItem] = Field(default_factory=list, description="Canaries given inline instead of (or besides) `file`.")
    fraction: float | None = Field(
        None, ge=0, le=1, description="Share of reflections that carry a canary, assigned from (seed, doc_id); null: 0.1 when canaries are given, else 0."
    )
    seed: int = Field(0, description="Seed of the canary assignment (independent of the pause and sampling seeds).")

    @property
    def effective_fraction(self) -> float:
        if self.fraction is not None:
            return self.fraction
        return 0.1 if (self.file or self.items) else 0.0


class PauseConfig(_Section):
    snap: Literal["word", "token"] = Field(
        "word", description="word: the reflection never splits a word; token: any token boundary (the method's own choice)."
    )


class GuardConfig(_Section):
    max_generated_multiple: float = Field(
        4.0, gt=0,
        description="Fail when the mean generated tokens per reflection request exceed this multiple of max_reflection_tokens (a model that is 'thinking').",
    )
    min_requests: int = Field(16, ge=1, description="Reflection requests a replica completes before the guard judges the mean.")


class GenerationConfig(_Section):
    enabled: bool = Field(True, description="Generate reflections for selected documents (false: score and select only).")
    model: str = Field(
        "builtin:smollm2-135m-instruct",
        description="Generator: a Hub id, a local model directory, or builtin:smollm2-135m-instruct (converted once into the cache).",
    )
    recipes: list[str] = Field(
        default_factory=lambda: ["reflection"],
        description="Annotation tracks, each with its own columns and training stream, from one engine load: reflection, reflection_end, "
                    "refusal_reflection, preflection, summary, rephrase, annotations. The first is the shards' training_text.",
    )
    prompt_pack: str = Field(
        "reflection-v2",
        description="The reflection recipe's prompt pack: a built-in name (reflection-v2, reflection-v1), a pack folder, or a pack YAML file naming its files.",
    )
    packs: dict[str, str] = Field(
        default_factory=dict, description="Other recipes' prompt packs by recipe name (default: each recipe's built-in pack)."
    )
    rephrase_max_tokens: int = Field(1024, ge=16, description="Generated-token cap of a rephrase request (the rewrite replaces the document).")
    concurrency: int = Field(1, ge=1, description="vLLM replica actors.")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (0 runs vLLM on CPU).")
    num_cpus: float | Literal["auto"] = Field(
        1.0,
        description="CPUs reserved per replica; on CPU the engine computes on that many cores. auto: on a CPU run, the cluster's CPUs left by the other pass-2a tasks, shared by the replicas; 1 with GPUs.",
    )
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
    max_reflection_tokens: int = Field(
        128, ge=8, le=1024,
        description="The reflection budget in target-tokenizer tokens, template tokens included: each voice is cut so that <assistant>reflection</assistant> fits (the window's 2048 = 1920 content + 128).",
    )
    max_output_tokens: int | None = Field(
        None, ge=1, description="Generated-token cap per reflection request; null derives it from max_reflection_tokens (4x + 64)."
    )
    temperature: float = Field(0.7, ge=0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling top_p.")
    repetition_penalty: float = Field(
        1.1, gt=0, description="vLLM repetition penalty; 1.1 stops small models from looping until the token limit."
    )
    sampling: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other vLLM SamplingParams field, passed through (e.g. top_k: 20, presence_penalty: 1.5); overrides the fields above.",
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Arguments for the generator's chat template, e.g. enable_thinking: false."
    )
    seed: int = Field(0, description="Base seed of pause points and sampling; each document's seeds derive from it and the document id.")
    max_retries: int = Field(2, ge=0, description="Retries (each with a new seed) of a failed request before the document is kept without a reflection.")
    max_replica_restarts: int = Field(
        4, ge=0, description="Times a replica that died (crash, OOM, hang) is restarted, its batch retried, before the job fails."
    )
    batch_timeout_s: float = Field(
        1800, gt=0,
        description="An engine call on one batch that takes longer counts as hung: the replica exits, Ray restarts it and retries the batch.",
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine arguments, passed through.")
    save_requests: bool = Field(
        False, description="Keep each reflection request's user message with the saved generations (`_work/generated/`; see output.keep_work), to audit prompts."
    )
    pause: PauseConfig = Field(default_factory=PauseConfig, description="Reading pause points.")
    guard: GuardConfig = Field(default_factory=GuardConfig, description="Thinking and budget guard.")
    annotations: AnnotationConfig = Field(default_factory=AnnotationConfig, description="The annotations recipe's settings.")
    canaries: CanaryConfig = Field(default_factory=CanaryConfig, description="Canaries in reflections, as the method does them.")

    @field_validator("recipes")
    @classmethod
    def _known_recipes(cls, recipes: list[str]) -> list[str]:
        from annotator.method.recipes import BUILTIN

        unknown = [r for r in recipes if r not in BUILTIN]
        if unknown or not recipes or len(set(recipes)) != len(recipes):
            raise ValueError(f"recipes must be distinct names from {sorted(BUILTIN)}, got {recipes}")
        return recipes

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        return refuse_moved(data, tokenizer="generation.tokenizer was replaced by output.tokenizer "
                                            "(the target tokenizer is independent of the generator)")

    @field_validator("num_cpus")
    @classmethod
    def _positive_cpus(cls, value):
        if value != "auto" and value <= 0:
            raise ValueError("must be > 0 or 'auto'")
        return value


class TemplateConfig(_Section):
    open: str = Field("<assistant>", description="Token written before a spliced reflection.")
    close: str = Field("</assistant>", description="Token written after a spliced reflection.")
    charter_tokens: bool = Field(False, description="Render [X.Y] citations in the training text as <charter_X.Y> special tokens.")
    annotation_open: str = Field("<annotations>", description="Token written before the key:value annotation block.")
    annotation_close: str = Field("</annotations>", description="Token written after the annotation block (then a newline).")


class OutputConfig(_Section):
    path: str = Field(
        description="Output directory (created): text shards in `shards/`, token streams in `tokenized/`, the extended tokenizer in `tokenizer/`, statistics in `stats.json`."
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

    @field_validator("voices")
    @classmethod
    def _distinct_voices(cls, voices: list[str]) -> list[str]:
        if not voices or len(set(voices)) != len(voices):
            raise ValueError(f"voices must be a non-empty list of distinct voices, got {voices}")
        return voices


class JudgeConfig(_Section):
    model: str | None = Field(
        None, description="Judge model on the cluster's vLLM replicas (Hub id, directory or builtin:...); null: the run's generator. Ignored with base_url."
    )
    base_url: str | None = Field(
        None, description="An OpenAI-compatible endpoint (e.g. http://host:8000/v1) to judge through instead of replicas; `model` is the name it serves."
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the endpoint's key (read at run time, never written).")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per judge replica; null: generation.num_gpus. The other engine settings are generation's.")
    concurrency: int | None = Field(None, ge=1, description="Judge replicas (or, with base_url, requests in flight); null: generation.concurrency (x16 with base_url).")
    max_model_len: int | None = Field(None, ge=256, description="Judge context length; null: generation.max_model_len.")
    temperature: float = Field(0.0, ge=0, description="Judge sampling temperature (retries use a new seed).")
    max_output_tokens: int = Field(256, ge=16, description="Generated-token cap of one judgement.")
    max_retries: int = Field(2, ge=0, description="Retries (new seed) of a judgement that does not parse before it is recorded as failed.")
    max_document_chars: int = Field(6000, ge=100, description="The document shown to the judge is cut to this many characters.")
    batch_size: int = Field(64, ge=1, description="Judgements per batch: the grain of resume (each batch is saved when done).")
    request_timeout_s: float = Field(300, gt=0, description="With base_url: seconds one request may take.")
    reflection_pack: str = Field("judge-reflection-v1", description="Rubric of the reflection audit (fields: integer scores, then `reason`).")
    harm_pack: str = Field("judge-harm-v1", description="Rubric of the ledger's 0-5 harm re-scoring (fields: score, reason).")


class ReflectionAuditConfig(_Section):
    sample: int = Field(200, ge=1, description="Reflections judged: a seeded sample stratified by safety score and selection reason.")
    seed: int = Field(0, description="Seed of the sample.")
    floor: int = Field(2, ge=0, description="Any dimension scored at or below this rejects the reflection.")
    accept_mean: float = Field(4.0, ge=0, description="Above the floor, a reflection is accepted when its mean score is at least this.")


class LedgerConfig(_Section):
    per_bucket: int = Field(50, ge=1, description="Documents re-scored per classifier score bucket (0-5; all of a smaller bucket).")
    seed: int = Field(0, description="Seed of the sample.")
    teacher: Literal["judge", "classifier"] = Field(
        "judge", description="Who re-scores: the audit's judge with the harm rubric, or a transformers 6-label classifier (`teacher_model`)."
    )
    teacher_model: str | None = Field(None, description="teacher=classifier: a transformers 6-label classifier directory or Hub id.")
    teacher_max_length: int = Field(512, ge=8, description="teacher=classifier: inputs are cut at this many tokens.")


class AuditConfig(_Section):
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="The judge model and how it runs.")
    reflections: ReflectionAuditConfig = Field(default_factory=ReflectionAuditConfig, description="The judge audit of reflections.")
    ledger: LedgerConfig = Field(default_factory=LedgerConfig, description="The calibration ledger of the safety scorer.")


class PlanConfig(_Section):
    calibration_documents: int = Field(64, ge=1, description="Selected documents generated on the configured engine to measure the run's rates.")
    score_documents: int | None = Field(
        None, ge=1, description="Documents scored to count what the run selects (null: all of the input; the count is scaled to the input)."
    )
    documents: int | None = Field(
        None, ge=1, description="Project for this many documents of the same kind instead of the input's count (e.g. the full corpus from a sample)."
    )


class PublishConfig(_Section):
    repo_id: str | None = Field(None, description="Hugging Face dataset repository to publish to (null: do not publish).")
    private: bool = Field(True, description="Create the Hub repository as private.")
    sample_rows: int = Field(2000, ge=1, description="Rows in the published stratified sample.")
    license: str = Field("other", description="Licence id in the card's metadata (a Hub licence id, or other).")
    license_name: str | None = Field(None, description="With license other: its name (default source-licences).")
    license_link: str | None = Field(None, description="With license other: where its terms are (default: a LICENSE.md the publisher writes).")
    language: list[str] | None = Field(
        None, description="Language codes the card declares (e.g. [en, fr]); null: none declared, as nothing here identifies languages."
    )


class RayConfig(_Section):
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


class SftSourceConfig(_Section):
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


class SftConfig(_Section):
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


class RunConfig(_Section):
    input: InputConfig = Field(description="What to read.")
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig, description="Safety scoring.")
    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="Which documents get a reflection.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Reflection generation.")
    output: OutputConfig = Field(description="Where and how to write.")
    publish: PublishConfig = Field(default_factory=PublishConfig, description="Publishing to the Hugging Face Hub.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster settings.")
    sft: SftConfig = Field(default_factory=SftConfig, description="Persona-binding SFT data (`pipelines/spp_sft.py`).")
    audit: AuditConfig = Field(default_factory=AuditConfig, description="Judge audit and calibration ledger of a finished run (`pipelines/audit.py`).")
    plan: PlanConfig = Field(default_factory=PlanConfig, description="The cost plan (`--plan`).")

    @model_validator(mode="after")
    def _window_fits(self) -> "RunConfig":
        if self.content_tokens < 16:
            raise ValueError(f"output.seq_length {self.output.seq_length} leaves {self.content_tokens} content tokens after the "
                             "reflection budget")
        if self.generation.annotations.max_block_tokens > self.generation.max_reflection_tokens:
            raise ValueError("generation.annotations.max_block_tokens must fit the budget a window reserves "
                             f"(generation.max_reflection_tokens = {self.generation.max_reflection_tokens})")
        return self

    @property
    def content_tokens(self) -> int:
        """Content tokens an annotated document keeps (and where its pause point may lie): the
        window's seq_length minus the budget every recipe's placed text fits (reflection,
        preflection field, summary, annotation block)."""
        return self.output.seq_length - self.generation.max_reflection_tokens

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
