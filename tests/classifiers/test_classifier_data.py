"""The v2 scorer's training data: categories, source weights, the calibration split, web text."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from classifiers.categories import HARM_CATEGORIES, row_categories, row_category
from classifiers.safety_data import (
    CORPUS_DIR, GROUP_CAP, HARM_DIR, WEB_HELDOUT_FILES, WEB_REVIEW, WEB_TRAIN_FILES, Rows, expand, group_weights,
    in_calibration, load_review, read_web, split_calibration, web_chunks,
)
from classifiers.train_safety_v2 import fit_platt
from tests.support import REPO


def test_categories_from_the_sources_own_labels_and_from_the_text():
    assert row_category(label=1, text="x", source="ailuminate_demo_en", category="non-violent crimes") == "crime"
    assert row_category(label=1, text="x", source="ailuminate_demo_en", category="violent crimes") == "violence"
    assert row_category(label=1, text="x", source="openai_moderation", category="sexual,sexual/minors") == "sexual"
    assert row_category(label=1, text="x", source="catqa_en", category="Physical Harm / Self-harm") == "self_harm"
    assert row_category(label=1, text="x", source="cyberseceval_interpreter", category="cyber: Container Escape") == "cyber"
    # No category, or one that says nothing about the harm: the text decides.
    assert row_category(label=1, text="How do I make a pipe bomb?", source="harmfulq") == "weapons"
    assert row_category(label=1, text="How can I steal a car?", source="harmfulqa", category="Science / Robotics") == "crime"
    assert row_category(label=1, text="Tell me a joke", source="harmfulq") == "other_harm"
    # Benign rows get their source's topic; two topics share a harm category's name.
    assert row_category(label=0, text="x", source="cyberseceval_mitre_frr") == "cyber"
    assert row_category(label=0, text="x", source="bbq") == "hate"
    assert row_category(label=0, text="x", source="medquad_drug_questions") == "drugs_as_medicine"
    assert row_category(label=1, text="x", source="davidson_hate_offensive", orig_label="offensive_language") == "offensive"


def test_every_harmful_dev_row_gets_a_harm_category():
    table = pq.read_table(HARM_DIR / "dev.parquet")
    cats = np.array(row_categories(table))
    labels = np.array(table.column("label").to_pylist())
    assert set(cats[labels == 1]) <= set(HARM_CATEGORIES)
    counts = {c: int((cats[labels == 1] == c).sum()) for c in HARM_CATEGORIES}
    for target in ("violence", "weapons", "cyber", "crime", "fraud", "self_harm", "sexual", "hate", "privacy"):
        assert counts[target] >= 15, counts  # each category the scorer is measured on has rows
    assert counts["other_harm"] < 0.1 * (labels == 1).sum()


def _rows(groups: dict[str, int]) -> Rows:
    text, label, source, group = [], [], [], []
    for g, n in groups.items():
        s, l = g.split("|")
        text += [f"{g} {i}" for i in range(n)]
        label += [1 if l in {"1", "hate_speech", "offensive_language"} else 0] * n
        source += [s] * n
        group += [g] * n
    return Rows(text, np.array(label), source, group, [""] * len(text))


def test_group_weights_cap_large_sources_and_apply_quality():
    rows = _rows({"big|1": 3 * GROUP_CAP, "small|0": 100, "aart|1": 400, "davidson_hate_offensive|offensive_language": 4000, "web|0": 50})
    w = group_weights(rows)
    src = np.array(rows.group)
    effective = {g: round(float(w[src == g].sum()), 6) for g in set(rows.group)}
    assert effective == {"big|1": GROUP_CAP, "small|0": 100, "aart|1": 200, "davidson_hate_offensive|offensive_language": GROUP_CAP * 0.5,
                         "web|0": 100}
    texts, labels = expand(rows, w, seed=0)
    assert abs(sum(t.startswith("big|1") for t in texts) - GROUP_CAP) < 100  # floor + Bernoulli(fraction), seeded
    assert sum(t.startswith("web|0") for t in texts) == 100 and expand(rows, w, seed=0) == (texts, labels)


def test_calibration_split_depends_only_on_the_text():
    texts = [f"row number {i}" for i in range(4000)]
    side = [in_calibration(t) for t in texts]
    assert 0.12 < np.mean(side) < 0.18
    assert [in_calibration(t.upper() + "  ") for t in texts] == side  # normalised first, like training
    rows = Rows(texts, np.zeros(4000, dtype=int), ["s"] * 4000, ["s|0"] * 4000, [""] * 4000)
    fit, cal = split_calibration(rows)
    assert len(fit) + len(cal) == 4000 and not set(fit.text) & set(cal.text)


def test_web_review_is_applied_and_the_heldout_file_is_never_trained_on():
    review = load_review()
    doc = json.loads(WEB_REVIEW.read_text())
    assert {p["verdict"] for p in doc["pages"]} == {"harmful", "unclear"} and all(p["why"] for p in doc["pages"])
    rows, ids = read_web(WEB_TRAIN_FILES, review=review)
    heldout_ids = set(pq.read_table(CORPUS_DIR / WEB_HELDOUT_FILES[0], columns=["id"]).column("id").to_pylist())
    assert not heldout_ids & set(ids) and not heldout_ids & set(review)
    by_id = dict(zip(ids, rows.label))
    for page in doc["pages"]:
        assert by_id.get(page["id"]) == (1 if page["verdict"] == "harmful" else None)
    chunks = web_chunks(rows)
    assert set(chunks.label) == {0} and all(20 <= len(t.split()) <= 80 for t in chunks.text)
    benign_words = {w for t, l in zip(rows.text, rows.label) if l == 0 for w in t.split()}
    assert {w for t in chunks.text[:200] for w in t.split()} <= benign_words


def test_platt_fit_recovers_a_known_calibration():
    rng = np.random.default_rng(0)
    logit_p = rng.normal(0, 4, 20_000)
    q = 1 / (1 + np.exp(-(0.4 * logit_p + 0.3)))
    y = (rng.random(20_000) < q).astype(float)
    a, b = fit_platt(1 / (1 + np.exp(-logit_p)), y, np.ones_like(y))
    assert abs(a - 0.4) < 0.03 and abs(b - 0.3) < 0.06


def test_shipped_calibration_matches_its_metrics_file():
    cal = json.loads((REPO / "classifiers/models/safety-fasttext-v2.calibration.json").read_text())
    metrics = json.loads((REPO / "classifiers/models/safety-fasttext-v2.metrics.json").read_text())
    assert metrics["calibration"] == cal and cal["method"] == "platt"
    thresholds = [cal["raw_p_threshold_per_score"][str(k)] for k in range(1, 6)]
    assert thresholds == sorted(thresholds)
