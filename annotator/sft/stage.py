"""SFT conversations as a replica task: one planned batch of conversations per call, each turn
of every conversation of the batch in one engine call (`conversation.generate_batch`), saved under
`layout.sft_batch_path`, so a rerun skips every saved batch (`export` plans the batches and writes
the datasets).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from annotator.config import ConfigError, RunConfig
from annotator.core import storage
from annotator.core.layout import sft_batch_path
from annotator.engine.replica import ReplicaStage, ReplicaTask, replica_resources
from annotator.sft.conversation import followup_schema, generate_batch, load_sft_packs, render_user, reply_schema
from annotator.core.statuses import is_failed


class SftTask(ReplicaTask):
    """Turns planned batches of conversations (their drawn prompts as JSON) into saved turns."""

    name = "sft_generate"
    reads = ("batch_index", "rows")
    keys = {"batch_index": pa.int64()}
    counts = ("conversations", "failures", "output_tokens")

    def __init__(self, cfg: RunConfig, *, out_dir: str):
        self.cfg = cfg
        self.out_dir = out_dir
        self._engine = None

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def load(self, *, num_cpus: float) -> int:
        from annotator.engine.vllm_engine import Engine

        packs = load_sft_packs(self.cfg)
        engine = Engine(self.cfg.generation, num_cpus=num_cpus)
        engine.load()
        s = self.cfg.sft
        longest = max(packs.canaries, key=lambda c: len(c.instruction), default=None)
        probe = render_user(packs, "", harm_category="adversarial_harmful", canary=longest if longest and longest.action == "inject" else None)
        need = engine.prompt_tokens([{"role": "system", "content": packs.system}, {"role": "user", "content": probe}]) + s.max_output_tokens
        if need > self.cfg.generation.max_model_len:
            raise ConfigError(f"generation.max_model_len={self.cfg.generation.max_model_len} cannot hold the SFT pack's prompt and a "
                              f"{s.max_output_tokens}-token reply ({need} tokens before any user text)")
        engine.warm([[{"role": "system", "content": packs.system}, {"role": "user", "content": ""}],
                     [{"role": "system", "content": packs.followup_system}, {"role": "user", "content": ""}]],
                    [reply_schema(s.max_output_tokens), followup_schema(s.followup_max_tokens)])
        self._packs, self._engine = packs, engine
        return 1

    def batch_path(self, plan: dict) -> Path:
        return sft_batch_path(storage.location(self.out_dir), plan["batch_index"])

    def run(self, plan: dict) -> pa.Table:
        return generate_batch(self._engine, self._packs, cfg=self.cfg, rows=json.loads(plan["rows"]))

    def count(self, table: pa.Table) -> dict[str, int]:
        status = table.column("status").to_pylist()
        return {"conversations": table.num_rows, "failures": sum(is_failed(st) for st in status),
                "output_tokens": sum(table.column("output_tokens").to_pylist())}


def sft_stage(cfg: RunConfig, *, out_dir: str, num_cpus: float) -> ReplicaStage:
    """The SFT run's replicas: the SFT task on the generation engine's actor pool."""
    return ReplicaStage(SftTask(cfg, out_dir=out_dir),
                        resources=replica_resources(cfg.generation, num_cpus=num_cpus, max_in_flight=cfg.generation.batches_in_flight))
