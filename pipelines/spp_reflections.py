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
    ap.add_argument("--config", required=True, help="YAML config (see configs/)")
    ap.add_argument("--limit", type=int, help="read at most N documents (input.limit)")
    ap.add_argument("--output", help="output directory (output.path)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory (output.overwrite)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override one config field; repeatable")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.limit is not None:
        overrides.append(f"input.limit={args.limit}")
    if args.output:
        overrides.append(f"output.path={args.output}")
    if args.overwrite:
        overrides.append("output.overwrite=true")
    try:
        cfg = load_config(args.config, overrides=overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import ray

    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray.address, log_to_driver=True)
    else:
        object_store = int(cfg.ray.object_store_memory_gb * 2**30) if cfg.ray.object_store_memory_gb else None
        ray.init(num_cpus=cfg.ray.num_cpus, object_store_memory=object_store)
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


if __name__ == "__main__":
    sys.exit(main())
