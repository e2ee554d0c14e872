"""Runs one Generator on real documents and writes its output (a file, because vLLM's
engine starts subprocesses that need a real __main__ module).

    python tests/generation_probe.py CONFIG_JSON DOCS_PARQUET OUT_PARQUET
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402


def main() -> None:
    import vllm

    from annotator.config import GenerationConfig
    from annotator.generate.generator import Generator

    loads = []
    original_init = vllm.LLM.__init__

    def counting_init(self, *args, **kwargs):
        loads.append(kwargs.get("model"))
        original_init(self, *args, **kwargs)

    vllm.LLM.__init__ = counting_init
    from vllm.v1.engine.llm_engine import LLMEngine

    prompts = []  # the token ids of every request added to the engine
    original_add = LLMEngine.add_request

    def recording_add(self, request_id, prompt, *args, **kwargs):
        prompts.append(list(prompt["prompt_token_ids"]))
        return original_add(self, request_id, prompt, *args, **kwargs)

    LLMEngine.add_request = recording_add
    spec = json.loads(sys.argv[1])
    tokenizer = spec.pop("_tokenizer", "builtin:smollm2-135m-instruct")
    content = spec.pop("_content_tokens", 1920)
    cfg = GenerationConfig.model_validate(spec)
    stage = Generator(cfg, tokenizer=tokenizer, content_tokens=content)
    stage.setup()
    out = stage.process(pq.read_table(sys.argv[2]))  # the engine loads with this first batch
    pq.write_table(out, sys.argv[3])
    Path(sys.argv[3]).with_suffix(".json").write_text(json.dumps({"engine_loads": len(loads), "max_prefix_tokens": stage.runs[0].max_prefix_tokens,
                                                              "threads": stage._engine.threads}))
    Path(sys.argv[3]).with_suffix(".prompts.json").write_text(json.dumps(prompts))


if __name__ == "__main__":
    main()
