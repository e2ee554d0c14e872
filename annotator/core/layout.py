"""The output layout, in one place: every folder, file name and glob of a run's output directory,
a local folder or an object-storage prefix (`storage.py`, the one filesystem layer under it).

    shards/<unit>-<part>.parquet                 text shards: every written document, published schema
    tokenized/<stream>/<unit>.bin/.idx           windows layout: one annotated document per window, per
    tokenized/<stream>/<unit>_reflection_mask.bin/.idx, <unit>.token_lengths.npy   recipe field (reflection-1p, ...)
    tokenized/sidecar/<unit>.parquet              one row per annotated window, in window order
    tokenized/compact/<unit>.bin/.idx             the other documents, dense-packed into windows
    tokenized/documents/<unit>-<part>.bin/.idx    documents layout: one sequence per document
    tokenized/metadata.json, tokenizer/           what a trainer needs to read the streams
    safety_annotations/<unit>.parquet             id, safety_score, safety_probs of every scored document (dropped ones too)
    stats.json, report.html
    plan.json                                     the cost plan (`--plan`), kept by the run it plans
    run.json                                      the config, the unit plan, one record per attempt
    rejects/documents/<unit>-<first>-<n>.parquet  quarantined input documents
    rejects/duplicates/<unit>.parquet, rejects/generations/<unit>.parquet, rejects/files.jsonl
    _work/scored/<unit>/<first>-<n>.parquet       pass 1 results
    _work/selection.json                          sample probability and duplicate ids (kept after a run)
    _work/generated[-<recipes>]/<unit>/<batch>.parquet   generation results per engine batch
    _work/done/<unit>.json                        a unit's manifest, written last
    _work/nodes/<node>-<token>.json               each node's proof that it sees the output (removed at once)

A unit's outputs are named after the unit alone, so a rerun rewrites the same names; a unit with
nothing for a stream writes no file for it.
"""

from __future__ import annotations

import glob
from pathlib import Path

from annotator.core.storage import location

TEXT_DIR = "shards"
TOKENS_DIR = "tokenized"
TOKENIZER_DIR = "tokenizer"
SIDECAR = "sidecar"
COMPACT = "compact"
MASK_SUFFIX = "_reflection_mask"
TOKEN_LENGTHS_SUFFIX = ".token_lengths.npy"
METADATA = "metadata.json"
STATS_FILE = "stats.json"
REPORT_FILE = "report.html"
RUN_FILE = "run.json"
PLAN_FILE = "plan.json"
PLAN_WORK = "_plan"
SAFETY_DIR = "safety_annotations"
SCORED = "_work/scored"
GENERATED = "_work/generated"
DONE = "_work/done"
SELECTION = "_work/selection.json"
REJECTS = "rejects"
REJECTED_DOCUMENTS = "rejects/documents"
REJECTED_DUPLICATES = "rejects/duplicates"
REJECTED_GENERATIONS = "rejects/generations"
REJECTED_FILES = "rejects/files.jsonl"
WORK = "_work"
IDS = "_work/ids"
PUBLISH_STAGING = "_work/publish"
NODE_PROBES = "_work/nodes"
CARD_FILE = "README.md"
# Audits of a finished run (`pipelines/audit.py`).
AUDIT_DIR = "audit"
AUDIT_REFLECTIONS = f"{AUDIT_DIR}/reflections.parquet"
AUDIT_LEDGER = f"{AUDIT_DIR}/ledger.parquet"
AUDIT_WORK = f"{AUDIT_DIR}/_work"
# SFT runs (`pipelines/spp_sft.py`).
SFT_PROMPTS = "_work/prompts.parquet"
SFT_DATA_DIR = "data"
SFT_RENDERINGS = ("cited", "uncited")
# Both renderings of a conversation in one row (`messages_cite`, `messages_nocite`): the method's published SFT shape.
SFT_PAIRED = "paired"
SFT_SKIP_SPLIT = "skip"
SFT_FAILURES = "rejects/failures.parquet"
# Whose files these are: run.json's `tool` field, and the marker file of a publish staging folder.
TOOL = "spp-annotator"
STAGING_MARKER = ".spp-staging.json"
# The lock of an output folder held by the command writing into it (`core/lock.py`).
LOCK_FILE = ".spp-lock.json"
# What this tool writes at the top of an output directory: `--overwrite` deletes these entries of
# a folder whose run.json is this tool's, and nothing else.
RUN_OUTPUTS = (RUN_FILE, STATS_FILE, REPORT_FILE, TEXT_DIR, WORK, TOKENS_DIR, TOKENIZER_DIR, REJECTS, PLAN_WORK, AUDIT_DIR, SAFETY_DIR)
SFT_OUTPUTS = (RUN_FILE, STATS_FILE, WORK, SFT_DATA_DIR, REJECTS)
# Written before a run (`--plan`) and kept when the run replaces the directory.
KEPT_ON_OVERWRITE = (PLAN_FILE,)


def text_shard(out_dir: Path, name: str) -> Path:
    return location(out_dir) / TEXT_DIR / f"{name}.parquet"


def text_shards(out_dir: Path) -> list[Path]:
    return sorted((location(out_dir) / TEXT_DIR).glob("*.parquet"), key=str)


def safety_annotations_path(out_dir: Path, unit: str) -> Path:
    return location(out_dir) / SAFETY_DIR / f"{unit}.parquet"


def safety_annotation_files(out_dir: Path) -> list[Path]:
    return sorted((location(out_dir) / SAFETY_DIR).glob("*.parquet"), key=str)


def stream_prefix(out_dir: Path, stream: str, *, name: str) -> Path:
    """`<out>/tokenized/<stream>/<name>`: the Megatron prefix (`.bin`/`.idx` appended)."""
    return location(out_dir) / TOKENS_DIR / stream / name


def mask_prefix(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + MASK_SUFFIX)


def token_lengths_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + TOKEN_LENGTHS_SUFFIX)


def sidecar_path(out_dir: Path, unit: str) -> Path:
    return location(out_dir) / TOKENS_DIR / SIDECAR / f"{unit}.parquet"


def stream_names(out_dir: Path) -> list[str]:
    root = location(out_dir) / TOKENS_DIR
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != SIDECAR) if root.is_dir() else []


def stream_prefixes(out_dir: Path, stream: str) -> list[Path]:
    """Every file prefix of one stream, in name order (masks excluded)."""
    root = location(out_dir) / TOKENS_DIR / stream
    return sorted((p.with_suffix("") for p in root.glob("*.idx") if not p.stem.endswith(MASK_SUFFIX)), key=str)


def sidecars(out_dir: Path) -> list[Path]:
    return sorted((location(out_dir) / TOKENS_DIR / SIDECAR).glob("*.parquet"), key=str)


def unit_outputs(out_dir: Path, unit: str) -> list[Path]:
    """Every file a unit's finalize may have written (text shards, safety annotations, token streams, sidecar)."""
    out = location(out_dir)
    found = list((out / TEXT_DIR).glob(f"{glob.escape(unit)}-*")) + list((out / SAFETY_DIR).glob(f"{glob.escape(unit)}.parquet"))
    tokens = out / TOKENS_DIR
    if tokens.is_dir():
        for d in tokens.iterdir():
            if d.is_dir():
                found += [p for p in d.iterdir() if p.name.startswith(f"{unit}-") or p.name.startswith(f"{unit}.")
                          or p.name.startswith(f"{unit}{MASK_SUFFIX}")]
    return sorted(found, key=str)


def generated_dir(out_dir: Path, pass_name: str | None = None) -> Path:
    """Saved generations of the run (`_work/generated/`) or of recipes added to it
    (`_work/generated-<recipes>/`)."""
    return location(out_dir) / (GENERATED if pass_name is None else f"{GENERATED}-{pass_name}")


def generated_batch_path(out_dir: Path, unit: str, *, index: int, pass_name: str | None = None) -> Path:
    return generated_dir(out_dir, pass_name) / unit / f"{index:06d}.parquet"


def batch_file(index: int) -> str:
    """A saved replica batch of an SFT run or an audit, by its index."""
    return f"batch-{index:05d}.parquet"


def sft_batch_path(out_dir: Path, index: int) -> Path:
    return location(out_dir) / GENERATED / batch_file(index)


def judge_batch_path(work_dir: Path, index: int) -> Path:
    return work_dir / batch_file(index)


def sft_dataset_file(out_dir: Path, split_dir: str, *, split: str = "train") -> Path:
    """One split of an SFT run's datasets (`data/<rendering, paired or skip>/<split>-00000-of-00001.parquet`)."""
    return location(out_dir) / SFT_DATA_DIR / split_dir / f"{split}-00000-of-00001.parquet"
