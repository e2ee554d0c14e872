"""Entry point: publish a finished run to a Hugging Face Hub dataset repository.

    python pipelines/publish.py --output out/demo --repo-id me/spp-demo [--include-shards] [--include-safety-annotations] [--public]
    python pipelines/publish.py --output out/demo --dry-run /tmp/spp-repo     # stage the repository only

The token comes from HF_TOKEN or `hf auth login`; there is no token flag, so it never lands in
shell history, logs, stats or the card.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# Runs as a script, where the repo root is not on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator.core import layout  # noqa: E402
from annotator.core.checkpoint import our_run_record  # noqa: E402
from annotator.core.errors import OutputDirError  # noqa: E402
from annotator.core.lock import OutputLock  # noqa: E402
from annotator.core.storage import is_remote, reachable  # noqa: E402
from annotator.publish.hub import STATS_FILE, PublishError, PublishOptions, build_repo_folder, publish  # noqa: E402

STAGING = layout.PUBLISH_STAGING


def local_staging(output) -> Path:
    """Where a run on object storage is staged for the upload: a folder of this machine's model
    cache named after the run's URL, so a rerun of the publish finds and replaces its own staging."""
    from annotator.core.checkpoint import digest
    from annotator.engine.models import cache_dir

    return cache_dir() / "publish" / digest(str(output))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Publish a finished SPP run (card, stats, sample, shards) to the Hub.")
    ap.add_argument("--output", required=True, help="the run's output directory (holds stats.json and shards/)")
    ap.add_argument("--repo-id", help="Hub dataset repository, e.g. me/spp-demo (default: the run config's publish.repo_id)")
    ap.add_argument("--dry-run", metavar="DIR", help="build the exact repository folder in DIR and upload nothing")
    ap.add_argument("--sample-rows", type=int, help="rows in the stratified sample (default: publish.sample_rows, 2000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    ap.add_argument("--include-shards", action="store_true", help="also upload the full text shards (config 'full')")
    ap.add_argument("--include-safety-annotations", action="store_true",
                    help="also upload id, safety_score and safety_probs of every scored document, those a filtered baseline "
                         "dropped included (config 'safety_annotations'; an annotation run's option)")
    ap.add_argument("--private", action=argparse.BooleanOptionalAction, default=None,
                    help="create the repository as private (default: publish.private, true); --no-private creates it public")
    ap.add_argument("--public", action="store_true",
                    help="publish into a public repository: needed when the repository exists and is public")
    ap.add_argument("--license", help="licence id for the card metadata (default: publish.license, other)")
    ap.add_argument("--license-name", help="with licence other: its name (default: publish.license_name, source-licences)")
    ap.add_argument("--license-link", help="with licence other: a URL or repository file with its terms (default: a LICENSE.md written "
                                           "into the repository)")
    ap.add_argument("--language", action="append", help="language code(s) for the card metadata, repeatable (default: "
                                                        "publish.language; none declared if unset)")
    return ap.parse_args(argv)


def options_from(args: argparse.Namespace, stats: dict, output: Path) -> PublishOptions:
    """CLI flags over the run config's `publish` section (recorded in stats.json)."""
    defaults = stats.get("config", {}).get("publish", {})
    repo_id = args.repo_id or defaults.get("repo_id")
    if not repo_id:
        if not args.dry_run:
            raise PublishError("no repository: pass --repo-id or set publish.repo_id in the run config")
        repo_id = f"local/{output.name}"  # a dry run still needs a name for the card
    rows = args.sample_rows or defaults.get("sample_rows") or 2000
    if rows < 1:
        raise PublishError(f"--sample-rows must be at least 1 (got {rows})")
    private = args.private if args.private is not None else defaults.get("private", True)
    return PublishOptions(repo_id=repo_id, sample_rows=rows, seed=args.seed, include_shards=args.include_shards,
                          include_safety_annotations=args.include_safety_annotations,
                          private=private, public=args.public or args.private is False, columns=defaults.get("columns"), license=args.license or defaults.get("license") or "other",
                          license_name=args.license_name or defaults.get("license_name"),
                          license_link=args.license_link or defaults.get("license_link"),
                          language=args.language or defaults.get("language"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        output = reachable(args.output)
        if not (output / STATS_FILE).exists():
            raise PublishError(f"{output / STATS_FILE} not found; is --output a finished run's output directory?")
        stats = json.loads((output / STATS_FILE).read_text())
        options = options_from(args, stats, output)
        stage, upload = build_repo_folder, publish
        if stats.get("kind") == "sft":  # an SFT run (pipelines/spp_sft.py): one config per rendering
            from annotator.publish.sft_hub import build_sft_repo_folder as stage, publish_sft as upload
        with OutputLock(output, command="publish.py"):   # not while another command writes the run
            if args.dry_run:
                paths = stage(output, Path(args.dry_run), options=options)
                print(f"[publish] dry run: staged {len(paths)} files for {options.repo_id} in {Path(args.dry_run).resolve()}")
                for p in paths:
                    print(f"  {p}")
                return 0
            # Staged on this machine: beside a local run, in its own _work/; for a run on object storage, in a
            # local folder named after it (the Hub upload reads local files).
            staging = output / STAGING if not is_remote(output) else local_staging(output)
            if staging.is_dir() and not (staging / layout.STAGING_MARKER).exists() and our_run_record(output) is not None:
                shutil.rmtree(staging)  # a staging from before the marker existed, inside this run's own _work/
            url = upload(output, options=options, staging=staging)
    except (PublishError, OutputDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[publish] done: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
