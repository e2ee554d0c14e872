"""The generation stage: reflections (and key:value annotations) for the documents that need them.

Per selected document: a seeded pause point inside the content a training window keeps, a seeded
canary from the run's canary set, the pack's messages (system prompt first and identical, so the
prefix cache computes it once per replica); replies go through `replies.parse_reply` (inline
citations, budget cut, checks), and a failed reply is retried with a new seed, then recorded with
its reason. The engine itself is `engine.Engine`; prompts are the pack's (`prompt_packs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from annotator.config import ConfigError, GenerationConfig
from annotator.engine import Engine
from annotator.pause import pause_point, sample_pause_fraction, unit_hash
from annotator.prompt_packs import Canary, PromptPack, load_canaries, load_pack
from annotator.replies import OK, cut_to_tokens, json_object, parse_reply, strip_reasoning
from annotator.stages import Resources, Stage
from annotator.tokens import target_tokenizer

NOT_SELECTED = "not_selected"
NOT_REQUESTED = "not_requested"
REFLECTION, ANNOTATION = "reflection", "annotation"
# Template tokens around a spliced reflection; the budget covers them too.
TEMPLATE_TOKENS = 2
# Room for the JSON keys and quotes beside the texts in the generated-token cap.
_JSON_OVERHEAD_TOKENS = 64
_PROMPT_MARGIN_TOKENS = 32

REFLECTION_COLUMNS = {
    "reflection_analysis": pa.string(),
    "reflection_1p": pa.string(),
    "reflection_3p": pa.string(),
    "citations": pa.list_(pa.string()),
    "citations_dropped": pa.int16(),
    "reflection_token_index": pa.int32(),
    "reflection_position": pa.int32(),  # character offset into the original text
    "reflection_fraction": pa.float32(),
    "reflection_status": pa.string(),
    "reflection_attempts": pa.int8(),
    # One entry per request: "<outcome>:<generated tokens>", outcome ok, a parse failure, or
    # "checks=<failed checks>"; stats count check pass rates from it.
    "reflection_attempt_log": pa.list_(pa.string()),
    "reflection_generated_tokens": pa.int32(),
    "canary_type": pa.string(),
    "canary_present_1p": pa.bool_(),
    "canary_present_3p": pa.bool_(),
    "prompt_version": pa.string(),
    "model": pa.string(),  # the generator that wrote the reflection
    "annotations": pa.list_(pa.string()),
    "annotation_status": pa.string(),
    # Engine usage summed over this row's requests (retries included), for throughput and cache stats.
    "gen_prompt_tokens": pa.int32(),
    "gen_cached_prompt_tokens": pa.int32(),
    "gen_output_tokens": pa.int32(),
}
# Defaults of the generation columns for a row the engine never saw.
DEFAULTS = {"reflection_status": NOT_SELECTED, "annotation_status": NOT_REQUESTED, "reflection_attempts": 0,
            "reflection_generated_tokens": 0, "gen_prompt_tokens": 0, "gen_cached_prompt_tokens": 0, "gen_output_tokens": 0}
# The last reply of a reflection that failed every attempt (for rejects/generations, not the shards).
FAILED_REPLY = "_failed_reply"
# With generation.save_requests: the user message of each reflection request (saved generations only).
REQUEST_COLUMN = "_reflection_request"
FAILED_REPLY_CHARS = 4000


class GenerationGuardError(RuntimeError):
    """The generator spends far more tokens per reflection than it keeps (it is 'thinking')."""


def run_canaries(cfg: GenerationConfig) -> list[Canary]:
    """The canaries a run draws from: the file's `inject` entries, then the inline items."""
    items = load_canaries(cfg.canaries.file) if cfg.canaries.file else []
    items += [Canary(id=c.id, value=c.value, instruction=c.instruction, instruction_3p=c.instruction_3p) for c in cfg.canaries.items]
    ids = [c.id for c in items]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"generation.canaries: canary ids must be distinct, got {ids}")
    return items


def assign_canary(canaries: list[Canary], *, fraction: float, seed: int, doc_id: str) -> Canary | None:
    """A canary for `fraction` of documents, chosen uniformly; a pure function of (seed, doc_id)."""
    if not canaries or unit_hash("canary", seed, doc_id) >= fraction:
        return None
    return canaries[int(unit_hash("canary-choice", seed, doc_id) * len(canaries))]


def canary_present(text: str | None, canary: Canary) -> bool:
    return bool(text) and canary.value.casefold() in text.casefold()


def reflection_schema(pack: PromptPack, *, max_chars: int) -> dict:
    """The JSON object vLLM's structured outputs enforce: the pack's fields as strings. What they
    cite is read from the text, so no citation list is forced on a benign document."""
    text = {"type": "string", "maxLength": max_chars}
    return {"type": "object", "properties": {f: text for f in pack.fields}, "required": list(pack.fields),
            "additionalProperties": False}


def annotation_messages(keys: list[str], head: str) -> list[dict]:
    system = ("You label web documents with short semantic annotations. Reply with JSON only, one short value "
              f"(a few words, lowercase) for each of these keys: {', '.join(keys)}. "
              "For entities give the main named entities separated by commas, or none.")
    return [{"role": "system", "content": system}, {"role": "user", "content": f"Document:\n<<<\n{head}\n>>>\nWrite your JSON annotations."}]


def annotation_schema(keys: list[str], *, max_chars: int) -> dict:
    value = {"type": "string", "minLength": 1, "maxLength": max_chars}
    return {"type": "object", "properties": {k: value for k in keys}, "required": list(keys), "additionalProperties": False}


def parse_annotations(raw: str, keys: list[str]) -> tuple[list[str] | None, str]:
    """`key:value` tags from one annotation reply, in the configured key order."""
    text, _ = strip_reasoning(raw)
    obj = json_object(text) if text is not None else None
    if obj is None:
        return None, "unparseable_json"
    tags = []
    for key in keys:
        value = obj.get(key)
        if not isinstance(value, str) or not value.strip():
            return None, f"empty_{key}"
        tags.append(f"{key}:{' '.join(value.split())}")
    return tags, OK


@dataclass
class Request:
    row: int
    task: str
    messages: list[dict]
    source: str = ""            # what the generator was shown (checks compare against it)
    canary: Canary | None = None


class BudgetGuard:
    """Generated tokens per reflection request over a replica's first requests, against the budget."""

    def __init__(self, cfg: GenerationConfig):
        self.cfg = cfg
        self.requests = 0
        self.tokens = 0
        self.judged = False

    def observe(self, generated: list[int]) -> None:
        self.requests += len(generated)
        self.tokens += sum(generated)
        if self.judged or self.requests < self.cfg.guard.min_requests:
            return
        self.judged = True
        mean = self.tokens / self.requests
        limit = self.cfg.guard.max_generated_multiple * self.cfg.max_reflection_tokens
        if mean > limit:
            raise GenerationGuardError(
                f"generation guard: {self.cfg.model} generated {mean:.0f} tokens per reflection request over its first "
                f"{self.requests} requests, {mean / self.cfg.max_reflection_tokens:.1f}x the {self.cfg.max_reflection_tokens}-token "
                f"budget (limit generation.guard.max_generated_multiple = {self.cfg.guard.max_generated_multiple}); it is probably "
                "reasoning before it answers. Turn thinking off (e.g. --set 'generation.chat_template_kwargs={enable_thinking: false}'), "
                "lower generation.max_output_tokens, or raise generation.guard.max_generated_multiple.")


class ReflectionGenerator(Stage):
    """A vLLM replica: adds reflections (selected rows) and annotations (configured rows)."""

    name = "generate"
    reads = ("doc_id", "text", "selected")
    adds = (*REFLECTION_COLUMNS, FAILED_REPLY)
    stateful = True

    def __init__(self, cfg: GenerationConfig, *, tokenizer: str, content_tokens: int, num_cpus: float | None = None):
        self.cfg = cfg
        self.tokenizer_spec = tokenizer
        self.content_tokens = content_tokens
        cpus = num_cpus if num_cpus is not None else (1.0 if cfg.num_cpus == "auto" else cfg.num_cpus)
        self.resources = Resources(
            num_cpus=cpus, num_gpus=cfg.num_gpus, concurrency=cfg.concurrency, batch_size=cfg.batch_size,
            max_in_flight=cfg.max_batches_in_flight, max_restarts=cfg.max_replica_restarts,
        )
        self.pack = load_pack(cfg.prompt_pack)
        self.canaries = run_canaries(cfg)
        if self.canaries and self.pack.canary_template is None:
            raise ConfigError(f"generation.canaries are set but the prompt pack {self.pack.source} has no canary template")
        self._engine: Engine | None = None

    def setup(self) -> None:
        """Nothing up front: the engine loads with the first batch that has rows, so a resumed
        run whose generations are all saved never pays for an engine start."""

    @property
    def loaded(self) -> bool:
        return self._engine is not None and self._engine.loaded

    def load_engine(self) -> None:
        cfg = self.cfg
        self._tok = target_tokenizer(self.tokenizer_spec)
        engine = Engine(cfg, num_cpus=self.resources.num_cpus)
        engine.load()
        self.voice_tokens = cfg.max_reflection_tokens - TEMPLATE_TOKENS
        self.max_new_tokens = cfg.max_output_tokens or 4 * cfg.max_reflection_tokens + _JSON_OVERHEAD_TOKENS
        # The whole chat prompt around an empty document (with the longest canary block).
        longest = max(self.canaries, key=lambda c: len(c.instruction) + len(c.instruction_3p or ""), default=None)
        self.prompt_budget = cfg.max_model_len - self.max_new_tokens - _PROMPT_MARGIN_TOKENS
        self.max_prefix_tokens = self.prompt_budget - engine.prompt_tokens(self.pack.messages("", longest))
        if self.max_prefix_tokens < 64:
            raise ValueError(f"generation.max_model_len={cfg.max_model_len} leaves only {self.max_prefix_tokens} tokens for the "
                             f"document after the {self.pack.name} pack's prompt and a {self.max_new_tokens}-token reply")
        # ~5 characters per token: room for the full budget; the exact cut is made after generation.
        self.schema = reflection_schema(self.pack, max_chars=cfg.max_reflection_tokens * 5)
        ann = cfg.annotations
        self.annotation_schema = annotation_schema(ann.keys, max_chars=ann.max_value_chars)
        self.annotation_max_tokens = len(ann.keys) * (ann.max_value_chars + 8) + 16
        warm = [self.pack.messages("")]
        if ann.enabled:
            warm.append(annotation_messages(ann.keys, ""))
        engine.warm(warm)
        self.guard = BudgetGuard(cfg)
        self._engine = engine

    def _sampling(self, task: str, doc_id: str, attempt: int):
        seed = int(unit_hash(task, self.cfg.seed, doc_id, attempt) * 2**31)
        if task == REFLECTION:
            return self._engine.sampling(seed=seed, max_tokens=self.max_new_tokens, schema=self.schema)
        return self._engine.sampling(seed=seed, max_tokens=self.annotation_max_tokens, schema=self.annotation_schema)

    def _fit(self, text: str, canary: Canary | None) -> list[dict]:
        """The pack's messages for `text`; when the generator's own tokenizer counts more than the
        engine's context holds (its vocabulary differs from the target's), the text loses tokens
        from its start until it fits."""
        messages = self.pack.messages(text, canary)
        if len(self._tok.offsets(text)) <= 0.9 * self.max_prefix_tokens:
            return messages  # far from the limit in any vocabulary: no need to count
        for _ in range(4):
            over = self._engine.prompt_tokens(messages) - self.prompt_budget
            if over <= 0:
                break
            offsets = self._tok.offsets(text)
            drop = min(len(offsets), over + 16)
            text = text[offsets[drop][0]:] if drop < len(offsets) else ""
            messages = self.pack.messages(text, canary)
        return messages

    def build_requests(self, batch: pa.Table) -> tuple[dict, list[Request]]:
        """Output columns prefilled for `batch` and its chat requests."""
        n = batch.num_rows
        ids = batch.column("doc_id").to_pylist()
        texts = batch.column("text").to_pylist()
        selected = batch.column("selected").to_pylist()
        ann = self.cfg.annotations
        out = {k: [None] * n for k in self.adds}
        for key, value in DEFAULTS.items():
            out[key] = [value] * n
        fraction = self.cfg.canaries.effective_fraction
        requests: list[Request] = []
        for i in range(n):
            if selected[i]:
                pause = pause_point(texts[i], self._tok.offsets(texts[i]), sample_pause_fraction(self.cfg.seed, ids[i]),
                                    max_prefix_tokens=self.max_prefix_tokens, max_content_tokens=self.content_tokens,
                                    snap=self.cfg.pause.snap)
                canary = assign_canary(self.canaries, fraction=fraction, seed=self.cfg.canaries.seed, doc_id=ids[i])
                requests.append(Request(i, REFLECTION, self._fit(pause.prompt_prefix, canary), pause.prompt_prefix, canary))
                out["reflection_token_index"][i] = pause.token_index
                out["reflection_position"][i] = pause.char_index
                out["reflection_fraction"][i] = pause.fraction
                out["prompt_version"][i] = self.pack.version
                out["model"][i] = self.cfg.model
                if canary is not None:
                    out["canary_type"][i] = canary.id
            if ann.enabled and (ann.apply_to == "all" or selected[i]):
                head = cut_to_tokens(texts[i], self._tok, ann.max_document_tokens)
                requests.append(Request(i, ANNOTATION, annotation_messages(ann.keys, head)))
        return out, requests

    def process(self, batch: pa.Table) -> pa.Table:
        if not self.loaded and batch.num_rows:
            self.load_engine()
        ids = batch.column("doc_id").to_pylist()
        out, pending = self.build_requests(batch) if batch.num_rows else ({k: [] for k in self.adds}, [])
        asked = [r for r in pending if r.task == REFLECTION]
        for key in ("reflection_attempt_log",):
            out[key] = [[] if r is None else r for r in out[key]]
        failed_reply: list[str | None] = [None] * batch.num_rows
        for attempt in range(self.cfg.max_retries + 1):
            if not pending:
                break
            replies = self._engine.chat([r.messages for r in pending], [self._sampling(r.task, ids[r.row], attempt) for r in pending])
            retry = []
            generated = []
            for req, reply in zip(pending, replies):
                if not self._handle(req, reply, out, failed_reply, attempt):
                    retry.append(req)
                if req.task == REFLECTION and not isinstance(reply, Exception):
                    generated.append(reply.output_tokens)
            self.guard.observe(generated)
            pending = retry
        for req in pending:
            if req.task == REFLECTION:
                out["canary_type"][req.row] = None  # a failed reflection carries no canary
        if self.cfg.save_requests:
            requests = [None] * batch.num_rows
            for req in asked:
                requests[req.row] = req.messages[-1]["content"]
        for i in range(batch.num_rows):
            if not out["reflection_attempt_log"][i]:
                out["reflection_attempt_log"][i] = None
        for key, typ in REFLECTION_COLUMNS.items():
            batch = batch.append_column(key, pa.array(out[key], typ))
        if self.cfg.save_requests:
            batch = batch.append_column(REQUEST_COLUMN, pa.array(requests, pa.string()))
        return batch.append_column(FAILED_REPLY, pa.array(failed_reply, pa.string()))

    def _handle(self, req: Request, reply, out: dict, failed_reply: list, attempt: int) -> bool:
        """Records one reply into the row's columns; True when the request is done."""
        i = req.row
        if isinstance(reply, Exception):
            status, tokens = f"engine_error:{type(reply).__name__}", 0
        else:
            out["gen_prompt_tokens"][i] += reply.prompt_tokens
            out["gen_cached_prompt_tokens"][i] += reply.cached_tokens
            out["gen_output_tokens"][i] += reply.output_tokens
            tokens = reply.output_tokens
        if req.task == ANNOTATION:
            tags, status = parse_annotations(reply.text, self.cfg.annotations.keys) if not isinstance(reply, Exception) else (None, status)
            out["annotation_status"][i] = status if status == OK else f"failed:{status}"
            out["annotations"][i] = tags
            return tags is not None
        out["reflection_attempts"][i] = attempt + 1
        out["reflection_generated_tokens"][i] += tokens
        if isinstance(reply, Exception):
            out["reflection_attempt_log"][i].append(f"{status}:0")
            out["reflection_status"][i] = f"failed:{status}"
            return False
        parsed = parse_reply(reply.text, pack=self.pack, tokenizer=self._tok, voice_tokens=self.voice_tokens,
                             analysis_tokens=self.cfg.max_reflection_tokens, source=req.source)
        if not parsed.ok:
            reason = parsed.failures[0] if parsed.failures[0] in ("unparseable_json", "unclosed_reasoning") else "checks=" + ",".join(parsed.failures)
            out["reflection_attempt_log"][i].append(f"{reason}:{tokens}")
            out["reflection_status"][i] = f"failed:{reason}"
            failed_reply[i] = reply.text[:FAILED_REPLY_CHARS]
            return False
        out["reflection_attempt_log"][i].append(f"{OK}:{tokens}")
        out["reflection_status"][i] = OK
        failed_reply[i] = None
        out["reflection_analysis"][i] = parsed.fields.get("analysis") if "analysis" in self.pack.fields else None
        for field, voice in self.pack.voices.items():
            out[f"reflection_{voice}"][i] = parsed.fields[field]
            if req.canary is not None:
                out[f"canary_present_{voice}"][i] = canary_present(parsed.fields[field], req.canary)
        out["citations"][i] = parsed.cited
        out["citations_dropped"][i] = parsed.citations_dropped
        return True


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
            elif key in DEFAULTS:
                values = [DEFAULTS[key]] * batch.num_rows
            else:
                values = [None] * batch.num_rows
            batch = batch.append_column(key, pa.array(values, typ))
        return batch
