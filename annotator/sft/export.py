"""An SFT run from start to finish: the output directory and its fingerprint, the prompts drawn
once, the engine batches through the replica stage (each saved as it completes, so a rerun
generates only what is missing), then the chat datasets and `stats.json`.

    <out>/data/cited/train-00000-of-00001.parquet     messages (user, assistant with [X.Y] markers) + metadata
    <out>/data/uncited/train-00000-of-00001.parquet   the same conversations without markers
    <out>/data/paired/train-00000-of-00001.parquet    both renderings per row (messages_cite, messages_nocite, meta), the method's shape
    <out>/data/skip/skip-00000-of-00001.parquet       prompts the generator answered [SKIP] (user message only; no file without any)
    <out>/rejects/failures.parquet                    conversations whose first reply failed every attempt: reason, last reply
    <out>/stats.json, <out>/run.json                  figures; the fingerprint and one record per attempt
    <out>/_work/prompts.parquet, _work/generated/batch-<n>.parquet
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from annotator.core.checkpoint import OPERATIONAL_FIELDS, config_differences, our_run_record, remove_entries, write_json, write_table
from annotator.config import RunConfig
from annotator.core.ray_adapter import cluster_resources, configure_ray_data_console, run_stages
from annotator.method.prompt_packs import file_digest
from annotator.generate.replies import cited_sections
from annotator.sft.conversation import RESULT_SCHEMA, load_sft_packs
from annotator.engine.resources import replica_cpus
from annotator.core.lock import OutputLock
from annotator.core import layout, storage
from annotator.core.errors import OutputDirError
from annotator.core.layout import sft_batch_path as batch_path, sft_dataset_file as dataset_file
from annotator.sft.stage import sft_stage
from annotator.sft.prompts import materialise_prompts
from annotator.core.statuses import OK, SKIP, failure_reason

RENDERINGS, SKIP_SPLIT, PAIRED = layout.SFT_RENDERINGS, layout.SFT_SKIP_SPLIT, layout.SFT_PAIRED
DATA_DIR, PROMPTS, FAILURES = layout.SFT_DATA_DIR, layout.SFT_PROMPTS, layout.SFT_FAILURES
RUN_FILE, STATS_FILE = layout.RUN_FILE, layout.STATS_FILE
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
EXPORT_SCHEMA = pa.schema([
    ("conversation_id", pa.string()), ("messages", pa.list_(MESSAGE)), ("source", pa.string()), ("source_id", pa.string()),
    ("category", pa.string()), ("harm_category", pa.string()), ("n_turns", pa.int32()), ("canary_id", pa.string()),
    ("canary_action", pa.string()), ("prompt_version", pa.string()), ("model", pa.string()),
])
# The SPP method's published SFT shape (epfl-dlab/model-raising-data, pipeline/sft/*/export.py): both
# renderings in one row, `content` a large string, every other field of the conversation in `meta`, a JSON string.
PAIRED_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.large_string())]))
PAIRED_SCHEMA = pa.schema([
    ("source", pa.string()), ("source_id", pa.string()), ("messages_cite", PAIRED_MESSAGES), ("messages_nocite", PAIRED_MESSAGES),
    ("n_turns", pa.int32()), ("meta", pa.string()),
])
META_FIELDS = ("conversation_id", "category", "harm_category", "canary_id", "canary_action", "prompt_version", "model")


class SftRunError(RuntimeError):
    """An SFT output directory that cannot be used as asked; the message says what to change."""


def sft_settings(cfg: RunConfig, packs) -> dict:
    """What decides an SFT run's rows: the sft section, the generation settings that are not
    operational, the packs' versions and the canary file's content."""
    gen = cfg.generation.model_dump(mode="json")
    for name in OPERATIONAL_FIELDS["generation"]:
        gen.pop(name, None)
    canaries = cfg.generation.canaries.file
    return {"sft": cfg.sft.model_dump(mode="json"), "generation": gen, "prompt_version": packs.version,
            "followup_version": packs.followup_version, "canary_file": file_digest(canaries) if canaries else None}


def open_sft_output(out: Path, cfg: RunConfig, *, settings: dict) -> dict:
    """run.json of this output directory: a new one, or the earlier attempt's when the settings
    match (a resume); a different run there is refused unless output.overwrite replaces it."""
    if out.exists() and any(layout.LOCK_FILE not in p.name for p in out.iterdir()):   # the lock and its heartbeat's temp
        record = our_run_record(out)
        if record is None or record.get("kind") != "sft":
            raise SftRunError(f"{out} is not empty and holds no SFT run of this tool ({RUN_FILE}); choose another output.path "
                              "(nothing there is replaced or deleted)")
        diffs = config_differences(record.get("settings", {}), settings)
        if not cfg.output.overwrite and diffs:
            raise SftRunError(f"{out} holds an SFT run with other settings ({'; '.join(diffs[:8])}); "
                              "rerun with those settings to resume, or set output.overwrite=true to replace it")
        if not cfg.output.overwrite:
            return record
        remove_entries(out, layout.SFT_OUTPUTS)   # this tool's entries of the SFT run, nothing else
    out.mkdir(parents=True, exist_ok=True)
    return {"tool": layout.TOOL, "kind": "sft", "settings": settings, "attempts": []}


def run_sft(cfg: RunConfig, *, log=print) -> dict:
    """Run (or resume) an SFT run on the current Ray cluster, holding its output folder's lock;
    returns its stats."""
    out = storage.location(cfg.output.path)
    if storage.is_remote(out):
        raise OutputDirError(f"output.path {cfg.output.path!r}: an SFT run writes to a local or mounted folder (object storage "
                             "holds annotation runs; copy the SFT data there after the run)")
    packs = load_sft_packs(cfg)  # a broken pack fails before any engine starts
    with OutputLock(out, command="spp_sft.py", log=log) as lock:
        return _run_sft_locked(cfg, out, packs=packs, lock=lock, log=log)


def _run_sft_locked(cfg: RunConfig, out: Path, *, packs, lock: OutputLock, log) -> dict:
    record = open_sft_output(out, cfg, settings=sft_settings(cfg, packs))
    write_json(out / RUN_FILE, record)  # first, so that anything else in `out` belongs to this run
    inject = [c.id for c in packs.canaries if c.action == "inject"]
    prompts, draw = materialise_prompts(out / PROMPTS, cfg.sft, inject_canaries=inject)
    rows = prompts.to_pylist()
    size = cfg.sft.batch_size
    batches = [(i, rows[start:start + size]) for i, start in enumerate(range(0, len(rows), size))]
    pending = [(i, b) for i, b in batches if not batch_path(out, i).exists()]
    attempt = {"started_at": time.time(), "batches": len(batches), "pending_batches": len(pending), "engine_loads": 0}
    record["attempts"].append(attempt)
    write_json(out / RUN_FILE, record)
    log(f"[sft] {len(rows)} prompts ({draw.get('drawn')}), {len(batches)} batches of {size}, {len(pending)} to generate -> {out}")
    started = time.time()
    if pending:
        cpus = replica_cpus(cfg, cluster_resources(), beside=0.0)
        stage = sft_stage(cfg, out_dir=str(out), num_cpus=cpus)
        configure_ray_data_console()  # as in the annotation runs: status lines, not Ray Data's blocks
        plans = [{"batch_index": i, "rows": json.dumps(b)} for i, b in pending]
        done = 0
        for row in run_stages(plans, [stage]):
            done += 1
            attempt["engine_loads"] += row["engine_loads"]
            log(f"[sft] batch {row['batch_index']} saved ({done}/{len(pending)}): {row['conversations']} conversations, "
                f"{row['failures']} failed, {row['output_tokens']} tokens generated")
    missing = [i for i, _ in batches if not batch_path(out, i).exists()]
    if missing:
        raise SftRunError(f"generation ended with batches not saved: {missing[:5]}")
    attempt["generate_seconds"] = round(time.time() - started, 1)
    results = pa.concat_tables([pq.read_table(batch_path(out, i), schema=RESULT_SCHEMA) for i, _ in batches])
    lock.check()
    stats = export(out, results, prompts=prompts, cfg=cfg, draw=draw, record=record)
    attempt["finished_at"] = time.time()
    write_json(out / RUN_FILE, record)
    return stats


def messages_of(turns: list[dict], rendering: str) -> list[dict]:
    out = []
    for t in turns:
        out += [{"role": "user", "content": t["user"]}, {"role": "assistant", "content": t[rendering]}]
    return out


def _meta(r: dict) -> dict:
    return {k: r[k] for k in ("conversation_id", "source", "source_id", "category", "harm_category", "n_turns", "canary_id",
                              "canary_action", "prompt_version", "model")}


def paired_table(cited: pa.Table, uncited: pa.Table) -> pa.Table:
    """The `paired` dataset from the two rendering tables (EXPORT_SCHEMA, the same conversations in
    the same order): one row per conversation, in their order."""
    if cited.column("conversation_id").to_pylist() != uncited.column("conversation_id").to_pylist():
        raise ValueError("the cited and uncited tables hold different conversations or orders")
    rows = [{"source": c["source"], "source_id": c["source_id"], "messages_cite": c["messages"], "messages_nocite": u,
             "n_turns": c["n_turns"], "meta": json.dumps({k: c[k] for k in META_FIELDS}, ensure_ascii=False)}
            for c, u in zip(cited.to_pylist(), uncited.column("messages").to_pylist())]
    return pa.Table.from_pylist(rows, schema=PAIRED_SCHEMA)


def export(out: Path, results: pa.Table, *, prompts: pa.Table, cfg: RunConfig, draw: dict, record: dict) -> dict:
    """The chat datasets, the failures and stats.json from the saved batches (rewritten whole on
    every run, so they are a function of the batches alone)."""
    rows = results.to_pylist()
    users = dict(zip(prompts.column("conversation_id").to_pylist(), prompts.column("user").to_pylist()))
    ok = [r for r in rows if r["status"] == OK and r["n_turns"]]
    skip = [r for r in rows if r["status"] == SKIP]
    failed = [r for r in rows if r["status"] not in (OK, SKIP)]
    tables = {rendering: pa.Table.from_pylist([{**_meta(r), "messages": messages_of(r["turns"], rendering)} for r in ok], schema=EXPORT_SCHEMA)
              for rendering in RENDERINGS}
    for rendering, table in tables.items():
        write_table(dataset_file(out, rendering), table)
    write_table(dataset_file(out, PAIRED), paired_table(*(tables[r] for r in RENDERINGS)))
    skip_file = dataset_file(out, SKIP_SPLIT, split=SKIP_SPLIT)
    skip_file.unlink(missing_ok=True)
    if skip:  # a Parquet file without rows is one that `datasets` cannot read
        write_table(skip_file, pa.Table.from_pylist(
            [{**_meta(r), "messages": [{"role": "user", "content": users[r["conversation_id"]]}]} for r in skip], schema=EXPORT_SCHEMA))
    write_table(out / FAILURES, pa.Table.from_pylist(
        [{"conversation_id": r["conversation_id"], "source": r["source"], "source_id": r["source_id"],
          "user": users[r["conversation_id"]], "reason": failure_reason(r["status"]), "attempts": r["attempts"],
          "reply": r["failed_reply"]} for r in failed],
        schema=pa.schema([("conversation_id", pa.string()), ("source", pa.string()), ("source_id", pa.string()), ("user", pa.string()),
                          ("reason", pa.string()), ("attempts", pa.int32()), ("reply", pa.string())])))
    stats = sft_stats(rows, prompts=prompts, cfg=cfg, draw=draw, record=record)
    write_json(out / STATS_FILE, stats)
    return stats


def _by(rows: list[dict], key) -> dict:
    out: dict[str, dict] = {}
    for r in rows:
        k = key(r) or "(none)"
        entry = out.setdefault(k, {"prompts": 0, "ok": 0, "skip": 0, "failed": 0})
        entry["prompts"] += 1
        entry["ok" if r["status"] == OK else "skip" if r["status"] == SKIP else "failed"] += 1
    return dict(sorted(out.items()))


def sft_stats(rows: list[dict], *, prompts: pa.Table, cfg: RunConfig, draw: dict, record: dict) -> dict:
    ok = [r for r in rows if r["status"] == OK and r["n_turns"]]
    citations = Counter()
    for r in ok:
        for t in r["turns"]:
            citations.update(cited_sections(t["cited"]))
    tokens = {k: int(sum(r[k] for r in rows)) for k in ("prompt_tokens", "cached_prompt_tokens", "output_tokens")}
    attempts = record.get("attempts", [])
    return {
        "kind": "sft",
        "rows": {"cited": len(ok), "uncited": len(ok), SKIP_SPLIT: sum(r["status"] == SKIP for r in rows),
                 "failed": sum(r["status"] not in (OK, SKIP) for r in rows)},
        "conversations": len(rows),
        "assistant_turns": sum(r["n_turns"] for r in ok),
        "turn_distribution": dict(sorted(Counter(str(r["n_turns"]) for r in ok).items())),
        "multi_turn": {"planned": sum(r["planned_turns"] > 1 for r in rows), "kept_with_followups": sum(r["n_turns"] > 1 for r in ok),
                       "stop_reasons": dict(Counter(r["stop_reason"] or "none" for r in rows if r["planned_turns"] > 1))},
        "by_source": _by(rows, lambda r: r["source"]),
        "by_category": _by(rows, lambda r: r["category"]),
        "by_harm_category": _by(rows, lambda r: r["harm_category"]),
        "canaries": {"assigned": dict(Counter(c for c in prompts.column("canary_id").to_pylist() if c)),
                     "inject": dict(Counter(r["canary_id"] for r in ok if r["canary_action"] == "inject")),
                     "skip": sum(r["status"] == SKIP for r in rows)},
        "failures": dict(Counter(failure_reason(r["status"]) for r in rows if r["status"] not in (OK, SKIP))),
        "later_turn_failures": dict(Counter(r["stop_reason"].split(":", 1)[1] for r in rows
                                            if r["status"] == OK and (r["stop_reason"] or "").startswith("turn_failed:"))),
        "citations": dict(sorted(citations.items())),
        "rows_with_citations": sum(any(cited_sections(t["cited"]) for t in r["turns"]) for r in ok),
        "tokens": {**tokens, "output_per_conversation": round(tokens["output_tokens"] / max(1, len(rows)), 1)},
        "draw": draw,
        "engine_loads": sum(a.get("engine_loads", 0) for a in attempts),
        "attempts": len(attempts),
        "generate_seconds": round(sum(a.get("generate_seconds", 0) for a in attempts), 1),
        "prompt_version": rows[0]["prompt_version"] if rows else None,
        "followup_version": rows[0]["followup_version"] if rows else None,
        "model": cfg.generation.model,
        "config": cfg.model_dump(mode="json"),
    }
