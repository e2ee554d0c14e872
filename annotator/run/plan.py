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

import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from annotator.core import layout
from annotator.core.checkpoint import digest, output_settings, write_json
from annotator.config import RunConfig, load_config

SECONDS_PER_HOUR = 3600.0


def plan_key(cfg: RunConfig) -> str:
    """What a plan is valid for: the settings that decide the run's output and cost per document."""
    settings = output_settings(cfg)
    settings.pop("input", None)   # the plan scales to the documents; what they are is in the projection
    return digest(json.dumps(settings, sort_keys=True, default=str))[:16]


def _sub_config(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    return load_config(None, base=cfg.model_dump(mode="json"), overrides=overrides)


def calibration_slice(shards: list[Path], *, n: int, cfg: RunConfig, dest: Path) -> int:
    """The first `n` selected documents of the scoring run, as an input file in the run's own
    column names; returns how many."""
    rows: list[dict] = []
    for f in shards:
        for batch in pq.ParquetFile(f).iter_batches(columns=["doc_id", "text", "selected"], batch_size=4096):
            for doc_id, text, selected in zip(*(batch.column(c).to_pylist() for c in ("doc_id", "text", "selected"))):
                if selected and len(rows) < n:
                    rows.append({cfg.input.id_column or "id": doc_id, cfg.input.text_column: text})
    dest.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([(cfg.input.id_column or "id", pa.string()),
                                                                (cfg.input.text_column, pa.string())])), dest)
    return len(rows)


def make_plan(cfg: RunConfig, *, documents_in_input: int, log=print) -> dict:
    """Runs the two measuring runs and writes `<output>/plan.json`; returns the plan."""
    from annotator.run.pipeline import run

    out = Path(cfg.output.path).resolve()
    work = out / layout.PLAN_WORK
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.time()
    score_limit = cfg.plan.score_documents
    log(f"[spp] plan 1/2: scoring and selection on {score_limit or documents_in_input} documents (no generation)")
    scoring = _sub_config(cfg, [f"output.path={work / 'score'}", "output.overwrite=true", "generation.enabled=false",
                                *([f"input.limit={min(score_limit, cfg.input.limit or score_limit)}"] if score_limit else [])])
    s = run(scoring, log=log)
    n = calibration_slice(layout.text_shards(work / "score"), n=cfg.plan.calibration_documents, cfg=cfg,
                          dest=work / "calibration" / "slice.parquet")
    c = None
    if n and cfg.generation.enabled:
        log(f"[spp] plan 2/2: the configured engine on {n} selected documents")
        calib = _sub_config(cfg, [f"output.path={work / 'calibrate'}", "output.overwrite=true", "input.limit=null",
                                  f"input.paths=[{work / 'calibration' / 'slice.parquet'}]", f"input.id_column={cfg.input.id_column or 'id'}",
                                  "selection.mode=random_fraction", "selection.fraction=1.0"])
        c = run(calib, log=log)
    plan = project(cfg, scoring=s, calibration=c, documents_in_input=documents_in_input, calibration_documents=n)
    plan["measured_in_seconds"] = round(time.time() - t0, 1)
    write_json(out / layout.PLAN_FILE, plan)
    shutil.rmtree(work, ignore_errors=True)
    return plan


def _per(total: float, n: float) -> float | None:
    return round(total / n, 1) if n else None


def project(cfg: RunConfig, *, scoring: dict, calibration: dict | None, documents_in_input: int, calibration_documents: int) -> dict:
    """The projection from the two measuring runs' stats."""
    gen = cfg.generation
    documents = cfg.plan.documents or documents_in_input
    scored = scoring["documents_in"]
    selected = scoring.get("selected_documents", 0)
    share = selected / scored if scored else 0.0
    projected_selected = round(share * documents)
    # Everything but generation: the passes (read, score, select, write) scale with documents; the
    # rest of the wall time (Ray start, selection totals, stats) is taken as fixed.
    wall = scoring["wall_seconds"]
    passes = wall.get("scoring_pass", 0.0) + wall.get("finalize_pass", 0.0)
    fixed = max(0.0, wall["total"] - passes)
    other_per_doc = passes / max(1, scored)
    measured = {"documents_scored": scored, "selected": selected, "selected_share": round(share, 5),
                "selected_by_reason": scoring.get("selected_by_reason", {}),
                "score_histogram": scoring.get("score_histogram", {}),
                "seconds_per_document_without_generation": round(other_per_doc, 6), "fixed_seconds": round(fixed, 1), "calibration_documents": calibration_documents}
    projection = {"documents": documents, "selected": projected_selected, "replicas": gen.concurrency,
                  "gpus_per_replica": gen.num_gpus}
    if calibration is not None:
        seconds = calibration["stage_seconds"].get("generate", 0.0)
        tokens = calibration["generation_tokens"]
        rate = calibration_documents / seconds if seconds else None
        start = max(0.0, calibration["wall_seconds"].get("generation_pass", 0.0) - seconds / max(1, gen.concurrency))
        measured |= {
            "generate_seconds": round(seconds, 2), "reflections_per_second_per_replica": round(rate, 4) if rate else None,
            "reflections_ok": calibration.get("reflection_status", {}).get("ok", 0),
            "prompt_tokens_per_reflection": _per(tokens["prompt"], calibration_documents),
            "prompt_tokens_computed_per_reflection": _per(tokens["prompt"] - tokens["cached_prompt"], calibration_documents),
            "generated_tokens_per_reflection": _per(tokens["output"], calibration_documents),
            "prefix_cache_hit_rate": calibration.get("generation_throughput", {}).get("prefix_cache_hit_rate"),
            "engine_start_seconds": round(start, 1),
        }
        replica_hours = projected_selected / rate / SECONDS_PER_HOUR if rate else None
        generation_wall = replica_hours * SECONDS_PER_HOUR / gen.concurrency + start if replica_hours is not None else None
        other_wall = fixed + other_per_doc * documents
        projection |= {
            "replica_hours": round(replica_hours, 5) if replica_hours is not None else None,
            "gpu_hours": round(replica_hours * gen.num_gpus, 5) if replica_hours is not None else None,
            "generation_wall_seconds": round(generation_wall, 1) if generation_wall is not None else None,
            "other_wall_seconds": round(other_wall, 1),
            "total_wall_seconds": round(other_wall + (generation_wall or 0.0), 1),
        }
    return {"key": plan_key(cfg), "created_at": time.time(), "measured": measured, "projection": projection,
            "engine": {"model": gen.model, "replicas": gen.concurrency, "gpus_per_replica": gen.num_gpus,
                       "batch_size": gen.batch_size, "max_model_len": gen.max_model_len}}


def load_plan(out_dir: Path, cfg: RunConfig, log=print) -> dict | None:
    """The plan in `out_dir` when it was made for this config (else None, said once)."""
    path = Path(out_dir) / layout.PLAN_FILE
    if not path.exists():
        return None
    plan = json.loads(path.read_text())
    if plan.get("key") != plan_key(cfg):
        log(f"[spp] {path} was made for another config; its projection is not used")
        return None
    return plan


def plan_vs_actual(plan: dict, stats: dict) -> dict:
    """The plan's projection beside what the run took, in the same units, and actual / projected."""
    p = plan["projection"]
    wall = stats["wall_seconds"]
    gen_seconds = stats.get("stage_seconds", {}).get("generate", 0.0)
    actual = {"documents": stats["documents_in"], "selected": stats.get("selected_documents", 0),
              "replica_hours": round(gen_seconds / SECONDS_PER_HOUR, 4),
              "generation_wall_seconds": round(wall.get("generation_pass", 0.0), 1),
              "other_wall_seconds": round(wall.get("total", 0.0) - wall.get("generation_pass", 0.0), 1),
              "total_wall_seconds": round(wall.get("total", 0.0), 1)}
    ratio = {k: round(actual[k] / p[k], 3) for k in actual if isinstance(p.get(k), (int, float)) and p[k]}
    return {"projected": p, "actual": actual, "actual_over_projected": ratio, "measured": plan["measured"]}
