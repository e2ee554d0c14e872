"""The cost plan's arithmetic: the projection from hand-made measuring-run stats (checked against
figures worked out by hand), which config a plan is valid for, reading it back, and plan vs actual."""

from __future__ import annotations

import pytest

from annotator.config import load_config
from annotator.core.checkpoint import write_json
from annotator.core.layout import PLAN_FILE
from annotator.run.projection import load_plan, plan_key, plan_vs_actual, project
from tests.support import REPO

DEMO = REPO / "configs" / "demo.yaml"

# 200 documents scored, 50 selected (a quarter); 40 s of per-document passes, 20 s fixed.
SCORING = {"documents_in": 200, "selected_documents": 50, "selected_by_reason": {"bad": 25, "matched_sample": 25},
           "score_histogram": {"0": 150, "3": 50}, "wall_seconds": {"scoring_pass": 30.0, "finalize_pass": 10.0, "total": 60.0}}
# 40 calibration documents in 80 replica-seconds (0.5/s per replica) on 2 replicas; the pass took 100 s.
CALIBRATION = {"stage_seconds": {"generate": 80.0}, "wall_seconds": {"generation_pass": 100.0},
               "generation_tokens": {"prompt": 40_000, "cached_prompt": 30_000, "output": 4_000},
               "reflection_status": {"ok": 38, "failed:parse": 2}, "generation_throughput": {"prefix_cache_hit_rate": 0.75}}


def cfg(*overrides: str):
    return load_config(DEMO, overrides=["generation.concurrency=2", "generation.num_gpus=1", *overrides])


def test_projection_scales_both_measuring_runs_to_the_input():
    plan = project(cfg(), scoring=SCORING, calibration=CALIBRATION, documents_in_input=1000, calibration_documents=40)
    assert plan["key"] == plan_key(cfg())
    m = plan["measured"]
    assert (m["documents_scored"], m["selected"], m["selected_share"]) == (200, 50, 0.25)
    assert m["seconds_per_document_without_generation"] == 0.2 and m["fixed_seconds"] == 20.0
    assert m["selected_by_reason"] == {"bad": 25, "matched_sample": 25} and m["score_histogram"] == {"0": 150, "3": 50}
    assert m["generate_seconds"] == 80.0 and m["reflections_per_second_per_replica"] == 0.5 and m["reflections_ok"] == 38
    assert m["prompt_tokens_per_reflection"] == 1000.0
    assert m["prompt_tokens_computed_per_reflection"] == 250.0   # (40000 - 30000) / 40
    assert m["generated_tokens_per_reflection"] == 100.0
    assert m["prefix_cache_hit_rate"] == 0.75
    assert m["engine_start_seconds"] == 60.0                      # 100 s pass - 80 s / 2 replicas
    p = plan["projection"]
    assert (p["documents"], p["selected"], p["replicas"], p["gpus_per_replica"]) == (1000, 250, 2, 1)
    assert p["replica_hours"] == pytest.approx(250 / 0.5 / 3600, abs=1e-5)  # 500 replica-seconds
    assert p["gpu_hours"] == p["replica_hours"]
    assert p["generation_wall_seconds"] == 310.0                  # 500 s / 2 replicas + 60 s start
    assert p["other_wall_seconds"] == 220.0                       # 20 s fixed + 0.2 s x 1000
    assert p["total_wall_seconds"] == 530.0
    assert plan["engine"] == {"model": "builtin:smollm2-135m-instruct", "replicas": 2, "gpus_per_replica": 1,
                              "batch_size": 256, "max_model_len": 6144}


def test_plan_documents_override_the_input_count():
    p = project(cfg("plan.documents=2000"), scoring=SCORING, calibration=CALIBRATION, documents_in_input=1000,
                calibration_documents=40)["projection"]
    assert (p["documents"], p["selected"]) == (2000, 500)
    assert p["generation_wall_seconds"] == 560.0 and p["other_wall_seconds"] == 420.0 and p["total_wall_seconds"] == 980.0


def test_projection_without_a_usable_calibration():
    p = project(cfg(), scoring=SCORING, calibration=None, documents_in_input=1000, calibration_documents=0)
    assert p["projection"] == {"documents": 1000, "selected": 250, "replicas": 2, "gpus_per_replica": 1}
    assert "generate_seconds" not in p["measured"]
    # A calibration that never reached the engine gives no rate: generation is not projected.
    idle = {**CALIBRATION, "stage_seconds": {}}
    q = project(cfg(), scoring=SCORING, calibration=idle, documents_in_input=1000, calibration_documents=0)
    assert q["measured"]["reflections_per_second_per_replica"] is None
    assert q["measured"]["prompt_tokens_per_reflection"] is None
    assert q["projection"]["replica_hours"] is None and q["projection"]["gpu_hours"] is None
    assert q["projection"]["generation_wall_seconds"] is None
    assert q["projection"]["total_wall_seconds"] == q["projection"]["other_wall_seconds"] == 220.0
    none_scored = project(cfg(), scoring={**SCORING, "documents_in": 0, "selected_documents": 0}, calibration=None,
                          documents_in_input=1000, calibration_documents=0)
    assert none_scored["projection"]["selected"] == 0 and none_scored["measured"]["selected_share"] == 0.0


def test_plan_key_follows_the_output_settings_but_not_the_input():
    key = plan_key(cfg())
    assert len(key) == 16
    assert plan_key(cfg("input.limit=5", "input.paths=[/elsewhere/*.parquet]", "output.path=/x", "generation.concurrency=8")) == key
    assert plan_key(cfg("generation.temperature=0.1")) != key
    assert plan_key(cfg("selection.bad_threshold=4")) != key


def test_load_plan_only_for_the_config_it_was_made_for(tmp_path):
    logged = []
    assert load_plan(tmp_path, cfg(), log=logged.append) is None and logged == []
    plan = project(cfg(), scoring=SCORING, calibration=CALIBRATION, documents_in_input=1000, calibration_documents=40)
    write_json(tmp_path / PLAN_FILE, plan)
    assert load_plan(tmp_path, cfg("output.path=/moved"), log=logged.append) == plan
    assert load_plan(tmp_path, cfg("generation.temperature=0.1"), log=logged.append) is None
    assert logged == [f"[spp] {tmp_path / PLAN_FILE} was made for another config; its projection is not used"]


def test_plan_vs_actual_in_the_same_units():
    plan = project(cfg(), scoring=SCORING, calibration=CALIBRATION, documents_in_input=1000, calibration_documents=40)
    stats = {"documents_in": 1000, "selected_documents": 260, "stage_seconds": {"generate": 540.0},
             "wall_seconds": {"generation_pass": 300.0, "total": 560.0}}
    out = plan_vs_actual(plan, stats)
    assert out["projected"] is plan["projection"] and out["measured"] is plan["measured"]
    assert out["actual"] == {"documents": 1000, "selected": 260, "replica_hours": 0.15, "generation_wall_seconds": 300.0,
                             "other_wall_seconds": 260.0, "total_wall_seconds": 560.0}
    assert out["actual_over_projected"] == {"documents": 1.0, "selected": 1.04, "replica_hours": 1.08,
                                            "generation_wall_seconds": 0.968, "other_wall_seconds": 1.182,
                                            "total_wall_seconds": 1.057}
    # Figures the plan could not project have no ratio.
    bare = project(cfg(), scoring=SCORING, calibration=None, documents_in_input=1000, calibration_documents=0)
    assert plan_vs_actual(bare, stats)["actual_over_projected"] == {"documents": 1.0, "selected": 1.04}
