"""Reflection generation with one vLLM engine per replica actor.

Selected documents are read up to a seeded pause point, sent with the shared constitution
prompt, and answered as JSON enforced by vLLM structured outputs. Reflections are cut to the
token budget of the target tokenizer. A request that fails is retried; after the last retry the
document keeps no reflection and its row says why.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pyarrow as pa

from annotator.config import GenerationConfig
from annotator.models import resolve_model
from annotator.reflection_prompt import (
    PROMPT_VERSION,
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
# Room for the JSON keys, quotes and the citations list beside the three texts.
_JSON_OVERHEAD_TOKENS = 64
_PROMPT_MARGIN_TOKENS = 32
_COLUMN_TYPES = {
    "citations": pa.list_(pa.string()),
    "reflection_token_index": pa.int32(),
    "reflection_char_index": pa.int64(),
    "reflection_position": pa.float32(),
    "reflection_attempts": pa.int8(),
}


@dataclass
class Pause:
    token_index: int
    char_index: int
    fraction: float
    prompt_prefix: str


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
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_tokens:
        return text
    return text[: enc["offset_mapping"][max_tokens - 1][1]].rstrip()


def parse_reply(raw: str, *, tokenizer, max_tokens: int) -> tuple[dict | None, str]:
    """Validate one JSON reply; returns (fields, "ok") or (None, failure reason)."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        return None, "unparseable_json"
    if not isinstance(obj, dict):
        return None, "not_an_object"
    fields = {}
    for key in ("analysis", "reflection_1p", "reflection_3p"):
        value = obj.get(key)
        if not isinstance(value, str) or not value.strip():
            return None, f"empty_{key}"
        fields[key] = cut_to_tokens(value.strip(), tokenizer, max_tokens)
    valid = constitution_sections()
    cited = [c for c in obj.get("citations", []) if isinstance(c, str)]
    fields["citations"] = [c for c in dict.fromkeys(cited) if c in valid]
    fields["citations_dropped"] = len(cited) - len(fields["citations"])
    return fields, OK


class ReflectionGenerator(Stage):
    """vLLM replica: adds reflections and their placement to selected rows."""

    name = "generate"
    reads = ("doc_id", "text", "selected")
    adds = (
        "reflection_analysis",
        "reflection_1p",
        "reflection_3p",
        "citations",
        "reflection_token_index",
        "reflection_char_index",
        "reflection_position",
        "reflection_status",
        "reflection_attempts",
        "prompt_version",
        "generator_model",
    )
    stateful = True

    def __init__(self, cfg: GenerationConfig):
        self.cfg = cfg
        self.resources = Resources(
            num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, concurrency=cfg.concurrency, batch_size=cfg.batch_size
        )
        self.llm = None

    def setup(self) -> None:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            from vllm import LLM
        except ImportError as err:
            raise RuntimeError("generation needs vLLM: install the `cpu` extra (CPU) or the `gpu` extra (CUDA)") from err

        cfg = self.cfg
        model = resolve_model(cfg.model)
        self.tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        engine_kwargs = dict(
            model=model,
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
        engine_kwargs.update(cfg.engine_kwargs)
        self.llm = LLM(**engine_kwargs)
        self.model_name = cfg.model
        self.system = system_prompt()
        self.max_new_tokens = 4 * cfg.max_reflection_tokens + _JSON_OVERHEAD_TOKENS
        system_tokens = len(self.llm.get_tokenizer().apply_chat_template([{"role": "system", "content": self.system}], tokenize=True))
        self.max_prefix_tokens = cfg.max_model_len - self.max_new_tokens - system_tokens - _PROMPT_MARGIN_TOKENS
        if self.max_prefix_tokens < 64:
            raise ValueError(
                f"generation.max_model_len={cfg.max_model_len} leaves only {self.max_prefix_tokens} tokens for the document"
            )
        self.schema = reflection_schema(max_chars=cfg.max_reflection_tokens * 6)

    def _sampling(self, doc_id: str, attempt: int):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        seed = int(unit_hash("sample", self.cfg.seed, doc_id, attempt) * 2**31)
        return SamplingParams(
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            max_tokens=self.max_new_tokens,
            seed=seed,
            structured_outputs=StructuredOutputsParams(json=self.schema),
        )

    def _generate(self, messages: list, params: list) -> list[str | Exception]:
        """One engine call for the batch; if the engine rejects it, fall back to one call per
        request so a single bad request fails alone."""
        try:
            return [o.outputs[0].text for o in self.llm.chat(messages, params, use_tqdm=False)]
        except Exception:  # noqa: BLE001 - isolate which request the engine rejects
            results: list[str | Exception] = []
            for m, p in zip(messages, params):
                try:
                    results.append(self.llm.chat([m], [p], use_tqdm=False)[0].outputs[0].text)
                except Exception as err:  # noqa: BLE001
                    results.append(err)
            return results

    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        ids = batch.column("doc_id").to_pylist()
        texts = batch.column("text").to_pylist()
        selected = batch.column("selected").to_pylist()
        out = {k: [None] * n for k in self.adds}
        out["reflection_status"] = [NOT_SELECTED] * n
        out["reflection_attempts"] = [0] * n
        pending: dict[int, tuple[list, Pause]] = {}
        for i in (i for i in range(n) if selected[i]):
            enc = self.tokenizer(texts[i], add_special_tokens=False, return_offsets_mapping=True)
            pause = pause_point(
                texts[i], enc["offset_mapping"], sample_pause_fraction(self.cfg.seed, ids[i]), max_prefix_tokens=self.max_prefix_tokens
            )
            messages = [{"role": "system", "content": self.system}, {"role": "user", "content": user_prompt(pause.prompt_prefix)}]
            pending[i] = (messages, pause)
            out["reflection_token_index"][i] = pause.token_index
            out["reflection_char_index"][i] = pause.char_index
            out["reflection_position"][i] = pause.fraction
            out["prompt_version"][i] = PROMPT_VERSION
            out["generator_model"][i] = self.model_name

        for attempt in range(self.cfg.max_retries + 1):
            if not pending:
                break
            order = list(pending)
            replies = self._generate([pending[i][0] for i in order], [self._sampling(ids[i], attempt) for i in order])
            for i, reply in zip(order, replies):
                out["reflection_attempts"][i] = attempt + 1
                if isinstance(reply, Exception):
                    fields, status = None, f"engine_error:{type(reply).__name__}"
                else:
                    fields, status = parse_reply(reply, tokenizer=self.tokenizer, max_tokens=self.cfg.max_reflection_tokens)
                out["reflection_status"][i] = status if status == OK else f"failed:{status}"
                if fields is not None:
                    out["reflection_analysis"][i] = fields["analysis"]
                    out["reflection_1p"][i] = fields["reflection_1p"]
                    out["reflection_3p"][i] = fields["reflection_3p"]
                    out["citations"][i] = fields["citations"]
                    del pending[i]

        for key in self.adds:
            batch = batch.append_column(key, pa.array(out[key], _COLUMN_TYPES.get(key, pa.string())))
        return batch


class NoReflections(Stage):
    """Stands in for generation when it is disabled (score-and-select runs): same columns, no engine."""

    name = "generate"
    reads = ("selected",)
    adds = ReflectionGenerator.adds

    def __init__(self):
        self.resources = Resources(num_cpus=0.25, batch_size=4096)

    def process(self, batch: pa.Table) -> pa.Table:
        status = ["generation_disabled" if s else NOT_SELECTED for s in batch.column("selected").to_pylist()]
        for key in self.adds:
            values = status if key == "reflection_status" else [None] * batch.num_rows
            batch = batch.append_column(key, pa.array(values, _COLUMN_TYPES.get(key, pa.string())))
        return batch
