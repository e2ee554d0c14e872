"""Entry point: persona-binding SFT data (cited and uncited chat datasets) from a YAML config's
`sft` section, with the run's generator and canaries (`generation`) and output directory.

    python pipelines/spp_sft.py --config configs/sft-demo.yaml [--prompts N] [--output DIR] [--set a.b=value ...]

Rerunning the same command resumes: saved engine batches are kept, the rest is generated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

# Runs as a script (also under `ray job submit --working-dir .`), where the repo root is not on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator.config import ConfigError, load_config  # noqa: E402
from annotator.core.errors import OutputDirError  # noqa: E402
from annotator.core.lock import OutputLock  # noqa: E402
from annotator.core.storage import is_remote, location  # noqa: E402
from annotator.method.prompt_packs import PackError  # noqa: E402
from annotator.core.ray_adapter import start_ray  # noqa: E402
from pipelines.cli import cli_overrides  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Generate persona-binding SFT conversations (cited and uncited) from prompt datasets.")
    ap.add_argument("--config", required=True, help="YAML config with an `sft` section (see configs/sft-demo.yaml)")
    ap.add_argument("--prompts", type=int, help="prompts to draw (sft.prompts)")
    ap.add_argument("--output", help="output directory (output.path)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory (output.overwrite)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override one config field; repeatable")
    return ap.parse_args(argv)


def load(args: argparse.Namespace):
    """The config; an SFT config may leave out `input` (its inputs are the prompt sources)."""
    tree = yaml.safe_load(Path(args.config).read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{args.config}: top level must be a mapping")
    sources = (tree.get("sft") or {}).get("sources") or []
    tree.setdefault("input", {"paths": [s.get("path") for s in sources if isinstance(s, dict)] or ["(sft sources)"]})
    return load_config(None, overrides=cli_overrides(args, {"sft.prompts": args.prompts}), base=tree)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load(args)
        if is_remote(location(cfg.output.path)):
            raise OutputDirError(f"output.path {cfg.output.path!r}: an SFT run writes to a local or mounted folder (object "
                                 "storage holds annotation runs; copy the SFT data there after the run)")
        OutputLock.check_free(location(cfg.output.path))   # a folder in use: refused before Ray starts
    except (ConfigError, OutputDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from annotator.sft.export import SftRunError, run_sft

    start_ray(cfg)  # as the annotation runs: worker output in Ray's logs unless ray.worker_logs_to_driver
    try:
        stats = run_sft(cfg)
    except (ConfigError, PackError, SftRunError, FileNotFoundError, OutputDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a job-level failure: say why, exit non-zero
        print(f"error: the SFT run failed: {type(err).__name__}: {str(err)[-2000:]}\n"
              f"rerun the same command to resume from {cfg.output.path}", file=sys.stderr)
        return 1
    print("[sft] done: " + json.dumps({k: stats[k] for k in ("rows", "failures", "canaries", "tokens", "engine_loads")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
