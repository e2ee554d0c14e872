"""The SFT replica stage: holds one `engine.Engine` per replica, generates one planned batch of
conversations per call with `sft.generate_batch` and saves it atomically before returning, so a
rerun skips every saved batch (`sft_export` plans the batches and writes the datasets).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from annotator.config import ConfigError, RunConfig
from annotator.sft.conversation import followup_schema, generate_batch, load_sft_packs, render_user, reply_schema
from annotator.core.stages import Resources, Stage


def batch_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / "_work" / "generated" / f"batch-{index:05d}.parquet"


class SftGenerateAndSave(Stage):
    """A vLLM replica: one planned batch of conversations per call, generated and saved (atomically)
    before the call returns; a batch already saved is skipped. Returns only counts."""

    name = "sft_generate"
    reads = ("batch_index", "rows")
    adds = ("batch_index", "conversations", "failures", "output_tokens", "engine_loads")
    stateful = True

    def __init__(self, cfg: RunConfig, *, out_dir: str, num_cpus: float):
        g = cfg.generation
        self.cfg = cfg
        self.out_dir = out_dir
        self.resources = Resources(num_cpus=num_cpus, num_gpus=g.num_gpus, concurrency=g.concurrency, batch_size=1,
                                   max_in_flight=g.max_batches_in_flight, max_restarts=g.max_replica_restarts)
        self._engine = None

    def load_engine(self) -> None:
        from annotator.engine.vllm_engine import Engine

        packs = load_sft_packs(self.cfg)
        engine = Engine(self.cfg.generation, num_cpus=self.resources.num_cpus)
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

    def process(self, batch: pa.Table) -> pa.Table:
        from annotator.core.checkpoint import write_table

        out = []
        for plan in batch.to_pylist():
            path = batch_path(Path(self.out_dir), plan["batch_index"])
            loads = 0
            if path.exists():  # saved by an earlier attempt of this batch
                out.append({"batch_index": plan["batch_index"], "conversations": 0, "failures": 0, "output_tokens": 0, "engine_loads": 0})
                continue
            if self._engine is None:
                self.load_engine()
                loads = 1
            table = generate_batch(self._engine, self._packs, cfg=self.cfg, rows=json.loads(plan["rows"]))
            write_table(path, table)
            status = table.column("status").to_pylist()
            out.append({"batch_index": plan["batch_index"], "conversations": table.num_rows,
                        "failures": sum(st.startswith("failed") for st in status),
                        "output_tokens": sum(table.column("output_tokens").to_pylist()), "engine_loads": loads})
        return pa.Table.from_pylist(out, schema=pa.schema([(k, pa.int64()) for k in self.adds]))
