"""A MiniLM-L6 6-label classifier on the v2 training data, for the transformers backend and the
cascade, and its figures: dev splits overall and per category, web share flagged, and the cascade
(fastText v2 first, MiniLM only on documents fastText scores >= k) against MiniLM on everything.

    python classifiers/train_minilm.py [--out $SPP_CACHE/models/safety-minilm-v2] [--rows 6000]

The same rows and weights as the fastText v2 scorer (classifiers/safety_data.py, calibration split
left out), sampled in proportion to their weights; graded labels as the test classifier's
(benign 0, Davidson offensive 3, Jigsaw toxic / ToxiGen hate 4, all other harm 5); only the head
is fitted, on frozen [CLS] vectors (classifiers/build_test_classifier.py:fit_head). The model
directory (~90 MB) stays in the cache; the figures go to classifiers/models/safety-minilm-v2.metrics.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator.engine.models import cache_dir, save_model_dir  # noqa: E402
from annotator.score.safety import FastTextSafetyScorer, TransformersSafetyScorer  # noqa: E402
from annotator.score.safety_eval import category_metrics, label_metrics, score_texts  # noqa: E402
from annotator.core.stages import Resources  # noqa: E402
from classifiers.build_test_classifier import fit_head  # noqa: E402
from classifiers.categories import row_categories  # noqa: E402
from classifiers.safety_data import CORPUS_DIR, WEB_HELDOUT_FILES, group_weights, in_calibration, training_rows  # noqa: E402
from classifiers.train_safety_v2 import DEV_SPLITS  # noqa: E402

FASTTEXT_V2 = Path(__file__).resolve().parent / "models" / "safety-fasttext-v2.ftz"
METRICS = Path(__file__).resolve().parent / "models" / "safety-minilm-v2.metrics.json"


def grade(source: str, group: str, label: int) -> int:
    if label == 0:
        return 0
    if group.endswith("|offensive_language"):
        return 3
    return 4 if source in {"jigsaw_toxic_comments", "toxigen_prompts"} else 5


def weighted_sample(*, rows: int, seed: int) -> tuple[list[str], np.ndarray]:
    data = training_rows()
    weights = group_weights(data)
    fit = np.flatnonzero([not in_calibration(t) for t in data.text])
    data, weights = data.take(fit), weights[fit]
    # Draw rows in proportion to their weights, without repeats.
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(data), size=min(rows, len(data)), replace=False, p=weights / weights.sum())
    return [data.text[i] for i in picks], np.array([grade(data.source[i], data.group[i], int(data.label[i])) for i in picks])


def measure(model_dir: Path, *, max_length: int, thresholds=(1, 2, 3)) -> dict:
    fast = FastTextSafetyScorer(model=str(FASTTEXT_V2), version="v2", resources=Resources())
    fast.setup()
    slow = TransformersSafetyScorer(model=str(model_dir), version="minilm", resources=Resources(), max_length=max_length)
    slow.setup()
    splits = {name: pq.read_table(path) for name, path in DEV_SPLITS.items()}
    splits["web_heldout"] = pa.concat_tables([pq.read_table(CORPUS_DIR / f, columns=["text"]) for f in WEB_HELDOUT_FILES])
    out: dict = {"max_length": max_length}
    for name, table in splits.items():
        texts = table.column("text").to_pylist()
        started = time.time()
        s_scores, s_probs = score_texts(slow, texts, batch_size=256)
        seconds = time.time() - started
        f_scores, f_probs = score_texts(fast, texts)
        entry: dict = {"minilm_docs_per_second": round(len(texts) / seconds, 1)}
        if "label" in table.column_names:
            labels = np.array(table.column("label").to_pylist(), dtype=int)
            entry["minilm"] = {**label_metrics(s_scores, s_probs, labels=labels), "by_category": category_metrics(s_scores, labels, categories=row_categories(table))}
        else:
            entry["minilm"] = {"n": len(texts), "share_flagged": round(float((s_scores >= 3).mean()), 4),
                               "score_histogram": {str(k): int((s_scores == k).sum()) for k in range(6)}}
        entry["cascade"] = {}
        for k in thresholds:
            # What CascadeSafetyScorer computes, from the same two sets of probabilities.
            rescore = f_scores >= k
            probs = np.where(rescore[:, None], s_probs, f_probs)
            scores = probs.argmax(axis=1)
            c = {"share_rescored": round(float(rescore.mean()), 4), "share_flagged": round(float((scores >= 3).mean()), 4)}
            if "label" in table.column_names:
                m = label_metrics(scores, probs, labels=labels)
                c.update({k2: m[k2] for k2 in ("precision", "recall", "fpr")})
                c["recall_lost_vs_minilm"] = round(entry["minilm"]["recall"] - m["recall"], 4)
            entry["cascade"][str(k)] = c
        out[name] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=cache_dir() / "models" / "safety-minilm-v2")
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--max-length", type=int, default=256, help="tokens read per document when measuring")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    started = time.time()
    texts, grades = weighted_sample(rows=args.rows, seed=args.seed)
    model, tokenizer, note = fit_head(texts, grades, steps=args.steps, seed=args.seed)
    save_model_dir(args.out, model=model, tokenizer=tokenizer, note=note)
    built = time.time() - started
    report = {"model": args.out.name, "train_rows": len(texts), "grades": {str(g): int((grades == g).sum()) for g in range(6)},
              "build": note, "build_seconds": round(built, 1), **measure(args.out, max_length=args.max_length)}
    METRICS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in DEV_SPLITS}, indent=1)[:3000])


if __name__ == "__main__":
    main()
