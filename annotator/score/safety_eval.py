"""Measuring safety scorers: bad-vs-not-bad metrics against labels, and agreement between a
teacher and a student scorer (used by the evaluation and distillation commands)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from annotator.score.safety import NUM_SCORES, SafetyScorer


def score_texts(scorer: SafetyScorer, texts: list[str | None], *, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(scores, probs) through the scorer's own stage code, so cleaning and notes are identical."""
    scores, probs = [], []
    for start in range(0, len(texts), batch_size):
        out = scorer.process(pa.table({"text": pa.array(texts[start : start + batch_size], pa.string())}))
        scores.append(out.column("safety_score").to_numpy())
        probs.append(np.stack(out.column("safety_probs").to_pylist()))
    return np.concatenate(scores).astype(int), np.concatenate(probs)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank-based AUROC (Mann-Whitney U), ties averaged."""
    import pandas as pd

    ranks = pd.Series(scores).rank(method="average").to_numpy()
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _precision_recall(pred: np.ndarray, truth: np.ndarray) -> dict:
    tp = int((pred & truth).sum())
    precision = tp / max(1, int(pred.sum()))
    recall = tp / max(1, int(truth.sum()))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}


def _fpr(pred: np.ndarray, truth: np.ndarray) -> float:
    return round(int((pred & ~truth).sum()) / max(1, int((~truth).sum())), 4)


def label_metrics(scores: np.ndarray, probs: np.ndarray, *, labels: np.ndarray, threshold: int = 3) -> dict:
    """Bad (score >= threshold) vs harmful labels; AUROC ranks by P(score >= threshold);
    `at_score` gives precision, recall and false-positive rate of score >= k for every k."""
    labels = np.asarray(labels).astype(int)
    truth = labels == 1
    pred = scores >= threshold
    return {
        "n": int(len(labels)),
        "threshold": threshold,
        **_precision_recall(pred, truth),
        "fpr": _fpr(pred, truth),
        "accuracy": round(float((pred == truth).mean()), 4),
        "auroc": round(auroc(probs[:, threshold:].sum(axis=1), labels), 4),
        "score_histogram": {str(s): int((scores == s).sum()) for s in range(NUM_SCORES)},
        "at_score": {str(k): {**_precision_recall(scores >= k, truth), "fpr": _fpr(scores >= k, truth)} for k in range(1, NUM_SCORES)},
    }


def category_metrics(scores: np.ndarray, labels: np.ndarray, *, categories: list[str], threshold: int = 3) -> dict:
    """Per category: rows of each class, recall (harmful rows flagged), false-positive rate (benign
    rows flagged) and precision (flagged rows that are harmful), each only where it is defined."""
    labels = np.asarray(labels).astype(int)
    cats = np.asarray(categories)
    out = {}
    for cat in sorted(set(categories)):
        rows = cats == cat
        truth, pred = labels[rows] == 1, scores[rows] >= threshold
        n_harmful, n_benign = int(truth.sum()), int((~truth).sum())
        out[cat] = {
            "harmful": n_harmful,
            "benign": n_benign,
            "recall": round(int((pred & truth).sum()) / n_harmful, 4) if n_harmful else None,
            "fpr": _fpr(pred, truth) if n_benign else None,
            "precision": round(int((pred & truth).sum()) / int(pred.sum()), 4) if n_harmful and n_benign and pred.any() else None,
        }
    return out


def agreement(teacher: np.ndarray, student: np.ndarray, *, threshold: int = 3) -> dict:
    """How well a student scorer reproduces a teacher's scores."""
    confusion = np.zeros((NUM_SCORES, NUM_SCORES), dtype=int)
    np.add.at(confusion, (teacher, student), 1)
    return {
        "n": int(len(teacher)),
        "exact_agreement": round(float((teacher == student).mean()), 4),
        "bad_vs_teacher": _precision_recall(student >= threshold, teacher >= threshold),
        "confusion_matrix_teacher_rows_student_cols": confusion.tolist(),
    }


def format_confusion(matrix: list[list[int]]) -> str:
    head = "teacher\\student " + " ".join(f"{s:>6}" for s in range(NUM_SCORES))
    rows = [f"{t:>15} " + " ".join(f"{v:>6}" for v in row) for t, row in enumerate(matrix)]
    return "\n".join([head, *rows])
