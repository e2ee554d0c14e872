"""Benchmark: the generation stage inside the Ray pipeline vs one plain `vllm.LLM.chat` call on
the whole prompt list, with the same prompts, sampling settings and engine arguments.

    .venv/bin/python bench/bench_generation.py [--docs 64] [--batch-size 32] [--set generation.field=value ...]

Prints output and prompt tokens/s, prefix-cache hit rate, prompt tokens computed per document
with and without prefix caching, and the ratio of the Ray stage to plain vLLM.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from annotator.config import load_config  # noqa: E402
from annotator.generation import REFLECTION, ReflectionGenerator  # noqa: E402
from annotator.stages import TIMING_PREFIX, apply_stages  # noqa: E402

CORPUS = REPO.parent / "shared" / "data" / "corpus"


def documents(n: int) -> pa.Table:
    t = pq.read_table(sorted(CORPUS.glob("*.parquet"))[0], columns=["id", "text"]).slice(0, n)
    return pa.table({"doc_id": t.column("id"), "text": t.column("text"), "selected": pa.array([True] * t.num_rows)})


def plain_vllm(cfg, docs: pa.Table) -> dict:
    """The same requests the stage builds, sent as one list to one `vllm.LLM`."""
    stage = ReflectionGenerator(cfg)
    stage.load_engine()  # builds the vllm.LLM with the same engine arguments
    _, pending, _ = stage.build_requests(docs)
    keys = list(pending)
    ids = docs.column("doc_id").to_pylist()
    params = [stage._sampling(task, ids[i], 0) for i, task in keys]
    started = time.perf_counter()
    outs = stage.llm.chat([pending[k] for k in keys], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    result = {
        "seconds": seconds,
        "prompt": sum(len(o.prompt_token_ids) for o in outs),
        "cached": sum(o.num_cached_tokens or 0 for o in outs),
        "output": sum(len(o.outputs[0].token_ids) for o in outs),
        "requests": len(outs),
    }
    del stage.llm
    return result


def ray_stage(cfg, docs: pa.Table, tmp: Path) -> dict:
    import ray.data

    path = tmp / "docs.parquet"
    pq.write_table(docs, path)
    started = time.perf_counter()
    out = apply_stages(ray.data.read_parquet(str(path)), [ReflectionGenerator(cfg)]).materialize()
    wall = time.perf_counter() - started
    table = pa.concat_tables([ray.get(ref) for ref in out.to_arrow_refs()])
    total = lambda col: int(pc.sum(table.column(col)).as_py())  # noqa: E731
    return {
        "seconds": float(pc.sum(table.column(TIMING_PREFIX + "generate")).as_py()),
        "wall_with_engine_load": wall,
        "prompt": total("gen_prompt_tokens"),
        "cached": total("gen_cached_prompt_tokens"),
        "output": total("gen_output_tokens"),
        "requests": int(pc.sum(pc.greater(table.column("reflection_attempts"), 0)).as_py()),
        "attempts": total("reflection_attempts"),
        "ok": int(pc.sum(pc.equal(table.column("reflection_status"), "ok")).as_py()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config, overrides=[f"generation.batch_size={args.batch_size}", *args.overrides]).generation
    docs = documents(args.docs)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        staged = ray_stage(cfg, docs, Path(tmp))
    ray.shutdown()
    plain = plain_vllm(cfg, docs)

    print(f"\n{args.docs} documents, model {cfg.model}, batch size {cfg.batch_size}, enforce_eager={cfg.enforce_eager}")
    print(f"{'what':<34} {'seconds':>8} {'out tok/s':>10} {'prompt tok/s':>13} {'cache hit':>10} {'computed prompt tok/doc':>24}")
    for name, r in (("plain vllm.LLM.chat (all prompts)", plain), ("Ray pipeline stage (busy time)", staged)):
        print(f"{name:<34} {r['seconds']:>8.1f} {r['output'] / r['seconds']:>10.1f} {r['prompt'] / r['seconds']:>13.1f} "
              f"{r['cached'] / r['prompt']:>10.3f} {(r['prompt'] - r['cached']) / args.docs:>24.1f}")
    print(f"\nprompt tokens per document without prefix caching: {plain['prompt'] / args.docs:.1f}; "
          f"computed with caching: plain {(plain['prompt'] - plain['cached']) / args.docs:.1f}, "
          f"Ray stage {(staged['prompt'] - staged['cached']) / args.docs:.1f}")
    print(f"Ray stage: {staged['ok']}/{args.docs} reflections ok, {staged['attempts']} attempts; wall incl. engine load "
          f"{staged['wall_with_engine_load']:.1f}s")
    print(f"ratio Ray stage / plain vLLM, output tokens/s = {(staged['output'] / staged['seconds']) / (plain['output'] / plain['seconds']):.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
