"""Benchmark: the generation stage inside the Ray pipeline vs one plain `vllm.LLM.chat` call on
the whole request list: the same requests (the pack's prompts, per-document seeds, structured
outputs), the same engine arguments, the same cores (both bind their engine threads to the cores
the replica's reservation gives, `engine.configure_cpu_threads`).

    .venv/bin/python bench/bench_generation.py [--batches 4 8] [--batch-size 24] [--modes fast reproducible]
        [--repeat 3] [--pack bench|PATH] [--set generation.field=value ...]

`--pack bench` (default) is the built-in reflection-v2 pack plus a per-section guidance table, so
its system prompt is ~4,900 target tokens, the size of the published SPP prompt. One row per
workload of `--batches` engine batches (`batches x batch-size` real documents, all selected).
Each repetition runs the Ray stage in each mode (`fast`: continuous batching; `reproducible`:
one batch at a time), then the plain call on all the requests, each in a fresh process. The
stage's time is its busy span, from its first batch's start to its last batch's end (engine load
excluded); beside it, the sum of the batches' busy shares, and the reproducible replica's
re-warm and tail seconds (its engine calls after half of a call's requests finished). Ratios of
output tokens/s to the plain call per repetition, median and spread, then a summary per workload.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
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

CORPUS = REPO.parent / "shared" / "data" / "corpus"


def bench_pack(dest: Path) -> Path:
    """reflection-v2 with a guidance table (one guiding question per section) as its writing
    guidelines: the published prompt's size, with this project's own words."""
    from annotator.method.prompt_packs import load_pack, resolve_pack_path

    src = resolve_pack_path("reflection-v2")
    shutil.copytree(src, dest)
    pack = load_pack("reflection-v2")
    rows = [f"| {s.id} {s.title} | Who in this text could be affected by a failure of {s.title.lower()}, and does the text "
            f"depict it, report it, excuse it or argue for it? Cite [{s.id}] only when the text itself engages it. |"
            for s in pack.constitution.sections]
    guidance = (dest / "writing_guidelines.md").read_text() + "\n\n| Section | Guiding question |\n|---|---|\n" + "\n".join(rows) + "\n"
    (dest / "writing_guidelines.md").write_text(guidance)
    text = (dest / "pack.yaml").read_text().replace("name: reflection-v2", "name: reflection-v2-bench")
    (dest / "pack.yaml").write_text(text)
    return dest


def documents(n: int) -> pa.Table:
    t = pq.read_table(sorted(CORPUS.glob("*.parquet"))[0], columns=["id", "text"]).slice(0, n)
    n = t.num_rows
    return pa.table({"doc_id": t.column("id"), "text": t.column("text"), "selected": pa.array([True] * n), "is_bad": pa.array([False] * n)})


def stage_for(cfg, *, eager: bool = False):
    from annotator.generate.generator import Generator
    from annotator.engine.resources import replica_cpus

    class EagerGenerator(Generator):
        """Loads the engine when the actor starts, as the pipeline's GenerateAndSave does before it
        times a batch: the stage's busy time is then the engine's work on the batch alone."""

        def setup(self) -> None:
            self.load_engine()

        def process(self, batch: pa.Table) -> pa.Table:
            started = time.time()
            out = super().process(batch)
            n, drain = out.num_rows, self._engine.drain  # drain: cumulative over the replica's batches
            columns = {"_bench_start": [started] * n, "_bench_end": [time.time()] * n,
                       "_bench_rewarm": [drain["rewarm_seconds"]] * n, "_bench_tail": [drain["tail_seconds"]] * n}
            for name, values in columns.items():
                out = out.append_column(name, pa.array(values, pa.float64()))
            return out

    cpus = replica_cpus(cfg, {"CPU": cfg.ray.num_cpus or 2})
    cls = EagerGenerator if eager else Generator
    return cls(cfg.generation, tokenizer=cfg.output.tokenizer, content_tokens=cfg.content_tokens,
               replace_tokens=cfg.output.seq_length, num_cpus=cpus)


def side_plain(cfg, docs: pa.Table) -> dict:
    """The stage's own requests, sent as one list to one `vllm.LLM.chat`."""
    stage = stage_for(cfg)
    stage.load_engine()  # the same engine arguments, threads bound to the same cores
    _, requests = stage.build_requests(docs)
    ids = docs.column("doc_id").to_pylist()
    params = [stage._sampling(r.recipe, ids[r.row], attempt=0) for r in requests]
    started = time.perf_counter()
    outs = stage._engine.llm.chat([r.messages for r in requests], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "prompt": sum(len(o.prompt_token_ids) for o in outs),
            "cached": sum(o.num_cached_tokens or 0 for o in outs), "output": sum(len(o.outputs[0].token_ids) for o in outs),
            "requests": len(outs), "threads": stage._engine.threads,
            "system_tokens": len(stage._tok.encode(stage.runs[0].pack.system_prompt()))}


def side_ray(cfg, docs: pa.Table, tmp: Path) -> dict:
    import ray
    import ray.data

    from annotator.core.ray_adapter import apply_stages
    from annotator.core.stages import TIMING_PREFIX

    ray.init(num_cpus=cfg.ray.num_cpus or 2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    stage = stage_for(cfg, eager=True)
    started = time.perf_counter()
    # From the object store: no read task competes with the replica for the node's CPUs (the
    # pipeline's own planning tasks reserve 0.25 CPU, which `num_cpus: auto` leaves them).
    # One block per engine batch, as the pipeline plans them (a block's batches would otherwise
    # run one after another inside one call of the actor).
    size = cfg.generation.batch_size
    blocks = [docs.slice(start, size) for start in range(0, docs.num_rows, size)]
    out = apply_stages(ray.data.from_arrow(blocks), [stage]).materialize()
    wall = time.perf_counter() - started
    table = pa.concat_tables([ray.get(ref) for ref in out.to_arrow_refs()])
    ray.shutdown()
    total = lambda col: int(pc.sum(table.column(col)).as_py())  # noqa: E731
    first = pc.list_element(table.column("reflection_attempt_log"), 0).to_pylist()  # the main recipe's
    return {
        # From the first batch's start to the last one's end: the engine's busy span, idle gaps
        # between batches included (with batches in flight together, busy times overlap).
        "seconds": pc.max(table.column("_bench_end")).as_py() - pc.min(table.column("_bench_start")).as_py(),
        "busy_sum": float(pc.sum(table.column(TIMING_PREFIX + "generate")).as_py()),
        "rewarm": pc.max(table.column("_bench_rewarm")).as_py(), "tail": pc.max(table.column("_bench_tail")).as_py(),
        "batching": cfg.generation.batching,
        "wall_with_engine_load": wall,
        "prompt": total("gen_prompt_tokens"), "cached": total("gen_cached_prompt_tokens"), "output": total("gen_output_tokens"),
        # The first attempt of every document is the plain call's request; retries come on top.
        "first_attempt_output": sum(int(e.rsplit(":", 1)[1]) for e in first if e),
        "requests": total("reflection_attempts"), "cpus": stage.resources.num_cpus,
        "ok": int(pc.sum(pc.equal(table.column("reflection_status"), "ok")).as_py()),
    }


MODES = {"fast": "false", "reproducible": "true"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8], help="engine batches per workload (one row each)")
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pack", default="bench", help="'bench' (v2 at the published prompt size) or a pack path/name")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--side", choices=["ray", "plain"], help=argparse.SUPPRESS)  # one side, in a child process
    ap.add_argument("--docs", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        pack = str(bench_pack(Path(tmp) / "pack")) if args.pack == "bench" else args.pack
        overrides = [f"generation.batch_size={args.batch_size}", f"generation.prompt_pack={pack}", "generation.canaries.file=null",
                     "generation.max_retries=0", *args.overrides]
        if args.side:
            cfg = load_config(args.config, overrides=overrides)
            docs = documents(args.docs)
            result = side_ray(cfg, docs, Path(tmp)) if args.side == "ray" else side_plain(cfg, docs)
            Path(args.json).write_text(json.dumps(result))
            sys.stdout.flush()
            import psutil

            for child in psutil.Process().children(recursive=True):
                child.kill()  # vLLM's engine processes would outlive us and hold our output pipes
            os._exit(0)  # and its shutdown can hang the interpreter's exit; the result is written
        rows = {}
        for batches in args.batches:
            runs = []
            for rep in range(args.repeat):
                rep_result = {}
                for side in [*args.modes, "plain"]:
                    out = Path(tmp) / f"{side}-{batches}-{rep}.json"
                    cmd = [sys.executable, __file__, "--side", "plain" if side == "plain" else "ray", "--json", str(out),
                           "--docs", str(batches * args.batch_size), "--batch-size", str(args.batch_size), "--config", args.config,
                           "--pack", pack]
                    for o in [*args.overrides, *([f"generation.reproducible={MODES[side]}"] if side in MODES else [])]:
                        cmd += ["--set", o]
                    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                    if proc.returncode:
                        sys.exit(f"{side} side failed:\n{proc.stderr[-4000:]}")
                    rep_result[side] = json.loads(out.read_text())
                runs.append(rep_result)
                print(f"{batches} batches: repetition {rep + 1} done", flush=True)
            rows[batches] = runs
            report(args, batches, runs)
        summary(args, rows)


def ratio(ray: dict, plain: dict) -> float:
    return (ray["output"] / ray["seconds"]) / (plain["output"] / plain["seconds"])


def report(args, batches: int, runs: list[dict]) -> None:
    plain0 = runs[0]["plain"]
    docs = batches * args.batch_size
    print(f"\n{batches} batches: {docs} documents, batch size {args.batch_size}, pack system prompt {plain0['system_tokens']} target "
          f"tokens, engine threads: {plain0['threads']}")
    print(f"{'rep':<4} {'what':<44} {'seconds':>8} {'busy sum':>9} {'re-warm':>8} {'tail':>7} {'out tok/s':>10} {'cache hit':>10} "
          f"{'computed prompt tok/doc':>24} {'ok':>7}")
    for i, r in enumerate(runs, 1):
        for side in [*args.modes, "plain"]:
            v = r[side]
            name = "plain vllm.LLM.chat (all prompts)" if side == "plain" else f"Ray stage, {v['batching'].split(',')[0]}"
            extra = (f"{v['busy_sum']:>9.1f} {v['rewarm']:>8.1f} {v['tail']:>7.1f}" if side != "plain" else f"{'':>9} {'':>8} {'':>7}")
            ok = f"{v['ok']}/{docs}" if side != "plain" else ""
            print(f"{i:<4} {name:<44} {v['seconds']:>8.1f} {extra} {v['output'] / v['seconds']:>10.1f} {v['cached'] / v['prompt']:>10.3f} "
                  f"{(v['prompt'] - v['cached']) / docs:>24.1f} {ok:>7}")
    for mode in args.modes:
        ratios = [ratio(r[mode], r["plain"]) for r in runs]
        times = [r["plain"]["seconds"] / r[mode]["seconds"] for r in runs]
        print(f"{mode}: ratio to plain vLLM, output tokens/s, per repetition " + " / ".join(f"{x:.2f}" for x in ratios)
              + f"; median {statistics.median(ratios):.2f}, spread {min(ratios):.2f}-{max(ratios):.2f}"
              + f"; on time for the same requests: median {statistics.median(times):.2f}")


def summary(args, rows: dict) -> None:
    print("\nsummary: median ratio to plain vLLM, output tokens/s (spread)" + (" (target for fast: >= 0.9)" if "fast" in args.modes else ""))
    for batches, runs in rows.items():
        parts = []
        for mode in args.modes:
            ratios = [ratio(r[mode], r["plain"]) for r in runs]
            parts.append(f"{mode} {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
        print(f"  {batches} batches of {args.batch_size}: " + ", ".join(parts))
    print("(sampling is seeded per document, but the engines' outputs differ in length with what shares a step, which moves "
          "time and tokens/s apart)")


if __name__ == "__main__":
    main()
