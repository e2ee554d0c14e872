"""The cost plan (`--plan`): before a run, measure what it will cost and write `plan.json`.

Two real runs in `<output>/_plan/`: the configured run without generation (scoring and
selection, the cheap part) on the input or its first `plan.score_documents` documents, which
counts what the run selects; then the configured engine on a calibration slice of the selected
documents, which measures reflections per second per replica, prompt and generated tokens per
reflection and the prefix-cache hit rate. The projection scales both to the run's documents. A
later run of the same config starts its ETA from the plan and records plan and outcome side by
side in stats.json (`plan`).
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa

from annotator.core import layout, storage
from annotator.core.checkpoint import write_json, write_table
from annotator.config import RunConfig, load_config
from annotator.run.pipeline import run
from annotator.run.projection import project


def _sub_config(cfg: RunConfig, overrides: list[tuple[str, object]]) -> RunConfig:
    return load_config(None, base=cfg.model_dump(mode="json"), overrides=overrides)


def calibration_slice(shards: list[Path], *, n: int, cfg: RunConfig, dest: Path) -> int:
    """The first `n` selected documents of the scoring run, as an input file in the run's own
    column names; returns how many."""
    rows: list[dict] = []
    for f in shards:
        for batch in storage.parquet_file(f).iter_batches(columns=["doc_id", "text", "selected"], batch_size=4096):
            for doc_id, text, selected in zip(*(batch.column(c).to_pylist() for c in ("doc_id", "text", "selected"))):
                if selected and len(rows) < n:
                    rows.append({cfg.input.id_column or "id": doc_id, cfg.input.text_column: text})
    write_table(dest, pa.Table.from_pylist(rows, schema=pa.schema([(cfg.input.id_column or "id", pa.string()),
                                                                   (cfg.input.text_column, pa.string())])))
    return len(rows)


def make_plan(cfg: RunConfig, *, documents_in_input: int, log=print) -> dict:
    """Runs the two measuring runs and writes `<output>/plan.json`; returns the plan."""
    out = storage.location(cfg.output.path)
    work = out / layout.PLAN_WORK
    storage.remove_tree(work)
    t0 = time.time()
    score_limit = cfg.plan.score_documents
    log(f"[spp] plan 1/2: scoring and selection on {score_limit or documents_in_input} documents (no generation)")
    # (field, value) pairs: paths are set as they are, whatever characters the output folder has.
    scoring = _sub_config(cfg, [("output.path", str(work / "score")), ("output.overwrite", True), ("generation.enabled", False),
                                *([("input.limit", min(score_limit, cfg.input.limit or score_limit))] if score_limit else [])])
    s = run(scoring, log=log)
    n = calibration_slice(layout.text_shards(work / "score"), n=cfg.plan.calibration_documents, cfg=cfg,
                          dest=work / "calibration" / "slice.parquet")
    c = None
    if n and cfg.generation.enabled:
        log(f"[spp] plan 2/2: the configured engine on {n} selected documents")
        calib = _sub_config(cfg, [("output.path", str(work / "calibrate")), ("output.overwrite", True), ("input.limit", None),
                                  ("input.paths", [str(work / "calibration" / "slice.parquet")]), ("input.id_column", cfg.input.id_column or "id"),
                                  ("selection.mode", "random_fraction"), ("selection.fraction", 1.0)])
        c = run(calib, log=log)
    plan = project(cfg, scoring=s, calibration=c, documents_in_input=documents_in_input, calibration_documents=n)
    plan["measured_in_seconds"] = round(time.time() - t0, 1)
    write_json(out / layout.PLAN_FILE, plan)
    storage.remove_tree(work)
    return plan
