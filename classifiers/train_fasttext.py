"""Train the binary fastText safety scorer on labelled Parquet; write the model and its metrics.

    python classifiers/train_fasttext.py --train ../shared/data/safety/train.parquet \
        --dev ../shared/data/safety/dev.parquet --out classifiers/models/safety-fasttext-v1.ftz

Labels 1 (harmful) / 0 (benign) become __label__1 / __label__0. At scoring time P(harmful) becomes
a 0-5 score (annotator.score.safety.binary_to_score_probs); see classifiers/MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator.score.safety import FastTextSafetyScorer  # noqa: E402
from annotator.score.safety_eval import label_metrics, score_texts  # noqa: E402
from annotator.core.stages import Resources  # noqa: E402
from classifiers.evaluate import read_labelled  # noqa: E402
from classifiers.fasttext_training import DEFAULT_PARAMS, train_fasttext  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--dev", required=True)
    ap.add_argument("--out", required=True, help="output .ftz path (quantized model)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    train_texts, train_labels = read_labelled(args.train)
    dev_texts, dev_labels = read_labelled(args.dev)
    out = Path(args.out)
    started = time.time()
    params = {**DEFAULT_PARAMS, "seed": args.seed}
    train_fasttext(train_texts, train_labels, out=out, params=params)
    scorer = FastTextSafetyScorer(model=str(out), version=out.stem, resources=Resources())
    scorer.setup()
    scores, probs = score_texts(scorer, dev_texts)
    report = {
        "model": out.name,
        "train_rows": len(train_texts),
        "dev": label_metrics(scores, probs, labels=dev_labels),
        "params": params,
        "train_seconds": round(time.time() - started, 1),
        "size_bytes": os.path.getsize(out),
    }
    out.with_suffix(".metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
