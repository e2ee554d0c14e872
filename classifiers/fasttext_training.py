"""Shared fastText training for the safety scorer (binary from labels, or 6-way by distillation)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from annotator.score.safety import normalize_for_fasttext

# Character 3-grams only: 2x faster predict than 2-4-grams on web pages for -0.002 dev F1.
DEFAULT_PARAMS = dict(epoch=10, dim=64, wordNgrams=2, minn=3, maxn=3, lr=0.5, loss="softmax", thread=1, seed=0)


def train_fasttext(texts, labels, *, out: Path, params: dict | None = None, quantize: bool = True):
    """Train on (text, label-name) pairs; labels are written as `__label__<name>`. Returns the model."""
    import fasttext

    params = {**DEFAULT_PARAMS, **(params or {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.txt"
        with train_file.open("w", encoding="utf-8") as f:
            for text, label in zip(texts, labels):
                line = normalize_for_fasttext(text)
                if line:
                    f.write(f"__label__{label} {line}\n")
        model = fasttext.train_supervised(str(train_file), verbose=0, **params)
        if quantize:
            # A few MB instead of hundreds: small enough to commit and to ship to every worker.
            model.quantize(input=str(train_file), qnorm=True, retrain=True, cutoff=100_000, thread=params["thread"])
    model.save_model(str(out))
    return model
