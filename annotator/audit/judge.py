"""The audit's judge: one chat request per item, answered by vLLM replicas on the cluster (the
generation engine with the judge's model and generation's engine settings) or by an
OpenAI-compatible endpoint. Replies are JSON objects of a rubric pack's fields (integer scores,
then a `reason`), enforced by structured outputs and checked here; one that does not parse is
retried with a new seed. Each batch of judgements is saved when done, so an interrupted audit
resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from annotator.config import ConfigError, GenerationConfig, JudgeConfig, RunConfig
from annotator.engine.vllm_engine import Engine, Reply
from annotator.core import storage
from annotator.core.layout import judge_batch_path
from annotator.core.seeding import sampling_seed
from annotator.engine.replica import ReplicaStage, ReplicaTask, replica_resources
from annotator.core.ray_adapter import configure_ray_data_console, items_dataset, run_stages
from annotator.method.prompt_packs import PromptPack
from annotator.generate.replies import json_object, strip_reasoning
from annotator.core.statuses import OK, failed

REASON = "reason"
RAW_CHARS = 2000
ENDPOINT_REQUESTS_PER_REPLICA = 16


@dataclass(frozen=True)
class Rubric:
    """A judge pack and the integer range of its score fields (every field but `reason`)."""

    pack: PromptPack
    low: int
    high: int

    @property
    def scores(self) -> tuple[str, ...]:
        return tuple(f for f in self.pack.fields if f != REASON)

    def schema(self) -> dict:
        score = {"type": "integer", "minimum": self.low, "maximum": self.high}
        props = {f: score for f in self.scores} | {REASON: {"type": "string", "maxLength": 600}}
        return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}

    def parse(self, raw: str) -> tuple[dict | None, str]:
        """The reply's scores and reason, or None and why not."""
        text, _ = strip_reasoning(raw)
        obj = json_object(text) if text is not None else None
        if obj is None:
            return None, "unparseable_json"
        out = {}
        for f in self.scores:
            value = obj.get(f)
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value.strip())
            if not isinstance(value, int) or isinstance(value, bool) or not self.low <= value <= self.high:
                return None, f"bad_score:{f}"
            out[f] = value
        reason = obj.get(REASON)
        out[REASON] = " ".join(reason.split()) if isinstance(reason, str) else ""
        return out, OK


def judge_engine_config(cfg: RunConfig) -> GenerationConfig:
    """The generation engine's settings with the judge's model, GPUs, replicas and sampling."""
    gen, judge = cfg.generation, cfg.audit.judge
    return gen.model_copy(update=dict(
        model=judge.model or gen.model,
        num_gpus=gen.num_gpus if judge.num_gpus is None else judge.num_gpus,
        concurrency=judge.concurrency or gen.concurrency,
        max_model_len=judge.max_model_len or gen.max_model_len,
        temperature=judge.temperature, top_p=1.0, repetition_penalty=1.0, sampling={}, max_output_tokens=judge.max_output_tokens,
    ))


class EndpointClient:
    """Chat requests to an OpenAI-compatible server, `concurrency` in flight."""

    def __init__(self, judge: JudgeConfig, *, concurrency: int):
        from openai import OpenAI

        key = os.environ.get(judge.api_key_env)
        if not key:   # checked by the driver too; a worker on another node may not have it
            raise ConfigError(f"audit.judge.api_key_env: {judge.api_key_env} is not set on this node")
        self.client = OpenAI(base_url=judge.base_url, api_key=key, timeout=judge.request_timeout_s, max_retries=2)
        self.model = judge.model
        self.judge = judge
        self.pool = ThreadPoolExecutor(max_workers=concurrency)

    def _one(self, messages: list[dict], seed: int, *, schema: dict) -> Reply:
        out = self.client.chat.completions.create(
            model=self.model, messages=messages, temperature=self.judge.temperature, max_tokens=self.judge.max_output_tokens,
            seed=seed, response_format={"type": "json_schema", "json_schema": {"name": "judgement", "schema": schema}},
        )
        usage = out.usage
        details = getattr(usage, "prompt_tokens_details", None)
        return Reply(out.choices[0].message.content or "", usage.prompt_tokens if usage else 0,
                     (getattr(details, "cached_tokens", 0) or 0) if details else 0, usage.completion_tokens if usage else 0)

    def chat(self, messages: list, seeds: list[int], *, schema: dict) -> list[Reply | Exception]:
        def call(args):
            try:
                return self._one(*args, schema=schema)
            except Exception as err:  # noqa: BLE001 - one failed request fails alone
                return err
        return list(self.pool.map(call, zip(messages, seeds)))


class JudgeTask(ReplicaTask):
    """A judge worker's task: one batch of items ({id, user}) per plan, judged (with retries) and
    saved under `layout.judge_batch_path`."""

    name = "judge"
    reads = ("batch_index", "items")
    keys = {"batch_index": pa.int64()}
    counts = ("judged", "failed", "output_tokens")

    def __init__(self, cfg: RunConfig, *, rubric: Rubric, system: str, task: str, work_dir: str):
        self.judge = cfg.audit.judge
        self.engine_cfg = judge_engine_config(cfg)
        self.rubric = rubric
        self.system = system
        self.task = task
        self.work_dir = work_dir
        self.seed = cfg.generation.seed
        self._backend = None

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    def load(self, *, num_cpus: float) -> int:
        if self.judge.base_url:
            self._backend = EndpointClient(self.judge, concurrency=(self.judge.concurrency or 1) * ENDPOINT_REQUESTS_PER_REPLICA)
            return 0
        engine = Engine(self.engine_cfg, num_cpus=num_cpus)
        engine.load()
        engine.warm([self.messages("")], [self.rubric.schema()])
        self._backend = engine
        return 1

    def messages(self, user: str) -> list[dict]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    def _ask(self, users: list[str], seeds: list[int]) -> list[Reply | Exception]:
        schema = self.rubric.schema()
        if isinstance(self._backend, EndpointClient):
            return self._backend.chat([self.messages(u) for u in users], seeds, schema=schema)
        engine: Engine = self._backend
        params = [engine.sampling(seed=s, max_tokens=self.judge.max_output_tokens, schema=schema) for s in seeds]
        return engine.chat([self.messages(u) for u in users], params)

    def judge_items(self, items: list[dict]) -> pa.Table:
        n = len(items)
        rows = [{"id": it["id"], "status": failed("not_judged"), "attempts": 0, "raw_reply": None, "prompt_tokens": 0,
                 "output_tokens": 0, **{f: None for f in self.rubric.scores}, REASON: None} for it in items]
        pending = list(range(n))
        if pending and isinstance(self._backend, Engine):
            self._backend.begin_batch()
        for attempt in range(self.judge.max_retries + 1):
            if not pending:
                break
            seeds = [sampling_seed(self.task, self.seed, items[i]["id"], attempt) for i in pending]
            replies = self._ask([items[i]["user"] for i in pending], seeds)
            retry = []
            for i, reply in zip(pending, replies):
                row = rows[i]
                row["attempts"] = attempt + 1
                if isinstance(reply, Exception):
                    row["status"], row["raw_reply"] = failed(f"request_error:{type(reply).__name__}"), str(reply)[:RAW_CHARS]
                    retry.append(i)
                    continue
                row["prompt_tokens"] += reply.prompt_tokens
                row["output_tokens"] += reply.output_tokens
                parsed, why = self.rubric.parse(reply.text)
                if parsed is None:
                    row["status"], row["raw_reply"] = failed(why), reply.text[:RAW_CHARS]
                    retry.append(i)
                else:
                    row.update(parsed, status=OK, raw_reply=None)
            pending = retry
        schema = pa.schema([("id", pa.string()), ("status", pa.string()), ("attempts", pa.int8()), ("raw_reply", pa.string()),
                            ("prompt_tokens", pa.int32()), ("output_tokens", pa.int32()),
                            *[(f, pa.int8()) for f in self.rubric.scores], (REASON, pa.string())])
        return pa.Table.from_pylist(rows, schema=schema)

    def batch_path(self, plan: dict) -> Path:
        return judge_batch_path(storage.location(self.work_dir), plan["batch_index"])

    def run(self, plan: dict) -> pa.Table:
        return self.judge_items(json.loads(plan["items"]))

    def count(self, table: pa.Table) -> dict[str, int]:
        statuses = table.column("status").to_pylist()
        return {"judged": sum(s == OK for s in statuses), "failed": sum(s != OK for s in statuses),
                "output_tokens": sum(table.column("output_tokens").to_pylist())}


def judge_stage(cfg: RunConfig, *, rubric: Rubric, system: str, task: str, work_dir: str, num_cpus: float) -> ReplicaStage:
    """The judge's replicas: the generation engine's actor pool with the judge's model and GPUs, or
    light workers sending requests to an endpoint (`audit.judge.base_url`)."""
    judge, engine_cfg = cfg.audit.judge, judge_engine_config(cfg)
    remote = judge.base_url is not None
    concurrency = 1 if remote and not judge.concurrency else engine_cfg.concurrency
    resources = replica_resources(cfg.generation, num_cpus=0.5 if remote else num_cpus, num_gpus=0 if remote else engine_cfg.num_gpus,
                                  concurrency=concurrency)
    return ReplicaStage(JudgeTask(cfg, rubric=rubric, system=system, task=task, work_dir=work_dir), resources=resources)


def run_judge(items: list[dict], *, cfg: RunConfig, rubric: Rubric, system: str, task: str, work_dir: Path,
              num_cpus: float, log=print) -> tuple[pa.Table, dict]:
    """Judgements of `items` ({id, user}) in item order, reusing the batches saved in `work_dir`;
    and what this call did (batches reused/made, engine loads)."""
    judge = cfg.audit.judge
    if judge.base_url and not judge.model:
        raise ConfigError("audit.judge.model: with audit.judge.base_url, name the model the endpoint serves")
    if judge.base_url and not os.environ.get(judge.api_key_env):
        raise ConfigError(f"audit.judge.api_key_env: {judge.api_key_env} is not set; set it to the endpoint's key "
                          "(any value for an endpoint that takes none)")
    size = judge.batch_size
    batches = [items[i:i + size] for i in range(0, len(items), size)]
    todo = [b for b in range(len(batches)) if not judge_batch_path(work_dir, b).exists()]
    work = {"batches": len(batches), "batches_reused": len(batches) - len(todo), "engine_loads": 0}
    if todo:
        storage.mkdirs(work_dir)
        where = judge.base_url or f"{judge_engine_config(cfg).model} on {judge_engine_config(cfg).concurrency} replica(s)"
        log(f"[spp] judging {sum(len(batches[b]) for b in todo)} items ({task}) with {where}")
        stage = judge_stage(cfg, rubric=rubric, system=system, task=task, work_dir=str(work_dir), num_cpus=num_cpus)
        plans = [{"batch_index": b, "items": json.dumps(batches[b])} for b in todo]
        configure_ray_data_console()
        for row in run_stages(items_dataset(plans), [stage]):
            work["engine_loads"] += row["engine_loads"]
    tables = [storage.read_table(judge_batch_path(work_dir, b)) for b in range(len(batches))]
    table = pa.concat_tables(tables) if tables else pa.table({})
    if table.num_rows and table.column("id").to_pylist() != [it["id"] for it in items]:
        raise RuntimeError(f"{work_dir}: saved judgements do not match the sample (delete the folder to judge again)")
    return table, work
