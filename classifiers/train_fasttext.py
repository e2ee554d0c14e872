"""Train the fastText safety scorer on labelled Parquet and write its model card.

Usage: python classifiers/train_fasttext.py --train ../shared/data/safety/train.parquet \
           --dev ../shared/data/safety/dev.parquet --out classifiers/models/safety-fasttext-v1.ftz
The binary label (1 harmful / 0 benign) becomes __label__1/__label__0; at scoring time
P(harmful) is bucketed into 0-5 (see annotator.safety.SCORE_EDGES).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from annotator.safety import HARMFUL_LABEL, SCORE_EDGES, harm_probability_to_score, normalize_for_fasttext


def _write_fasttext_file(path: Path, texts, labels) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for text, label in zip(texts, labels):
            line = normalize_for_fasttext(text)
            if line:
                f.write(f"__label__{int(label)} {line}\n")
                n += 1
    return n


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank-based AUROC (Mann-Whitney U), ties averaged."""
    import pandas as pd

    ranks = pd.Series(scores).rank(method="average").to_numpy()
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(model, texts, labels, *, threshold: int = 3) -> dict:
    labels_arr = np.asarray(labels, dtype=int)
    lab, prob = model.predict([normalize_for_fasttext(t) for t in texts], k=2)
    p = np.array([dict(zip(ls, ps)).get(HARMFUL_LABEL, 0.0) for ls, ps in zip(lab, prob)]).clip(0, 1)
    scores = harm_probability_to_score(p)
    pred = scores >= threshold
    tp = int((pred & (labels_arr == 1)).sum())
    fp = int((pred & (labels_arr == 0)).sum())
    fn = int((~pred & (labels_arr == 1)).sum())
    precision = tp / max(1, tp + fp)
    recall = tp / max(1, tp + fn)
    return {
        "n": len(labels_arr),
        "threshold": threshold,
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(2 * precision * recall / max(1e-9, precision + recall), 4),
        "accuracy": round(float((pred == (labels_arr == 1)).mean()), 4),
        "auroc": round(auroc(p, labels_arr), 4),
        "score_histogram": {str(s): int((scores == s).sum()) for s in range(6)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--dev", required=True)
    ap.add_argument("--out", required=True, help="output .ftz path (quantized model)")
    ap.add_argument("--epoch", type=int, default=10)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--word-ngrams", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import fasttext

    train = pq.read_table(args.train, columns=["text", "label"]).to_pydict()
    dev = pq.read_table(args.dev, columns=["text", "label"]).to_pydict()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.txt"
        n_train = _write_fasttext_file(train_file, train["text"], train["label"])
        params = dict(epoch=args.epoch, dim=args.dim, wordNgrams=args.word_ngrams, minn=2, maxn=4, lr=0.5, loss="softmax", thread=1, seed=args.seed)
        model = fasttext.train_supervised(str(train_file), verbose=0, **params)
        full_metrics = evaluate(model, dev["text"], dev["label"])
        # Quantized model: a few MB instead of hundreds, for committing and shipping to workers.
        model.quantize(input=str(train_file), qnorm=True, retrain=True, cutoff=100_000, thread=1)
    metrics = evaluate(model, dev["text"], dev["label"])
    model.save_model(str(out))
    report = {
        "model": out.name,
        "train_rows": n_train,
        "dev": metrics,
        "dev_before_quantization": full_metrics,
        "params": params,
        "score_edges": SCORE_EDGES.tolist(),
        "train_seconds": round(time.time() - started, 1),
        "size_bytes": os.path.getsize(out),
    }
    out.with_suffix(".metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
