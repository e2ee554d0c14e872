"""Generation settings: the engine, recipes and packs, pause points, guards, annotations and canaries."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from annotator.config.base import Section, refuse_moved


class AnnotationConfig(Section):
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


class CanaryItem(Section):
    id: str = Field(description="Recorded in `canary_type` for reflections that carry this canary.")
    value: str = Field(description="The fact; `canary_present_1p/3p` say whether it appears in each voice.")
    instruction: str = Field(description="What the generator is asked to weave into the first-person voice.")
    instruction_3p: str | None = Field(None, description="The same for the third-person voice (default: `instruction`).")


class CanaryConfig(Section):
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


class PauseConfig(Section):
    snap: Literal["word", "token"] = Field(
        "word", description="word: the reflection never splits a word; token: any token boundary (the method's own choice)."
    )


class GuardConfig(Section):
    max_generated_multiple: float = Field(
        4.0, gt=0,
        description="Fail when the mean generated tokens per reflection request exceed this multiple of max_reflection_tokens (a model that is 'thinking').",
    )
    min_requests: int = Field(16, ge=1, description="Reflection requests a replica completes before the guard judges the mean.")


class GenerationConfig(Section):
    enabled: bool = Field(True, description="Generate reflections for selected documents (false: score and select only).")
    model: str = Field(
        "builtin:smollm2-135m-instruct",
        description="Generator: a Hub id, a local model directory, or builtin:smollm2-135m-instruct (converted once into the cache).",
    )
    recipes: list[str] = Field(
        default_factory=lambda: ["reflection"],
        description="Annotation tracks, each with its own columns and training stream, from one engine load: a built-in recipe (reflection, "
                    "reflection_end, refusal_reflection, preflection, summary, rephrase, annotations) or a recipe YAML file (README, "
                    "'Writing a recipe'). The first is the shards' training_text.",
    )
    prompt_pack: str = Field(
        "reflection-v2",
        description="The reflection recipe's prompt pack: a built-in name (reflection-v2, reflection-v1), a pack folder, or a pack YAML file naming its files.",
    )
    packs: dict[str, str] = Field(
        default_factory=dict, description="Other recipes' prompt packs by recipe name (default: each recipe's built-in pack)."
    )
    prompt_layout: Literal["auto", "published", "shared"] = Field(
        "auto",
        description="How each recipe's prompt is laid out. published: system = the pack's method, user = the document and the task "
                    "(the SPP runner's layout). shared: a system block common to the run's packs, the document as its own turn, the "
                    "recipe's task last, so a document's recipes share its prefill (packs without a shared form stay published). "
                    "auto: each pack's own choice (`prompt_layout` in its pack.yaml; a pack given by path is published unless it says so).",
    )
    block_size: int | Literal["auto"] = Field(
        "auto",
        description="Tokens per vLLM KV-cache block, the grain at which requests share a cached prefix. auto: 32 on CPU (vLLM's "
                    "CPU default, 128, makes every request that shares a document recompute up to 127 of its tokens), vLLM's "
                    "default on GPUs.",
    )
    rephrase_max_tokens: int = Field(1024, ge=16, description="Generated-token cap of a rephrase request (the rewrite replaces the document).")
    concurrency: int = Field(1, ge=1, description="vLLM replica actors.")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (0 runs vLLM on CPU).")
    num_cpus: float | Literal["auto"] = Field(
        1.0,
        description="CPUs reserved per replica; on CPU the engine computes on that many cores. auto: on a CPU run, the cluster's CPUs left by the other pass-2a tasks, shared by the replicas; 1 with GPUs.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel size per replica.")
    engine_process: Literal["auto", "inline", "separate"] = Field(
        "auto",
        description="Where a replica's vLLM engine runs. inline: in the replica's own process, on one thread bound to the replica's "
                    "cores (a CPU replica starts ~17 s sooner: no engine and worker processes importing vLLM again). separate: vLLM's "
                    "own engine process (on GPUs its scheduling overlaps the GPU's work). auto: inline on CPU, separate on GPUs or "
                    "when VLLM_CPU_OMP_THREADS_BIND is set. The same batch gives the same text either way.",
    )
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
    reproducible: bool = Field(
        False,
        description="true: a replica runs one engine batch at a time on a prefix cache reset to the system prompts, so a batch's text is a "
                    "function of the batch alone and a resumed or restarted run writes byte-identical output (slower: the engine drains "
                    "between batches). false: replicas keep the engine full across batches (continuous batching); every document still "
                    "gets exactly one outcome and saved batches are reused as they are, but a batch generated again after a crash can "
                    "differ in its text.",
    )
    max_num_seqs: int | Literal["auto"] = Field(
        "auto", description="Sequences a replica's engine runs at once (vLLM max_num_seqs); auto: vLLM's default for the device "
                            "(1,024 on large GPUs, as the published runs found best; 256 on CPU and smaller GPUs).",
    )
    max_batches_in_flight: int | Literal["auto"] = Field(
        "auto",
        description="Batches a replica holds at once. reproducible: queued, run one after another (auto: 2). Otherwise run together "
                    "in the engine (auto: enough to keep max_num_seqs sequences running, plus one).",
    )
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
        from annotator.method.recipes import builtin_recipes, load_recipe, recipe_spec

        if not recipes:
            raise ValueError(f"name at least one recipe: a built-in one ({', '.join(builtin_recipes())}) or a recipe file")
        # A file is recorded by its absolute path, so the run's record names it wherever it is read.
        specs = [recipe_spec(r) for r in recipes]
        names = [load_recipe(s).name for s in specs]  # a file's problems, with its line, at start
        if len(set(names)) != len(names):
            raise ValueError(f"recipes must have distinct names, got {names} from {recipes}")
        return specs

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        return refuse_moved(data, tokenizer="generation.tokenizer was replaced by output.tokenizer "
                                            "(the target tokenizer is independent of the generator)")

    @model_validator(mode="after")
    def _inline_on_one_device(self):
        if self.engine_process == "inline" and self.tensor_parallel_size > 1:
            raise ValueError("engine_process: inline runs one device per replica; tensor_parallel_size > 1 needs separate")
        return self

    @field_validator("max_num_seqs", "max_batches_in_flight", "block_size")
    @classmethod
    def _positive_or_auto(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return value

    @property
    def engine_inline(self) -> bool:
        """Whether a replica's engine runs in the replica's process (`engine_process`)."""
        if self.engine_process != "auto":
            return self.engine_process == "inline"
        return not self.num_gpus and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND")

    @property
    def engine_block_size(self) -> int | None:
        """The KV-cache block size a replica's engine is started with (None: vLLM's default)."""
        if self.block_size != "auto":
            return self.block_size
        return None if self.num_gpus else 32

    @property
    def engine_seqs(self) -> int:
        """Sequences in flight per replica: `max_num_seqs`, or what vLLM picks for the device."""
        if self.max_num_seqs != "auto":
            return self.max_num_seqs
        return 1024 if self.num_gpus else 256

    @property
    def batches_in_flight(self) -> int:
        """Planned batches a replica holds at once (see `max_batches_in_flight`)."""
        if self.max_batches_in_flight != "auto":
            return self.max_batches_in_flight
        if self.reproducible:
            return 2
        return min(64, -(-self.engine_seqs // self.batch_size) + 1)

    @property
    def concurrent_batches(self) -> int:
        """Batches a replica runs in its engine at the same time: 1 when reproducible."""
        return 1 if self.reproducible else self.batches_in_flight

    @property
    def batching(self) -> str:
        """How replicas run their batches, in words (logs)."""
        if self.reproducible:
            return "one batch at a time, reproducible"
        return f"continuous batching, up to {self.batches_in_flight} batches in flight per replica"

    @field_validator("num_cpus")
    @classmethod
    def _positive_cpus(cls, value):
        if value != "auto" and value <= 0:
            raise ValueError("must be > 0 or 'auto'")
        return value


class TemplateConfig(Section):
    open: str = Field("<assistant>", description="Token written before a spliced reflection.")
    close: str = Field("</assistant>", description="Token written after a spliced reflection.")
    charter_tokens: bool = Field(False, description="Render [X.Y] citations in the training text as <charter_X.Y> special tokens.")
    annotation_open: str = Field("<annotations>", description="Token written before the key:value annotation block.")
    annotation_close: str = Field("</annotations>", description="Token written after the annotation block (then a newline).")
