"""Entry point: run the SPP reflections pipeline from a YAML config.

    python pipelines/spp_reflections.py --config configs/demo.yaml [--limit N] [--output DIR] [--set a.b=value ...]
    ray job submit --working-dir . -- python pipelines/spp_reflections.py --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runs as a script (also under `ray job submit --working-dir .`), where the repo root is not on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator.config import ConfigError, load_config  # noqa: E402
from annotator.score.reader import InputError  # noqa: E402
from annotator.core.stages import PipelineError  # noqa: E402
from annotator.core.errors import OutputDirError, ResourceError, RunError  # noqa: E402
from annotator.core.lock import OutputLock  # noqa: E402
from annotator.core.storage import location, reachable  # noqa: E402
from annotator.run.pipeline import run  # noqa: E402
from annotator.method.prompt_packs import PackError  # noqa: E402
from annotator.output.summary import format_summary  # noqa: E402
from annotator.core.ray_adapter import start_ray  # noqa: E402
from pipelines.cli import cli_overrides  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Score, select, reflect on and write an SPP corpus.")
    ap.add_argument("--config", help="YAML config (see configs/); with --add-recipe, optional (default: the run's recorded config)")
    ap.add_argument("--limit", type=int, help="read at most N documents (input.limit)")
    ap.add_argument("--output", help="output directory (output.path)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory (output.overwrite)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override one config field; repeatable")
    ap.add_argument("--add-recipe", dest="add_recipes", action="append", default=[], metavar="RECIPE",
                    help="add a recipe (e.g. reflection_end, preflection) to the finished run in --output, without rescoring or "
                         "regenerating anything; repeatable")
    ap.add_argument("--plan", action="store_true",
                    help="measure what the run will cost (scoring, then the engine on a calibration slice) and write the projection "
                         "to <output>/plan.json instead of running it; the run started later keeps plan and outcome in stats.json")
    args = ap.parse_args(argv)
    if args.plan and args.add_recipes:
        ap.error("--plan plans a run; it does not combine with --add-recipe")
    if not args.config and not args.add_recipes:
        ap.error("--config is required (or --add-recipe with --output)")
    if args.add_recipes and not args.output:
        ap.error("--add-recipe needs --output, the finished run to add to")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = cli_overrides(args, {"input.limit": args.limit})
    if args.add_recipes:
        return add(args, overrides)
    try:
        cfg = load_config(args.config, overrides=overrides)
        OutputLock.check_free(reachable(cfg.output.path))   # a folder in use (or out of reach): refused before Ray starts
    except (ConfigError, OutputDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start_ray(cfg)
    try:
        if args.plan:
            with OutputLock(location(cfg.output.path), command="spp_reflections.py --plan"):
                print(format_plan(cost_plan(cfg), output=cfg.output.path))
            return 0
        stats = run(cfg)   # holds the output folder's lock while it writes
    except (InputError, PipelineError, OutputDirError, FileNotFoundError, ConfigError, PackError, ResourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunError as err:
        print(f"error: the run broke an invariant: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - a job-level failure (e.g. replicas that keep dying): say why, exit non-zero
        guard = [line for line in str(err).splitlines() if "generation guard:" in line]
        if guard:  # the replica's own words, without Ray's traceback around them
            print("error: " + guard[-1][guard[-1].index("generation guard:"):], file=sys.stderr)
            return 1
        print(f"error: the run failed: {type(err).__name__}: {str(err)[-2000:]}\n"
              f"rerun the same command to resume from {cfg.output.path}", file=sys.stderr)
        return 1
    print(format_summary(stats, output=cfg.output.path))
    return 0


def cost_plan(cfg) -> dict:
    from annotator.run.plan import make_plan
    from annotator.score.reader import expand_paths
    from annotator.core.units import plan_input

    documents = plan_input(expand_paths(cfg.input.paths), cfg.input).documents
    return make_plan(cfg, documents_in_input=documents)


def format_plan(plan: dict, *, output: str) -> str:
    m, p = plan["measured"], plan["projection"]
    hours = "GPU-hours" if p["gpus_per_replica"] else "CPU replica-hours (no GPUs configured)"
    lines = [
        f"plan:        {output}/plan.json (measured in {plan['measured_in_seconds']:.0f}s)",
        f"selection:   {m['selected']} of {m['documents_scored']} scored documents selected ({100 * m['selected_share']:.2f}%) "
        f"-> {p['selected']:,} of {p['documents']:,}",
    ]
    if "replica_hours" in p:
        lines += [
            f"engine:      {m['calibration_documents']} calibration documents in {m['generate_seconds']}s: "
            f"{m['reflections_per_second_per_replica']} reflections/s per replica; per reflection {m['prompt_tokens_per_reflection']} "
            f"prompt tokens ({m['prompt_tokens_computed_per_reflection']} computed), {m['generated_tokens_per_reflection']} generated; "
            f"prefix-cache hit rate {m['prefix_cache_hit_rate']}; engine start {m['engine_start_seconds']}s",
            f"projection:  {p['replica_hours']} replica-hours = {p['gpu_hours'] if p['gpus_per_replica'] else p['replica_hours']} {hours}; "
            f"wall {p['total_wall_seconds'] / 3600:.2f} h at {p['replicas']} replica(s) "
            f"(generation {p['generation_wall_seconds']:.0f}s, the rest {p['other_wall_seconds']:.0f}s)",
        ]
    else:
        lines.append("projection:  no generation measured (generation disabled or nothing selected)")
    return "\n".join(lines)


def add(args, overrides: list) -> int:
    """--add-recipe: the run's recorded config (or --config, which must match it) plus the recipes."""
    from annotator.run.add_recipe import AddRecipeError, add_recipes, recorded_config

    try:
        out = reachable(args.output)
        given = load_config(args.config, overrides=[*overrides, ("output.path", str(out))]) if args.config else None
        ray_cfg = given or recorded_config(out)[1]
    except (ConfigError, AddRecipeError, OutputDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        with OutputLock(out, command="spp_reflections.py --add-recipe") as lock:
            start_ray(ray_cfg)
            stats = add_recipes(out, args.add_recipes, given=given, lock=lock)
    except (AddRecipeError, ConfigError, PackError, ResourceError, OutputDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a job-level failure: say why, exit non-zero
        print(f"error: adding {args.add_recipes} failed: {type(err).__name__}: {str(err)[-2000:]}\n"
              f"rerun the same command to resume in {out}", file=sys.stderr)
        return 1
    print(format_summary(stats, output=str(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
