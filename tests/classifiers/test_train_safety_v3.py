"""The v3 scorer's training: the shipped files agree with what the scorer measures, the precision
stage's calibration, the web review and the model card's tables."""

from __future__ import annotations

import json

import numpy as np
import pytest

from annotator.config import ClassifierConfig
from annotator.core.stages import Resources
from annotator.score.safety import build_scorer
from classifiers.hard_cases import FAMILIES, as_rows, build_hard_cases
from classifiers.safety_data import in_calibration
from classifiers.train_safety_v3 import (
    STAGE2_HARMFUL_SHARE, WEB_REVIEW_V3, calibrate_stage, fit_stage, hard_case_metrics, web_review_metrics,
)
from tests.support import REPO, require_shared_data

MODELS = REPO / "classifiers" / "models"
METRICS = json.loads((MODELS / "safety-fasttext-v3.metrics.json").read_text())
CARD = (REPO / "classifiers" / "MODEL_CARD.md").read_text()


@pytest.fixture(scope="module")
def default_scorer():
    require_shared_data()
    scorer = build_scorer(ClassifierConfig(model=str(REPO / ClassifierConfig().model),
                                           precision={"model": str(REPO / ClassifierConfig().precision.model)}), resources=Resources())
    scorer.setup()
    return scorer


def test_shipped_calibrations_are_the_metrics_files(default_scorer):
    for stage, name in (("stage1", "safety-fasttext-v3"), ("stage2", "safety-fasttext-v3-precision")):
        cal = json.loads((MODELS / f"{name}.calibration.json").read_text())
        assert METRICS["calibration"][stage] == cal and cal["method"] == "platt"
    assert METRICS["calibration"]["stage2"]["fitted_on"]["harmful_share_of_weight"] == STAGE2_HARMFUL_SHARE
    assert METRICS["calibration"]["stage1"]["fitted_on"]["harmful_share_of_weight"] == 0.5
    assert default_scorer.precision._calibration == METRICS["calibration"]["stage2"]


def test_hard_case_figures_are_what_the_default_scorer_measures(default_scorer):
    dev = [c for c in build_hard_cases() if c.dev]
    measured = hard_case_metrics(default_scorer, dev)
    assert measured == METRICS["v3"]["hard_cases_dev"]
    # The failure modes the issue names, on our own held-out templates: v2 against v3.
    v2 = METRICS["v2_on_the_same"]["hard_cases_dev"]
    for family in ("benign_tasks", "harm_word_safe", "refusals"):
        assert measured[family]["share_scored_3_plus"] < v2[family]["share_scored_3_plus"] / 2, family
        row = f"| {family} | {measured[family]['rows']} | {v2[family]['share_scored_3_plus']:.3f} | {measured[family]['share_scored_3_plus']:.3f} |"
        assert row in CARD, row
    assert measured["refusals_vs_harmful_howto_auroc"] >= 0.75 > v2["refusals_vs_harmful_howto_auroc"]


def test_web_review_covers_every_page_either_scorer_could_flag(default_scorer):
    review = json.loads(WEB_REVIEW_V3.read_text())
    verdicts = {p["verdict"] for p in review["pages"]}
    assert verdicts == {"harmful", "borderline", "benign"} and len(review["pages"]) >= 100
    assert len({p["id"] for p in review["pages"]}) == len(review["pages"])
    measured = web_review_metrics(default_scorer)
    assert measured == METRICS["v3"]["web_review"]
    assert measured["share_harmful_or_borderline"] >= 0.5
    flagged = ", ".join(f"{k} {v}" for k, v in measured["verdicts"].items())
    assert f"flags {measured['flagged']} ({flagged})" in CARD


def test_precision_calibration_weighs_the_harmful_class_as_asked(tmp_path):
    """A harmful share s moves the Platt intercept by about logit(s): the operating point, not the ranking."""
    require_shared_data()
    cases = [c for c in build_hard_cases() if not c.dev]
    rows = as_rows(cases[::3])
    weights = np.ones(len(rows))
    calib = np.array([in_calibration(t, share=0.3) for t in rows.text])
    model, _ = fit_stage(rows, weights, np.flatnonzero(~calib), out=tmp_path / "m.ftz",
                         params={"wordNgrams": 2, "minn": 0, "maxn": 0, "epoch": 5, "lr": 0.2, "dim": 16, "thread": 1}, seed=0)
    idx = np.flatnonzero(calib)
    even = calibrate_stage(model, rows, weights, idx, out=tmp_path / "m.ftz", about="test")
    shifted = calibrate_stage(model, rows, weights, idx, out=tmp_path / "m.ftz", about="test", harmful_share=0.7)
    assert shifted["a"] == pytest.approx(even["a"], rel=0.05)
    assert shifted["b"] - even["b"] == pytest.approx(np.log(0.7 / 0.3), abs=0.15)
    assert json.loads((tmp_path / "m.calibration.json").read_text()) == shifted
    assert set(rows.label) == set(FAMILIES.values())
