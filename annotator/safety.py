"""Safety scoring: the fastText backend and the mapping from its output to a 0-5 harm score.

The scorer only writes versioned score columns; deciding what is "bad" happens in
`annotator.selection`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from annotator.stages import Resources, Stage

NUM_SCORES = 6
# P(harmful) bin edges for scores 0..5. Score >= 3 is exactly P(harmful) >= 0.5, the binary
# classifier's own decision boundary, so "bad" keeps the meaning the classifier was trained for.
SCORE_EDGES = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
HARMFUL_LABEL = "__label__1"
# fastText sees one line; long documents are cut to their first N characters, which keeps
# scoring cost bounded per document (5 MB pages) and matches SafeLM's cut of long inputs.
MAX_CHARS = 20_000
_WS = re.compile(r"\s+")


def normalize_for_fasttext(text: str | None, *, max_chars: int = MAX_CHARS) -> str:
    """One lowercased line: fastText splits on whitespace and treats '\\n' as end of example."""
    if not text:
        return ""
    return _WS.sub(" ", text[:max_chars]).strip().lower()


def harm_probability_to_score(p_harmful: np.ndarray) -> np.ndarray:
    """Bucket P(harmful) into the 0-5 harm scale."""
    return np.searchsorted(SCORE_EDGES, p_harmful, side="right").astype(np.int8)


class FastTextSafetyScorer(Stage):
    """Adds `safety_score`, `safety_p_harmful`, `safety_model` from a binary fastText model."""

    name = "safety"
    reads = ("text",)
    adds = ("safety_score", "safety_p_harmful", "safety_model")
    stateful = True

    def __init__(self, *, model_path: str, version: str, resources: Resources):
        self.model_path = model_path
        self.version = version
        self.resources = resources
        self._model = None

    def setup(self) -> None:
        import fasttext

        if not Path(self.model_path).is_file():
            raise FileNotFoundError(f"classifier.model_path: no fastText model at {self.model_path}")
        self._model = fasttext.load_model(self.model_path)

    def predict_harmful(self, texts: list[str]) -> np.ndarray:
        labels, probs = self._model.predict([normalize_for_fasttext(t) for t in texts], k=2)
        return np.array(
            [dict(zip(ls, ps)).get(HARMFUL_LABEL, 0.0) for ls, ps in zip(labels, probs)], dtype=np.float32
        ).clip(0.0, 1.0)

    def process(self, batch: pa.Table) -> pa.Table:
        p = self.predict_harmful(batch.column("text").to_pylist())
        return (
            batch.append_column("safety_score", pa.array(harm_probability_to_score(p), pa.int8()))
            .append_column("safety_p_harmful", pa.array(p, pa.float32()))
            .append_column("safety_model", pa.array([self.version] * batch.num_rows, pa.string()))
        )
