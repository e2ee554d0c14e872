"""Publishing a finished SFT run as a Hub dataset repository: one config per rendering (`cited`,
the default, and `uncited`), each with a `train` split and the shared `skip` split, the `paired`
config (both renderings per row, the SPP method's published shape), plus the card and `stats.json`.
The token handling and the upload are those of the annotation runs (`hub`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa

from annotator.publish.hub import (
    CARD_FILE, STATS_FILE, PublishError, PublishOptions, hub_token, markdown_table, check_no_secret, license_metadata, prepare_staging, publish_secrets, push_staging,
    size_category, staged_files, write_license_file,
)
from annotator.core.layout import SFT_DATA_DIR as DATA_DIR, SFT_PAIRED as PAIRED, SFT_RENDERINGS as RENDERINGS, SFT_SKIP_SPLIT as SKIP_SPLIT
from annotator.core.layout import sft_dataset_file as dataset_file


def _configs(*, with_skip: bool) -> list[dict]:
    """One config per rendering, then `paired`; the skip split only when the run has skip rows (the
    Hub's Parquet reader cannot read a file without rows), and not in `paired` (a skip row has no
    reply to pair, and a config's splits share one schema)."""
    skip = [{"split": SKIP_SPLIT, "path": f"{DATA_DIR}/{SKIP_SPLIT}/*.parquet"}] if with_skip else []
    return [*({"config_name": r, "default": r == RENDERINGS[0],
               "data_files": [{"split": "train", "path": f"{DATA_DIR}/{r}/*.parquet"}, *skip]} for r in RENDERINGS),
            {"config_name": PAIRED, "data_files": [{"split": "train", "path": f"{DATA_DIR}/{PAIRED}/*.parquet"}]}]


def build_sft_card(stats: dict, *, options: PublishOptions) -> str:
    from huggingface_hub import DatasetCardData

    rows = stats.get("rows", {})
    name = options.repo_id.split("/")[-1]
    header = DatasetCardData(
        license=options.license, **license_metadata(options), language=list(options.language) if options.language else None, size_categories=[size_category(rows.get("cited", 0))],
        task_categories=["text-generation"], annotations_creators=["machine-generated"], pretty_name=f"SPP persona SFT: {name}",
        tags=["synthetic", "safety", "sft", "spp", "chat"], configs=_configs(with_skip=bool(rows.get(SKIP_SPLIT))),
    ).to_yaml()
    sft = stats.get("config", {}).get("sft", {})
    figures = [("conversations", f"{stats.get('conversations', 0):,}"), ("rows per rendering (train)", f"{rows.get('cited', 0):,}"),
               ("skip rows", f"{rows.get(SKIP_SPLIT, 0):,}"), ("failed conversations", f"{rows.get('failed', 0):,}"),
               ("assistant turns", f"{stats.get('assistant_turns', 0):,}"),
               ("turns per conversation", ", ".join(f"{k}: {v}" for k, v in stats.get("turn_distribution", {}).items())),
               ("failures by reason", ", ".join(f"{k}: {v}" for k, v in stats.get("failures", {}).items()) or "none"),
               ("canaries woven in", ", ".join(f"{k}: {v}" for k, v in stats.get("canaries", {}).get("inject", {}).items()) or "none"),
               ("generated tokens", f"{stats.get('tokens', {}).get('output_tokens', 0):,}")]
    sources = [(k, f"{v['prompts']:,} prompts, {v['ok']:,} kept, {v['skip']:,} skipped, {v['failed']:,} failed")
               for k, v in stats.get("by_source", {}).items()]
    load = f'load_dataset("{options.repo_id}", "cited", split="train")'
    return "\n".join([
        "---", header.strip(), "---", "",
        f"# SPP persona SFT: {name}", "",
        "Chat conversations for supervised fine-tuning after Synthetic Persona Pretraining: each user prompt gets one "
        "assistant reply written in two renderings, `cited` (inline `[X.Y]` markers of the value constitution the model "
        "met in pretraining) and `uncited` (the same reply without markers or wording that names the framework).", "",
        f"Generator `{stats.get('model')}`, prompt version `{stats.get('prompt_version')}`, follow-up prompt "
        f"`{stats.get('followup_version')}`, seed {sft.get('seed')}.", "",
        "## Configs and splits", "",
        "- `cited` (default) and `uncited`: split `train`, one row per conversation, `messages` a list of "
        "`{role, content}` (user, assistant, ...), as TRL's SFT trainer reads it; the same conversations in both.",
        f"- split `{SKIP_SPLIT}` (in both configs): prompts the generator answered `[SKIP]` because they ask about an "
        "off-limits canary topic; only the user message is kept, as a clean test of what pretraining taught.",
        "- Columns besides `messages`: `conversation_id`, `source`, `source_id`, `category`, `harm_category`, `n_turns`, "
        "`canary_id`, `canary_action`, `prompt_version`, `model`.",
        f"- `{PAIRED}`: split `train`, the same conversations in the same order, both renderings in one row as the SPP "
        "method publishes its SFT data: `source`, `source_id`, `messages_cite` (the `cited` messages), `messages_nocite` "
        "(the `uncited` ones), `n_turns`, and `meta`, a JSON string with `conversation_id`, `category`, `harm_category`, "
        "`canary_id`, `canary_action`, `prompt_version`, `model`.", "",
        "```python", "from datasets import load_dataset", f"cited = {load}", "```", "",
        "## How the data was made", "",
        "Prompts are drawn by weight from the sources below (seeded, no duplicates) and written once. A screening hint "
        "by the source's harm category goes in front of the user message the generator sees (not into the data). "
        "Replies are JSON (`analysis`, `cited`, `uncited`) enforced by structured outputs, then checked: both renderings "
        "present, `cited` cites only real sections, `uncited` has no markers and no taxonomy words; a failed reply is "
        "retried with a new seed. Some conversations continue with follow-up user turns written by the same engine.", "",
        "## Statistics", "", markdown_table(figures, ("statistic", "value")), "",
        "## Sources", "", markdown_table(sources, ("source", "rows")), "",
        "## Licence", "", f"Declared licence: `{options.license}`"
        + (f" ({license_metadata(options)['license_name']}, see `{license_metadata(options)['license_link']}`)" if options.license == "other" else "")
        + ". Replies are machine-generated; prompts keep their sources' terms.", "",
    ])


def build_sft_repo_folder(out_dir: Path, dest: Path, *, options: PublishOptions) -> list[str]:
    """Stages the repository in `dest` (replaced if it holds an earlier staging); returns its paths."""
    out_dir, dest = Path(out_dir), Path(dest)
    stats = json.loads((out_dir / STATS_FILE).read_text())
    prepare_staging(dest)
    for split_dir, split in [*((r, "train") for r in (*RENDERINGS, PAIRED)), (SKIP_SPLIT, SKIP_SPLIT)]:
        src = dataset_file(out_dir, split_dir, split=split)
        if split == SKIP_SPLIT and not src.exists():
            continue  # no skip rows in this run
        if not src.exists():
            hint = (" (an SFT run exported before the paired dataset existed: run spp_sft.py on it again, which re-exports "
                    "its saved batches without generating)") if split_dir == PAIRED else ""
            raise PublishError(f"{src} not found; is --output a finished SFT run?{hint}")
        target = dest / src.relative_to(out_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    shutil.copy2(out_dir / STATS_FILE, dest / STATS_FILE)
    (dest / CARD_FILE).write_text(build_sft_card(stats, options=options), encoding="utf-8")
    write_license_file(dest, options, sample=pa.table({}))
    for secret in publish_secrets(stats):
        check_no_secret(dest, secret, skip=())
    return staged_files(dest)


def publish_sft(out_dir: Path, *, options: PublishOptions, staging: Path, log=print) -> str:
    """Stages and uploads an SFT run (token from HF_TOKEN or the saved login); returns the commit URL."""

    if not hub_token():
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    paths = build_sft_repo_folder(out_dir, staging, options=options)
    return push_staging(staging, options=options, paths=paths, message="SPP persona SFT: card, stats, cited, uncited and paired conversations",
                        log=log)
