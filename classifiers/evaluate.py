"""Evaluate a safety scorer on labelled Parquet (`text` plus `label` or `harmful`, 1 = harmful).

    python classifiers/evaluate.py --data ../shared/data/safety-v2/dev.parquet \
        [--backend fasttext --model classifiers/models/safety-fasttext-v3.ftz] [--precision none|FILE] [--threshold 3] [--by-category]

Prints precision/recall/F1 and false-positive rate of bad (score >= threshold) vs harmful, AUROC,
the score histogram, precision/recall at every score, and with --by-category the same per
category (classifiers/categories.py: harm categories for harmful rows, topics for benign ones).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator.config import ClassifierConfig  # noqa: E402
from annotator.score.safety import build_scorer  # noqa: E402
from annotator.score.safety_eval import category_metrics, label_metrics, score_texts  # noqa: E402
from classifiers.categories import row_categories  # noqa: E402
from annotator.core.stages import Resources  # noqa: E402

LABEL_COLUMNS = ("label", "harmful")


def read_labelled(path: str) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(path)
    label_col = next((c for c in LABEL_COLUMNS if c in table.column_names), None)
    if "text" not in table.column_names or label_col is None:
        raise SystemExit(f"error: {path} needs a `text` column and one of {LABEL_COLUMNS}; it has {table.column_names}")
    labels = np.array(table.column(label_col).to_pylist(), dtype=float)
    if np.isnan(labels).any() or not set(np.unique(labels)) <= {0.0, 1.0}:
        raise SystemExit(f"error: {path}: column {label_col!r} must hold 0/1 (or true/false) with no nulls")
    return table.column("text").to_pylist(), labels.astype(int)


def format_categories(by_category: dict) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [f"{'category':<24} {'harmful':>7} {'benign':>7} {'recall':>7} {'FPR':>7} {'precision':>9}"]
    for cat, m in by_category.items():
        lines.append(f"{cat:<24} {m['harmful']:>7} {m['benign']:>7} {cell(m['recall']):>7} {cell(m['fpr']):>7} {cell(m['precision']):>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--backend", default="fasttext", choices=["fasttext", "transformers"])
    ap.add_argument("--model", default=ClassifierConfig.model_fields["model"].default)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--threshold", type=int, default=3)
    ap.add_argument("--by-category", action="store_true", help="also per category (needs a `source` column; else one category `all`)")
    ap.add_argument("--precision", default="default",
                    help="fastText precision stage: a model file, `none`, or `default` (v3's beside the model when --model is v3, else none)")
    ap.add_argument("--precision-threshold", type=int, default=2)
    ap.add_argument("--cascade", default=None, help="transformers model that rescores documents the fastText --model scores >= --cascade-threshold")
    ap.add_argument("--cascade-threshold", type=int, default=2)
    args = ap.parse_args(argv)

    texts, labels = read_labelled(args.data)
    cascade = {"model": args.cascade, "threshold": args.cascade_threshold}
    cfg = ClassifierConfig(backend=args.backend, model=args.model, version=Path(args.model).name, max_length=args.max_length, cascade=cascade,
                           precision={"model": None if args.precision == "none" else args.precision, "threshold": args.precision_threshold})
    precision = cfg.precision.model if args.backend == "fasttext" else None
    scorer = build_scorer(cfg, resources=Resources())
    scorer.setup()
    scores, probs = score_texts(scorer, texts)
    metrics = label_metrics(scores, probs, labels=labels, threshold=args.threshold)
    print(f"model {scorer.version} on {args.data} ({metrics['n']} rows), bad = score >= {args.threshold}")
    if precision:
        fast = scorer.fast if args.cascade else scorer
        metrics["precision_share_rescored"] = round(fast.rescored / max(1, len(texts)), 4)
        print(f"precision stage: {fast.rescored} of {len(texts)} documents rescored by {precision} ({metrics['precision_share_rescored']:.2%})")
    if args.cascade:
        metrics["cascade_share_rescored"] = round(scorer.rescored / max(1, len(texts)), 4)
        print(f"cascade: {scorer.rescored} of {len(texts)} documents rescored by {args.cascade} ({metrics['cascade_share_rescored']:.2%})")
    print(f"precision {metrics['precision']:.4f}  recall {metrics['recall']:.4f}  F1 {metrics['f1']:.4f}  "
          f"FPR {metrics['fpr']:.4f}  accuracy {metrics['accuracy']:.4f}  AUROC {metrics['auroc']:.4f}")
    print("score histogram: " + "  ".join(f"{s}: {n}" for s, n in metrics["score_histogram"].items()))
    print("score >= k: " + "  ".join(f"{k}: P {m['precision']:.3f} R {m['recall']:.3f} FPR {m['fpr']:.3f}" for k, m in metrics["at_score"].items()))
    if args.by_category:
        metrics["by_category"] = category_metrics(scores, labels, categories=row_categories(pq.read_table(args.data)), threshold=args.threshold)
        print(format_categories(metrics["by_category"]))
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
