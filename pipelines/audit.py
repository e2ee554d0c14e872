"""Entry point: audit a finished run: an LLM judge of its reflections and a calibration ledger of
its safety scorer. Figures go into the run's stats.json, report.html and (when published) card.

    python pipelines/audit.py --output out/demo [--only reflections|ledger] [--set audit.judge.model=...]
    ray job submit --working-dir . -- python pipelines/audit.py --output /shared/runs/x --set audit.judge.num_gpus=1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Runs as a script (also under `ray job submit --working-dir .`), where the repo root is not on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator.run.add_recipe import AddRecipeError, recorded_config  # noqa: E402
from annotator.audit.audits import AuditError, audit_reflections, calibration_ledger, record  # noqa: E402
from annotator.config import ConfigError, load_config  # noqa: E402
from annotator.core.errors import OutputDirError, ResourceError  # noqa: E402
from annotator.core.lock import OutputLock  # noqa: E402
from annotator.core.storage import reachable  # noqa: E402
from annotator.engine.resources import replica_cpus  # noqa: E402
from annotator.method.prompt_packs import PackError  # noqa: E402
from annotator.method.resolved import resolve_run  # noqa: E402
from annotator.core.ray_adapter import cluster_resources, start_ray  # noqa: E402

PARTS = ("reflections", "ledger")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Judge a finished run's reflections and audit its safety scorer.")
    ap.add_argument("--output", required=True, help="the finished run's output directory")
    ap.add_argument("--config", help="a YAML config whose `audit`/`ray` sections to use (default: the run's recorded config)")
    ap.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable; default: both)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override one config field (e.g. audit.reflections.sample=500); repeatable")
    return ap.parse_args(argv)


def audit_config(out: Path, config: str | None, overrides: list[str]):
    """The run's recorded config with the audit settings of --config and --set."""
    record_, recorded, _ = recorded_config(out)
    base = record_["config"]
    if config:
        given = load_config(config).model_dump(mode="json")
        base = {**base, "audit": given["audit"], "ray": given["ray"]}
    return load_config(None, overrides=overrides, base=base) if overrides or config else recorded


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = reachable(args.output)
        cfg = audit_config(out, args.config, args.overrides)
    except (ConfigError, AddRecipeError, OutputDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    parts = args.only or list(PARTS)
    try:
        with OutputLock(out, command="audit.py") as lock:
            start_ray(cfg)
            cpus = replica_cpus(cfg, cluster_resources())
            resolved = resolve_run(cfg.generation, voices=cfg.output.voices)  # the run's method, once
            for part in parts:
                if part == "reflections":
                    _, figures = audit_reflections(out, cfg, resolved=resolved, num_cpus=cpus)
                else:
                    _, figures = calibration_ledger(out, cfg, num_cpus=cpus)
                lock.check()
                record(out, part, figures=figures)
                print(f"[spp] audit {part}: " + summary_line(part, figures), flush=True)
    except (AuditError, ConfigError, PackError, ResourceError, FileNotFoundError, OutputDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a job-level failure: say why, exit non-zero
        print(f"error: the audit failed: {type(err).__name__}: {str(err)[-2000:]}\nrerun the same command to resume", file=sys.stderr)
        return 1
    print(f"[spp] audit written: {out / 'audit'}; figures in {out / 'stats.json'} (audit) and {out / 'report.html'}")
    return 0


def summary_line(part: str, f: dict) -> str:
    if part == "reflections":
        means = ", ".join(f"{k} {v:.2f}" for k, v in (f.get("mean") or {}).items())
        return (f"{f['judged']} of {f['sample']} judged by {f['judge']}; accept rate {f.get('accept_rate', 0):.3f}; "
                f"mean {f.get('mean_score', 0):.2f} ({means}); failed {json.dumps(f['failed'])}")
    prec = ", ".join(f"{b}: {v}" for b, v in f["precision_of_bad"].items())
    return (f"{f['rescored']} of {f['sampled']} re-scored by {f['teacher']}; precision of bad per bucket {{{prec}}}; "
            f"estimated truly bad among selected {f['estimated_truly_bad_share_of_selected']}")


if __name__ == "__main__":
    sys.exit(main())
