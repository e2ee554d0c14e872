"""The generation stage: every recipe of a run (`recipes.py`) from one engine load per replica.

Per document that needs the engine: one request per recipe that applies to it, all recipes' requests
sharing the replica's engine calls (each pack's system prompt first and identical, so the prefix
cache computes it once per replica). A document's requests are built one after another and reach the
engine together, so in the shared prompt layout (`method.layouts`) the second recipe finds the
document in the cache the first one filled. A recipe at the reading pause gets a seeded point inside
the content a training window keeps (recipes at the pause share it); the others see the whole kept
content. Canaries (one per document, seeded) go to the recipes that take them. Replies go through
`replies` (inline citations, budget cut, checks); a failed reply is retried with a new seed, then
recorded with its reason. The engine itself is `engine.Engine`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from annotator.config import ConfigError, GenerationConfig
from annotator.engine.stream import HOST
from annotator.engine.vllm_engine import Engine
from annotator.core.seeding import sampling_seed, unit_hash
from annotator.generate.pause import Pause, pause_point, sample_pause_fraction
from annotator.method.prompt_packs import Canary, PromptPack
from annotator.method.recipes import Recipe, recipe_columns, run_recipes
from annotator.score.language import UNDETERMINED, language_name
from annotator.generate.replies import cut_to_tokens, echoes_prompt, json_object, parse_reply, strip_reasoning, trivial
from annotator.core.stages import Resources, Stage
from annotator.core.tokens import target_tokenizer
from annotator.generate.canaries import assign_canary, canary_present, run_canaries
from annotator.generate.guard import BudgetGuard
from annotator.core.statuses import NOT_APPLICABLE, NOT_REQUESTED, NOT_SELECTED, OK, failed

# Template tokens around a placed text; the budget covers them too.
TEMPLATE_TOKENS = 2
_JSON_OVERHEAD_TOKENS = 64
_PROMPT_MARGIN_TOKENS = 32
# Columns every generated row has, whatever the recipes: the generator and the engine's usage
# summed over the row's requests (retries included), for throughput and cache stats.
SHARED_COLUMNS = {"model": pa.string(), "gen_prompt_tokens": pa.int32(), "gen_cached_prompt_tokens": pa.int32(),
                  "gen_output_tokens": pa.int32()}
# Per row, JSON {recipe: last reply} of the requests that failed every attempt (for
# rejects/generations, not the shards).
FAILED_REPLY = "_failed_replies"
FAILED_REPLY_CHARS = 4000
# With generation.save_requests: the user message of each document's first recipe's request.
REQUEST_COLUMN = "_request"


def choose_style(pack: PromptPack, *, seed: int, doc_id: str) -> str | None:
    """One of the pack's styles, uniform over their sorted names, from (seed, doc_id)."""
    if not pack.styles:
        return None
    names = sorted(pack.styles)
    return names[int(unit_hash("style", seed, doc_id) * len(names))]


def json_schema(fields, *, max_chars: int) -> dict:
    """The JSON object vLLM's structured outputs enforce: the fields as strings. What a reply cites
    is read from its text, so no citation list is forced on a benign document."""
    text = {"type": "string", "maxLength": max_chars}
    return {"type": "object", "properties": {f: text for f in fields}, "required": list(fields), "additionalProperties": False}


def parse_tags(raw: str, keys: list[str]) -> tuple[list[str] | None, str]:
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
    recipe: "RecipeRun"
    messages: list[dict]
    source: str = ""             # what the generator was shown (checks compare against it)
    canary: Canary | None = None


class RecipeRun:
    """One recipe inside a replica: its pack, columns, limits, and how it turns replies into columns."""

    def __init__(self, recipe: Recipe, cfg: GenerationConfig, *, replace_tokens: int):
        self.recipe = recipe
        self.cfg = cfg
        self.pack = recipe.load_pack()
        self.columns = recipe_columns(recipe, self.pack)
        self.col = recipe.column
        budget = cfg.max_reflection_tokens
        self.voice_tokens = budget - TEMPLATE_TOKENS if recipe.wrapped else budget
        self.replace_tokens = replace_tokens
        fmt = self.pack.format
        if fmt == "json":
            self.max_new_tokens = cfg.max_output_tokens or (len(self.pack.fields) + 1) * budget + _JSON_OVERHEAD_TOKENS
            self.schema = json_schema(self.pack.fields, max_chars=budget * 5)
        elif fmt == "tags":
            ann = cfg.annotations
            self.max_new_tokens = len(ann.keys) * (ann.max_value_chars + 8) + 16
            self.schema = {"type": "object", "properties": {k: {"type": "string", "minLength": 1, "maxLength": ann.max_value_chars}
                                                            for k in ann.keys}, "required": list(ann.keys), "additionalProperties": False}
        else:
            self.max_new_tokens = cfg.rephrase_max_tokens
            self.schema = None
        self.max_new_tokens = recipe.max_output_tokens or self.max_new_tokens
        self.budgeted = fmt == "json"

    def applies(self, *, selected: bool, bad: bool) -> bool:
        if self.recipe.applies_to == "all":
            return True
        if not selected:
            return False
        return bad if self.recipe.applies_to == "bad" else True

    def messages(self, text: str, *, canary: Canary | None, doc_id: str, language: str | None = None) -> list[dict]:
        style = choose_style(self.pack, seed=self.cfg.seed, doc_id=doc_id)
        return self.pack.messages(text, canary if self.recipe.canaries else None, style=style, keys=self.cfg.annotations.keys,
                                  language=language_name(language or UNDETERMINED))

    def warm_messages(self) -> list[list[dict]]:
        styles = sorted(self.pack.styles) or [None]
        return [self.pack.messages("", style=s, keys=self.cfg.annotations.keys) for s in styles]

    def defaults(self, *, selected: bool = False) -> dict:
        """The recipe's columns for a row it does not apply to (before any request)."""
        if self.pack.format == "tags":
            status = NOT_REQUESTED
        else:
            status = NOT_APPLICABLE if selected else NOT_SELECTED
        return {self.col("status"): status, self.col("attempts"): 0, self.col("generated_tokens"): 0,
                self.col("prompt_tokens"): 0, self.col("cached_prompt_tokens"): 0}

    def record(self, out: dict, req: Request, *, raw: str, tokens: int, tok) -> tuple[bool, str]:
        """Reads one reply into the row's columns; (done, outcome for the attempt log)."""
        i = req.row
        fmt = self.pack.format
        if fmt == "tags":
            tags, status = parse_tags(raw, self.cfg.annotations.keys)
            out[self.col("tags")][i] = tags
            out[self.col("status")][i] = status if status == OK else failed(status)
            return tags is not None, status
        if fmt == "text":
            text, _ = strip_reasoning(raw)
            echo = text is not None and self.pack.check_enabled("no_prompt_echo") and echoes_prompt(text, self.pack.system_prompt())
            if text is None or trivial(text) or echo:
                reason = "unclosed_reasoning" if text is None else "checks=no_prompt_echo" if echo else "checks=voices_present"
                out[self.col("status")][i] = failed(reason)
                return False, reason
            out[self.col(self.pack.fields[0])][i] = cut_to_tokens(text, tok, max_tokens=self.replace_tokens)
            out[self.col("status")][i] = OK
            return True, OK
        parsed = parse_reply(raw, pack=self.pack, tokenizer=tok, voice_tokens=self.voice_tokens,
                             analysis_tokens=self.cfg.max_reflection_tokens, source=req.source)
        if not parsed.ok:
            reason = parsed.failures[0] if parsed.failures[0] in ("unparseable_json", "unclosed_reasoning") else "checks=" + ",".join(parsed.failures)
            out[self.col("status")][i] = failed(reason)
            return False, reason
        out[self.col("status")][i] = OK
        for f in self.pack.fields:
            out[self.col(f)][i] = parsed.fields[f]
        if self.col("citations") in self.columns:
            out[self.col("citations")][i] = parsed.cited
            out[self.col("citations_dropped")][i] = parsed.citations_dropped
        if req.canary is not None and self.recipe.canaries:
            for f, v in self.pack.voices.items():
                out[self.col(f"canary_present_{v}")][i] = canary_present(parsed.fields[f], req.canary)
        return True, OK


class Generator(Stage):
    """A vLLM replica: adds every recipe's columns for the documents that need the engine."""

    name = "generate"
    reads = ("doc_id", "text", "selected", "is_bad")
    stateful = True

    def __init__(self, cfg: GenerationConfig, *, tokenizer: str, content_tokens: int, replace_tokens: int = 2048,
                 num_cpus: float | None = None, recipes: list[Recipe] | None = None):
        self.cfg = cfg
        self.tokenizer_spec = tokenizer
        self.content_tokens = content_tokens
        cpus = num_cpus if num_cpus is not None else (1.0 if cfg.num_cpus == "auto" else cfg.num_cpus)
        self.resources = Resources(
            num_cpus=cpus, num_gpus=cfg.num_gpus, concurrency=cfg.concurrency, batch_size=cfg.batch_size,
            max_in_flight=cfg.batches_in_flight, concurrent_calls=cfg.concurrent_batches, max_restarts=cfg.max_replica_restarts,
        )
        self.runs = [RecipeRun(r, cfg, replace_tokens=replace_tokens) for r in (recipes if recipes is not None else run_recipes(cfg))]
        self.canaries = run_canaries(cfg)
        for run in self.runs:
            if self.canaries and run.recipe.canaries and run.pack.canary_template is None:
                raise ConfigError(f"generation.canaries are set but the {run.recipe.name} recipe's pack {run.pack.source} has no canary template")
        self.columns = {**{k: t for run in self.runs for k, t in run.columns.items()}, **SHARED_COLUMNS}
        self.adds = (*self.columns, FAILED_REPLY, *((REQUEST_COLUMN,) if cfg.save_requests else ()))
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
        longest = max(self.canaries, key=lambda c: len(c.instruction) + len(c.instruction_3p or ""), default=None)
        self._engine_tok = engine.tokenizer()
        for run in self.runs:
            run.prompt_budget = cfg.max_model_len - run.max_new_tokens - _PROMPT_MARGIN_TOKENS
            prompts = [engine.prompt_tokens(m) for m in run.warm_messages()]
            canary = engine.prompt_tokens(run.pack.messages("", longest, keys=cfg.annotations.keys)) if longest and run.recipe.canaries else 0
            # The whole chat prompt around an empty document, in the generator's own tokens.
            run.base_prompt_tokens = max([*prompts, canary])
            run.max_prefix_tokens = run.prompt_budget - run.base_prompt_tokens
            if run.max_prefix_tokens < 64:
                shared = " (its shared layout's system block; generation.prompt_layout=published uses its own)" if run.pack.layout == "shared" else ""
                raise ValueError(f"generation.max_model_len={cfg.max_model_len} leaves only {run.max_prefix_tokens} tokens for the "
                                 f"document after the {run.pack.name} pack's prompt{shared} and a {run.max_new_tokens}-token reply")
        warm = [(m, run.schema) for run in self.runs for m in run.warm_messages()]
        engine.warm([m for m, _ in warm], [schema for _, schema in warm])
        self.guard = BudgetGuard(cfg)
        self._engine = engine

    def _sampling(self, run: RecipeRun, doc_id: str, *, attempt: int):
        seed = sampling_seed(run.recipe.name, self.cfg.seed, doc_id, attempt)
        return self._engine.sampling(seed=seed, max_tokens=run.max_new_tokens, schema=run.schema)

    def _fit(self, run: RecipeRun, text: str, *, canary: Canary | None, doc_id: str, language: str | None = None) -> list[dict]:
        """The recipe's messages for `text`; when the generator's own tokenizer counts more than the
        engine's context holds (its vocabulary differs from the target's), the text loses tokens
        from its start until it fits. The prompt around the text was counted once at load."""
        for _ in range(4):
            over = run.base_prompt_tokens + len(self._engine_tok(text, add_special_tokens=False)["input_ids"]) - run.prompt_budget
            if over <= 0:
                break
            offsets = self._tok.offsets(text)
            drop = min(len(offsets), over + 16)
            text = text[offsets[drop][0]:] if drop < len(offsets) else ""
        return run.messages(text, canary=canary, doc_id=doc_id, language=language)

    def _point(self, run: RecipeRun, text: str, *, offsets, doc_id: str) -> Pause:
        place = run.recipe.place
        if place.reads == "opening":  # the annotator reads the document's opening
            head = cut_to_tokens(text, self._tok, max_tokens=self.cfg.annotations.max_document_tokens)
            return Pause(token_index=0, char_index=0, fraction=0.0, prompt_prefix=head)
        if place.reads == "pause":
            return pause_point(text, offsets, fraction=sample_pause_fraction(self.cfg.seed, doc_id), max_prefix_tokens=run.max_prefix_tokens,
                               max_content_tokens=self.content_tokens, snap=self.cfg.pause.snap)
        end = pause_point(text, offsets, fraction=1.0, max_prefix_tokens=run.max_prefix_tokens, max_content_tokens=self.content_tokens,
                          snap=self.cfg.pause.snap, at_end=True)
        if place.leads:
            return Pause(token_index=0, char_index=0, fraction=0.0, prompt_prefix=end.prompt_prefix)
        return end

    def build_requests(self, batch: pa.Table) -> tuple[dict, list[Request]]:
        """Output columns prefilled for `batch` and its chat requests, recipe by recipe."""
        n = batch.num_rows
        ids = batch.column("doc_id").to_pylist()
        texts = batch.column("text").to_pylist()
        selected = batch.column("selected").to_pylist()
        bad = batch.column("is_bad").to_pylist() if "is_bad" in batch.column_names else [False] * n
        languages = batch.column("language").to_pylist() if "language" in batch.column_names else [None] * n
        out = {k: [None] * n for k in self.columns}
        for k in ("gen_prompt_tokens", "gen_cached_prompt_tokens", "gen_output_tokens"):
            out[k] = [0] * n
        fraction = self.cfg.canaries.effective_fraction
        requests: list[Request] = []
        for i in range(n):
            offsets = None
            canary = assign_canary(self.canaries, fraction=fraction, seed=self.cfg.canaries.seed, doc_id=ids[i])
            for run in self.runs:
                for key, value in run.defaults(selected=bool(selected[i])).items():
                    out[key][i] = value
                if not run.applies(selected=bool(selected[i]), bad=bool(bad[i])):
                    continue
                offsets = offsets if offsets is not None else self._tok.offsets(texts[i])
                point = self._point(run, texts[i], offsets=offsets, doc_id=ids[i])
                req_canary = canary if run.recipe.canaries else None
                messages = self._fit(run, point.prompt_prefix, canary=req_canary, doc_id=ids[i], language=languages[i])
                requests.append(Request(i, run, messages, point.prompt_prefix, req_canary))
                col = run.col
                if col("token_index") in run.columns and not run.recipe.place.replaces:
                    out[col("token_index")][i], out[col("position")][i], out[col("fraction")][i] = point.token_index, point.char_index, point.fraction
                if col("prompt_version") in run.columns:
                    out[col("prompt_version")][i] = run.pack.version
                if col("style") in run.columns:
                    out[col("style")][i] = choose_style(run.pack, seed=self.cfg.seed, doc_id=ids[i])
                if req_canary is not None:
                    out[col("canary_type")][i] = req_canary.id
                if col("attempt_log") in run.columns:
                    out[col("attempt_log")][i] = []
                out["model"][i] = self.cfg.model
        return out, requests

    def process(self, batch: pa.Table) -> pa.Table:
        with HOST:  # batches may run together in one replica (`engine.stream`)
            return self._process(batch)

    def _process(self, batch: pa.Table) -> pa.Table:
        if not self.loaded and batch.num_rows:
            self.load_engine()
        ids = batch.column("doc_id").to_pylist()
        out, pending = self.build_requests(batch) if batch.num_rows else ({k: [] for k in self.columns}, [])
        first_request: list[str | None] = [None] * batch.num_rows
        for req in pending:
            if first_request[req.row] is None:  # the user turns: the document and the task (one turn when published)
                first_request[req.row] = "\n\n".join(m["content"] for m in req.messages if m["role"] != "system")
        failed_reply: list[dict] = [{} for _ in range(batch.num_rows)]
        if pending:
            self._engine.begin_batch()
        for attempt in range(self.cfg.max_retries + 1):
            if not pending:
                break
            replies = self._engine.chat([r.messages for r in pending], [self._sampling(r.recipe, ids[r.row], attempt=attempt) for r in pending])
            retry, budgeted = [], []
            for req, reply in zip(pending, replies):
                if not self._handle(req, reply, out=out, failed_reply=failed_reply, attempt=attempt):
                    retry.append(req)
                if req.recipe.budgeted and not isinstance(reply, Exception):
                    budgeted.append(reply.output_tokens)
            self.guard.observe(budgeted)
            pending = retry
        for req in pending:
            col = req.recipe.col
            if col("canary_type") in req.recipe.columns:
                out[col("canary_type")][req.row] = None  # a failed reply carries no canary
        for run in self.runs:
            log = run.col("attempt_log")
            if log in out:
                out[log] = [v or None for v in out[log]]
        for key, typ in self.columns.items():
            batch = batch.append_column(key, pa.array(out[key], typ))
        if self.cfg.save_requests:
            batch = batch.append_column(REQUEST_COLUMN, pa.array(first_request, pa.string()))
        failed = [json.dumps(f, sort_keys=True) if f else None for f in failed_reply]
        return batch.append_column(FAILED_REPLY, pa.array(failed, pa.string()))

    def _handle(self, req: Request, reply, *, out: dict, failed_reply: list, attempt: int) -> bool:
        """Records one reply into the row's columns; True when the request is done."""
        i, run = req.row, req.recipe
        col = run.col
        out[col("attempts")][i] = attempt + 1
        if isinstance(reply, Exception):
            reason, tokens, done = f"engine_error:{type(reply).__name__}", 0, False
            out[col("status")][i] = failed(reason)
        else:
            for key, value in (("gen_prompt_tokens", reply.prompt_tokens), ("gen_cached_prompt_tokens", reply.cached_tokens),
                               ("gen_output_tokens", reply.output_tokens), (col("prompt_tokens"), reply.prompt_tokens),
                               (col("cached_prompt_tokens"), reply.cached_tokens)):
                out[key][i] += value
            tokens = reply.output_tokens
            done, reason = run.record(out, req, raw=reply.text, tokens=tokens, tok=self._tok)
            if done:
                failed_reply[i].pop(run.recipe.name, None)
            else:
                failed_reply[i][run.recipe.name] = reply.text[:FAILED_REPLY_CHARS]
        out[col("generated_tokens")][i] += tokens
        if col("attempt_log") in run.columns:
            out[col("attempt_log")][i].append(f"{reason}:{tokens}")
        return done


class NoGeneration(Stage):
    """Stands in for generation when it is disabled (score-and-select runs): same columns, no engine."""

    name = "generate"
    reads = ("selected",)

    def __init__(self, cfg: GenerationConfig, *, recipes: list[Recipe] | None = None):
        self.runs = [(r, recipe_columns(r, r.load_pack())) for r in (recipes if recipes is not None else run_recipes(cfg))]
        self.columns = {**{k: t for _, cols in self.runs for k, t in cols.items()}, **SHARED_COLUMNS}
        self.adds = tuple(self.columns)
        self.resources = Resources(num_cpus=0.25, batch_size=4096)

    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        selected = batch.column("selected").to_pylist()
        values = {k: [None] * n for k in self.columns}
        for k in ("gen_prompt_tokens", "gen_cached_prompt_tokens", "gen_output_tokens"):
            values[k] = [0] * n
        for recipe, cols in self.runs:
            c = recipe.column
            values[c("status")] = ["generation_disabled" if s else NOT_SELECTED for s in selected]
            for key in ("attempts", "generated_tokens", "prompt_tokens", "cached_prompt_tokens"):
                values[c(key)] = [0] * n
        for key, typ in self.columns.items():
            batch = batch.append_column(key, pa.array(values[key], typ))
        return batch


def column_defaults(source) -> dict:
    """Values of the generation columns for rows the engine never saw: each recipe's defaults and
    zero engine usage (everything else null). `source`: RecipeRuns, or a GenerationConfig."""
    runs = [RecipeRun(r, source, replace_tokens=0) for r in run_recipes(source)] if isinstance(source, GenerationConfig) else source
    out = {"gen_prompt_tokens": 0, "gen_cached_prompt_tokens": 0, "gen_output_tokens": 0}
    for run in runs:
        out.update(run.defaults())
    return out


def generator_columns(cfg: GenerationConfig, recipes: list[Recipe] | None = None) -> dict[str, pa.DataType]:
    """Every column the generation stage adds for a config's recipes (or `recipes`), with types."""
    recipes = recipes if recipes is not None else run_recipes(cfg)
    return {**{k: t for r in recipes for k, t in recipe_columns(r, r.load_pack()).items()}, **SHARED_COLUMNS}
