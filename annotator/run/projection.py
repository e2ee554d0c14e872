"""A cost plan's figures: which settings a plan is valid for, the projection of a measured plan to
the run's documents, reading `plan.json` back, and the plan-vs-actual comparison a run records.
Apart from `plan.py` (which drives the measuring runs) so that the pipeline can read plans.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from annotator.config import RunConfig
from annotator.core import layout
from annotator.core.storage import location
from annotator.core.checkpoint import digest, output_settings
from annotator.core.statuses import OK

SECONDS_PER_HOUR = 3600.0


def plan_key(cfg: RunConfig) -> str:
    """What a plan is valid for: the settings that decide the run's output and cost per document."""
    settings = output_settings(cfg)
    settings.pop("input", None)   # the plan scales to the documents; what they are is in the projection
    return digest(json.dumps(settings, sort_keys=True, default=str))[:16]


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
            "generate_seconds": round(seconds, 2), "reflections_per_second_per_replica": round(rate, 6) if rate else None,
            "reflections_ok": calibration.get("reflection_status", {}).get(OK, 0),
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


def load_plan(out_dir: Path, cfg: RunConfig, *, log=print) -> dict | None:
    """The plan in `out_dir` when it was made for this config (else None, said once)."""
    path = location(out_dir) / layout.PLAN_FILE
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
