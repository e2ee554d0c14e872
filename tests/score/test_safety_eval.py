"""Scorer metrics on hand-made scores and labels, each compared with the value worked out by hand:
bad-vs-harmful precision/recall/FPR at every score, AUROC with ties, per-category figures, teacher
and student agreement; and scoring texts through the real fastText scorer in batches."""

from __future__ import annotations

import math

import numpy as np
import pytest

from annotator.config import ClassifierConfig
from annotator.core.stages import Resources
from annotator.score.safety import FastTextSafetyScorer
from annotator.score.safety_eval import agreement, auroc, category_metrics, format_confusion, label_metrics, score_texts
from tests.support import REPO

#                  0  1  2  3  4  5  6  7  8  9 10 11
SCORES = np.array([0, 1, 2, 3, 4, 5, 3, 0, 5, 1, 4, 0])
LABELS = np.array([0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0])   # harmful: rows 2, 3, 4, 5, 10
# P(score >= 3) per row; the harmful row 2 ties the benign row 9 at 0.3.
P_BAD = np.array([0.1, 0.2, 0.3, 0.6, 0.8, 0.9, 0.65, 0.05, 0.7, 0.3, 0.55, 0.15])


def probs_with(p_bad: np.ndarray) -> np.ndarray:
    probs = np.zeros((len(p_bad), 6))
    probs[:, 0], probs[:, 3] = 1 - p_bad, p_bad
    return probs


def test_auroc_counts_pairs_with_ties_halved():
    # 35 harmful-benign pairs: 0.3 beats 4 and ties 1 (4.5), 0.6 beats 5, 0.8 and 0.9 beat 7, 0.55 beats 5.
    assert auroc(P_BAD, LABELS) == pytest.approx(28.5 / 35)
    assert auroc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    assert auroc(np.array([0.9, 0.1]), np.array([0, 1])) == 0.0
    assert auroc(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 1])) == 0.5
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))  # one class: undefined


def test_label_metrics_at_the_threshold_and_at_every_score():
    m = label_metrics(SCORES, probs_with(P_BAD), labels=LABELS)
    # score >= 3 flags rows 3, 4, 5, 6, 8, 10: 4 of them harmful, of 5 harmful; 2 of 7 benign flagged.
    assert (m["n"], m["threshold"]) == (12, 3)
    assert (m["precision"], m["recall"], m["f1"], m["fpr"]) == (0.6667, 0.8, 0.7273, 0.2857)
    assert m["accuracy"] == 0.75  # 4 true positives + 5 true negatives of 12
    assert m["auroc"] == 0.8143
    assert m["score_histogram"] == {"0": 3, "1": 2, "2": 1, "3": 2, "4": 2, "5": 2}
    assert m["at_score"] == {
        "1": {"precision": 0.5556, "recall": 1.0, "f1": 0.7143, "fpr": 0.5714},   # 9 flagged, 5 harmful; 4/7 benign
        "2": {"precision": 0.7143, "recall": 1.0, "f1": 0.8333, "fpr": 0.2857},   # 7 flagged, 5 harmful
        "3": {"precision": 0.6667, "recall": 0.8, "f1": 0.7273, "fpr": 0.2857},
        "4": {"precision": 0.75, "recall": 0.6, "f1": 0.6667, "fpr": 0.1429},     # rows 4, 5, 8, 10
        "5": {"precision": 0.5, "recall": 0.2, "f1": 0.2857, "fpr": 0.1429},      # rows 5, 8
    }
    # The threshold moves the decision and the AUROC's P(score >= threshold) column sum.
    m4 = label_metrics(SCORES, probs_with(P_BAD), labels=LABELS.astype(bool), threshold=4)
    assert (m4["precision"], m4["recall"], m4["fpr"]) == (0.75, 0.6, 0.1429)
    assert m4["auroc"] == 0.5  # P(score >= 4) is 0 on every row here: all tied, no ranking


def test_label_metrics_with_nothing_flagged_or_nothing_harmful():
    none = label_metrics(np.zeros(4, dtype=int), probs_with(np.zeros(4)), labels=np.array([0, 1, 0, 1]))
    assert (none["precision"], none["recall"], none["f1"], none["fpr"], none["accuracy"]) == (0.0, 0.0, 0.0, 0.0, 0.5)
    assert none["auroc"] == 0.5
    benign = label_metrics(np.array([0, 4]), probs_with(np.array([0.1, 0.9])), labels=np.array([0, 0]))
    assert benign["fpr"] == 0.5 and benign["recall"] == 0.0 and math.isnan(benign["auroc"])


def test_category_metrics_only_where_defined():
    cats = ["web", "web", "hate", "hate", "hate", "hate", "web", "web", "hate", "web", "violence", "violence"]
    out = category_metrics(SCORES, LABELS, categories=cats)
    assert list(out) == ["hate", "violence", "web"]
    # hate: rows 2, 3, 4, 5 harmful (3 flagged), row 8 benign and flagged.
    assert out["hate"] == {"harmful": 4, "benign": 1, "recall": 0.75, "fpr": 1.0, "precision": 0.75}
    assert out["violence"] == {"harmful": 1, "benign": 1, "recall": 1.0, "fpr": 0.0, "precision": 1.0}
    # web holds no harmful row: no recall, no precision; row 6 of 5 benign flagged.
    assert out["web"] == {"harmful": 0, "benign": 5, "recall": None, "fpr": 0.2, "precision": None}
    quiet = category_metrics(np.array([0, 1]), np.array([1, 0]), categories=["x", "x"])
    assert quiet["x"] == {"harmful": 1, "benign": 1, "recall": 0.0, "fpr": 0.0, "precision": None}  # nothing flagged
    assert category_metrics(SCORES, LABELS, categories=cats, threshold=5)["hate"]["recall"] == 0.25


def test_agreement_and_its_confusion_matrix():
    teacher = np.array([0, 1, 3, 5, 4, 2])
    student = np.array([0, 2, 3, 4, 4, 3])
    a = agreement(teacher, student)
    assert a["n"] == 6 and a["exact_agreement"] == 0.5  # rows 0, 2, 4
    # student bad (>= 3) on rows 2, 3, 4, 5; teacher bad on rows 2, 3, 4.
    assert a["bad_vs_teacher"] == {"precision": 0.75, "recall": 1.0, "f1": 0.8571}
    expected = np.zeros((6, 6), dtype=int)
    for t, s in zip(teacher, student):
        expected[t, s] += 1
    assert a["confusion_matrix_teacher_rows_student_cols"] == expected.tolist()
    assert sum(map(sum, a["confusion_matrix_teacher_rows_student_cols"])) == 6
    lines = format_confusion(a["confusion_matrix_teacher_rows_student_cols"]).splitlines()
    assert lines[0].split() == ["teacher\\student", "0", "1", "2", "3", "4", "5"]
    assert [line.split() for line in lines[1:]][5] == ["5", "0", "0", "0", "0", "1", "0"]
    assert len({len(line) for line in lines[1:]}) == 1  # rows line up


def test_score_texts_through_the_real_scorer_in_any_batch_size():
    scorer = FastTextSafetyScorer(model=str(REPO / ClassifierConfig().model), version="v2", resources=Resources())
    scorer.setup()
    texts = ["How to bake bread at home with flour, water and salt.", None, "   ",
             "Step by step instructions to build a pipe bomb and hurt people.", "The weather today is mild and sunny."]
    scores, probs = score_texts(scorer, texts, batch_size=2)
    assert scores.shape == (5,) and scores.dtype.kind == "i" and probs.shape == (5, 6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert scores.tolist() == probs.argmax(axis=1).tolist()
    assert probs[1].tolist() == probs[2].tolist() == [1.0, 0, 0, 0, 0, 0] and scores[1] == scores[2] == 0  # nothing to read
    again, again_probs = score_texts(scorer, texts, batch_size=1024)
    assert again.tolist() == scores.tolist()
    np.testing.assert_allclose(again_probs, probs, rtol=1e-6)
    assert scores[3] > scores[0]  # the harmful request scores above the recipe
