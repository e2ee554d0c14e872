"""Drives one real streaming engine (`generation.reproducible: false`) from several threads and
writes what happened as JSON (a file, because vLLM's engine starts subprocesses that need a real
__main__ module).

    python tests/stream_probe.py OUT_JSON
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCHES, PER_BATCH = 3, 4


def main() -> None:
    import psutil

    from annotator.config import GenerationConfig
    from annotator.engine.stream import HOST, EngineDied
    from annotator.engine.vllm_engine import Engine

    cfg = GenerationConfig.model_validate({"enforce_eager": True, "gpu_memory_utilization": 0.1, "max_model_len": 1024, "seed": 3,
                                          "engine_process": "separate"})
    engine = Engine(cfg, num_cpus=2)
    engine.load()
    system = {"role": "system", "content": "You answer in one short sentence."}
    engine.warm([[system, {"role": "user", "content": ""}]], [None])
    result: dict = {"streaming": engine.stream is not None, "batches": {}, "in_host": []}
    inside = [0]

    def host_work() -> None:
        inside[0] += 1
        result["in_host"].append(inside[0])
        time.sleep(0.01)  # prompts and replies are host work: never two threads at once
        inside[0] -= 1

    def batch(b: int) -> None:
        with HOST:
            host_work()
            words = ["cats", "rivers", "bridges", "winter", "music", "bread", "trains", "stars", "salt", "maps", "tea", "clocks"]
            msgs = [[system, {"role": "user", "content": f"Say something about {words[b * PER_BATCH + i]}." + " Please." * (b * PER_BATCH + i)}]
                    for i in range(PER_BATCH)]
            if b == 1:  # one request the engine refuses (longer than its context) fails alone
                msgs[2] = [system, {"role": "user", "content": "word " * 3000}]
            params = [engine.sampling(seed=b * 100 + i, max_tokens=24 + 8 * b, schema=None) for i in range(PER_BATCH)]
            expected = [engine.prompt_tokens(m) for m in msgs]
            started = time.monotonic()
            replies = engine.chat(msgs, params)
            host_work()
            result["batches"][b] = {
                "seconds": [started, time.monotonic()], "expected_prompt_tokens": expected,
                "replies": [{"error": type(r).__name__, "message": str(r)[:300]} if isinstance(r, Exception) else
                            {"prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens, "text": r.text} for r in replies]}

    threads = [threading.Thread(target=batch, args=(b,)) for b in range(BATCHES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result["peak_running"] = engine.stream.peak_running

    # The engine process dies while a request runs: the caller gets EngineDied, later calls too.
    core = [p for p in psutil.Process().children(recursive=True) if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()]
    result["engine_core_found"] = bool(core)
    from vllm import SamplingParams

    killer = threading.Timer(1.0, lambda: [p.kill() for p in core])
    killer.start()
    for attempt in ("running", "after"):
        try:  # 900 tokens whatever the model says: still running when the engine process is killed
            engine.chat([[system, {"role": "user", "content": "Count to one thousand."}]], [SamplingParams(max_tokens=900, ignore_eos=True, seed=1)])
            result[f"died_{attempt}"] = None
        except EngineDied as err:
            result[f"died_{attempt}"] = str(err)[:200]
    Path(sys.argv[1]).write_text(json.dumps(result))
    sys.stdout.flush()
    import os

    for child in psutil.Process().children(recursive=True):
        child.kill()
    os._exit(0)


if __name__ == "__main__":
    main()
