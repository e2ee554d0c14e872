"""Benchmark: what a document costs the engine with one recipe and with six, in each prompt layout
(`generation.prompt_layout`: published, shared), and whether the shared layout writes as well.

    .venv/bin/python bench/bench_prefix_sharing.py [--docs 40] [--repeat 2] [--judge] [--keep DIR]
        [--layouts published shared] [--recipes one six] [--set generation.block_size=128 ...]

Each run is the real pipeline (`pipelines/spp_reflections.py`, demo config, built-in model on CPU)
on the first `--docs` demo documents, all selected (`selection.mode=random_fraction`, fraction 1),
one engine batch, no retries, one batch at a time (`reproducible`: the same seeds give the same
requests in every repetition). Per run, from `stats.json`: prompt tokens the engine computed (prompt
minus prefix-cached), output tokens, and the generate stage's busy seconds (engine time; the
engine load is excluded). Ratios: six recipes over one in the same layout and repetition, and six
shared over one published (the layout every run used before). Then per recipe and check the reply
checks' pass rates of the six-recipe runs side by side, and with `--judge` the judge audit
(`pipelines/audit.py --only reflections`, the run's own model as judge) of each six-recipe run's
reflections. With the 135M model these figures test the mechanics, not the quality of a method.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ONE = ["reflection"]
SIX = ["reflection", "reflection_end", "refusal_reflection", "preflection", "summary", "annotations"]
LAYOUTS = ("published", "shared")


def run(out: Path, *, docs: int, recipes: list[str], layout: str, extra: list[str] = ()) -> dict:
    sets = {"input.limit": docs, "selection.mode": "random_fraction", "selection.fraction": 1.0, "generation.batch_size": docs,
            "generation.max_retries": 0, "generation.recipes": json.dumps(recipes), "generation.prompt_layout": layout,
            "generation.max_model_len": 8192, "generation.reproducible": "true"}
    cmd = [sys.executable, str(REPO / "pipelines" / "spp_reflections.py"), "--config", "configs/demo.yaml", "--output", str(out)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    for override in extra:
        cmd += ["--set", override]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"run failed ({layout}, {len(recipes)} recipes):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    stats = json.loads((out / "stats.json").read_text())
    gen = stats["generation_tokens"]
    return {"computed": gen["prompt"] - gen["cached_prompt"], "prompt": gen["prompt"], "output": gen["output"],
            "engine_s": round(stats["stage_seconds"]["generate"], 1), "recipes": stats["recipes"], "out": out}


def judge(out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "pipelines" / "audit.py"), "--output", str(out), "--only", "reflections"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"audit failed on {out}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads((out / "stats.json").read_text())["audit"]["reflections"]


def cost_table(runs: dict, repeat: int) -> None:
    print("\n| layout | recipes | computed prompt tokens | output tokens | engine s (each repetition) | six/one: prompt, output, engine (median) |")
    print("|---|---|---|---|---|---|")
    for layout in LAYOUTS:
        for name in ("one", "six"):
            rows = runs.get((layout, name))
            if not rows:
                continue
            ratio = ""
            if name == "six" and runs.get((layout, "one")):
                one = runs[(layout, "one")]
                ratio = ", ".join(f"{statistics.median(r[k] / o[k] for r, o in zip(rows, one)):.2f}x" for k in ("computed", "output", "engine_s"))
            print(f"| {layout} | {name} | {rows[0]['computed']:,} | {rows[0]['output']:,} | {', '.join(str(r['engine_s']) for r in rows)} | {ratio} |")
    if runs.get(("shared", "six")) and runs.get(("published", "one")):
        six, one = runs[("shared", "six")], runs[("published", "one")]
        print(f"\nsix shared / one published: computed prompt {statistics.median(s['computed'] / o['computed'] for s, o in zip(six, one)):.2f}x, "
              f"engine {statistics.median(s['engine_s'] / o['engine_s'] for s, o in zip(six, one)):.2f}x ({repeat} repetitions)")


def _rate(check: dict) -> str:
    n = check["passed"] + check["failed"]
    return f"{check['passed']}/{n}" if n else "n/a"


def gate(p: dict, s: dict) -> bool:
    """The shared layout is not worse for this recipe: no reply check passes fewer requests, and
    no fewer outputs are kept."""
    pc, sc = p["reply_checks"].get("checks", {}), s["reply_checks"].get("checks", {})
    return s["outputs"]["kept"] >= p["outputs"]["kept"] and all(sc[c]["passed"] >= pc[c]["passed"] for c in pc if c in sc)


def fidelity_table(runs: dict, audits: dict) -> None:
    pub, sha = runs.get(("published", "six")), runs.get(("shared", "six"))
    if not (pub and sha):
        return
    print("\n| recipe | computed prompt tokens per document, published / shared | outputs kept | reply checks: passed, published / shared | not worse |")
    print("|---|---|---|---|---|")
    for name in SIX:
        p, s = pub[0]["recipes"][name], sha[0]["recipes"][name]
        checks = "; ".join(f"{c} {_rate(v)} / {_rate(s['reply_checks']['checks'][c])}" for c, v in sorted(p["reply_checks"].get("checks", {}).items())
                           if v["passed"] + v["failed"])
        print(f"| {name} | {p['computed_prompt_tokens_per_document']} / {s['computed_prompt_tokens_per_document']} | "
              f"{p['outputs']['kept']} / {s['outputs']['kept']} | {checks or 'none (tags)'} | {'yes' if gate(p, s) else 'no'} |")
    for layout, figures in audits.items():
        print(f"\njudge audit, {layout}: {json.dumps({k: figures.get(k) for k in ('judged', 'accept_rate', 'mean_score', 'mean', 'failed')})}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    ap.add_argument("--judge", action="store_true", help="judge each six-recipe run's reflections (first repetition)")
    ap.add_argument("--keep", help="keep the runs' outputs under this folder")
    ap.add_argument("--recipes", nargs="+", default=["one", "six"], choices=["one", "six"])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="a config override for every run (e.g. generation.block_size=128)")
    args = ap.parse_args()
    scratch = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    runs: dict = {}
    audits: dict = {}
    for rep in range(args.repeat):
        for layout in args.layouts:
            for name, recipes in [(n, r) for n, r in (("one", ONE), ("six", SIX)) if n in args.recipes]:
                out = scratch / f"{layout}-{name}-{rep}"
                shutil.rmtree(out, ignore_errors=True)
                r = run(out, docs=args.docs, recipes=recipes, layout=layout, extra=args.overrides)
                runs.setdefault((layout, name), []).append(r)
                print(f"rep {rep} {layout} {name}: computed {r['computed']:,}, output {r['output']:,}, engine {r['engine_s']} s", flush=True)
                if args.judge and rep == 0 and name == "six":
                    audits[layout] = judge(out)
    cost_table(runs, args.repeat)
    fidelity_table(runs, audits)
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
