"""Entry point: run the SPP reflections pipeline from a YAML config.

    python pipelines/spp_reflections.py --config configs/demo.yaml [--limit N] [--output DIR] [--set a.b=value ...]
    ray job submit --working-dir . -- python pipelines/spp_reflections.py --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Runs as a script (also under `ray job submit --working-dir .`), where the repo root is not on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator.config import ConfigError, load_config  # noqa: E402
from annotator.reader import InputError  # noqa: E402
from annotator.stages import PipelineError  # noqa: E402
from annotator.pipeline import OutputDirError, ResourceError, RunError, run  # noqa: E402
from annotator.prompt_packs import PackError  # noqa: E402
from annotator.summary import format_summary  # noqa: E402


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
    args = ap.parse_args(argv)
    if not args.config and not args.add_recipes:
        ap.error("--config is required (or --add-recipe with --output)")
    if args.add_recipes and not args.output:
        ap.error("--add-recipe needs --output, the finished run to add to")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.limit is not None:
        overrides.append(f"input.limit={args.limit}")
    if args.output:
        overrides.append(f"output.path={args.output}")
    if args.overwrite:
        overrides.append("output.overwrite=true")
    if args.add_recipes:
        return add(args, overrides)
    try:
        cfg = load_config(args.config, overrides=overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    start_ray(cfg)
    try:
        stats = run(cfg)
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


def start_ray(cfg) -> None:
    import ray

    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray.address, log_to_driver=True)
    else:
        object_store = int(cfg.ray.object_store_memory_gb * 2**30) if cfg.ray.object_store_memory_gb else None
        ray.init(num_cpus=cfg.ray.num_cpus, object_store_memory=object_store)


def add(args, overrides: list[str]) -> int:
    """--add-recipe: the run's recorded config (or --config, which must match it) plus the recipes."""
    from annotator.add_recipe import AddRecipeError, add_recipes, recorded_config

    out = Path(args.output)
    try:
        given = load_config(args.config, overrides=[o for o in overrides if not o.startswith("output.path=")] +
                            [f"output.path={out}"]) if args.config else None
        ray_cfg = given or recorded_config(out.resolve())[1]
    except (ConfigError, AddRecipeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start_ray(ray_cfg)
    try:
        stats = add_recipes(out, args.add_recipes, given=given)
    except (AddRecipeError, ConfigError, PackError, ResourceError) as err:
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
