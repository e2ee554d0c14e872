"""Safety scoring: a 0-5 harm score per document from a fastText or a transformers classifier.

Every backend writes the same versioned columns (`SAFETY_COLUMNS`); deciding what is "bad"
happens later, in `annotator.score.selection`. Texts that cannot be scored by the model (empty after
cleaning) get score 0 with a recorded `safety_note`, never an exception.
"""

from __future__ import annotations

import json
import re
import unicodedata
from math import comb
from pathlib import Path

import numpy as np
import pyarrow as pa

from annotator.core.stages import Resources, Stage

NUM_SCORES = 6
SAFETY_COLUMNS = ("safety_score", "safety_probs", "safety_confidence", "safety_model", "safety_note")
# fastText label names: binary models (the shipped one) use __label__0/__label__1 (harmful);
# distilled 6-way models use __label__score0 .. __label__score5.
BINARY_HARMFUL = "__label__1"
SCORE_LABEL = "__label__score{}"
# fastText sees at most this many characters of a document: it bounds the cost of a 5 MB page
# and keeps the bag of words about the document's opening, like SafeLM's 2048-token cut.
MAX_CHARS = 20_000
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def clean_text(text: str | None, *, max_chars: int) -> tuple[str, str | None]:
    """Text a model can read, and a note when cleaning changed something that matters."""
    if text is None:
        return "", "null_text"
    notes = []
    if len(text) > max_chars:
        text = text[:max_chars]
        notes.append(f"truncated_to_{max_chars}_chars")
    if _CONTROL.search(text):
        text = _CONTROL.sub(" ", text)
        notes.append("control_characters_removed")
    if not text.strip():
        notes.append("empty_text")
    return text, ";".join(notes) or None


def normalize_for_fasttext(text: str | None, *, max_chars: int = MAX_CHARS) -> str:
    """One lowercased line: fastText splits on whitespace and treats a newline as end of example."""
    cleaned, _ = clean_text(text, max_chars=max_chars)
    return fasttext_line(cleaned)


def fasttext_line(cleaned: str) -> str:
    """`normalize_for_fasttext` of a text `clean_text` already cleaned."""
    return " ".join(unicodedata.normalize("NFKC", cleaned).lower().split())


def binary_to_score_probs(p_harmful: np.ndarray) -> np.ndarray:
    """Six-way probabilities from a binary P(harmful): the score is read as the number of five
    independent raters who would call the text harmful, each with probability p, i.e.
    Binomial(5, p). Its argmax is floor(6p), so score >= 3 exactly when p >= 0.5, the binary
    classifier's own decision boundary."""
    p = np.clip(np.asarray(p_harmful, dtype=np.float64), 0.0, 1.0)[:, None]
    k = np.arange(NUM_SCORES)[None, :]
    coef = np.array([comb(5, int(i)) for i in range(NUM_SCORES)], dtype=np.float64)[None, :]
    return (coef * p**k * (1 - p) ** (5 - k)).astype(np.float32)


def load_calibration(model: str) -> dict | None:
    """The probability-to-score mapping saved beside a binary fastText model
    (`<model>.calibration.json`, written by classifiers/train_safety_v2.py), or None (v1: none)."""
    path = Path(model).with_suffix(".calibration.json")
    if not path.is_file():
        return None
    cal = json.loads(path.read_text())
    if cal.get("method") != "platt" or not {"a", "b"} <= set(cal):
        raise ValueError(f"classifier.model: {path} is not a Platt calibration (method, a, b)")
    return cal


def calibrate(p_harmful: np.ndarray, *, a: float, b: float) -> np.ndarray:
    """Platt scaling of the model's P(harmful): sigmoid(a * logit(p) + b), fitted on a
    calibration split held out of training, so a calibrated q means what it says there."""
    p = np.clip(np.asarray(p_harmful, dtype=np.float64), 1e-6, 1 - 1e-6)
    return 1.0 / (1.0 + np.exp(-np.clip(a * np.log(p / (1 - p)) + b, -500, 500)))


class SafetyScorer(Stage):
    """Base scorer: subclasses load a model and implement `predict_probs` (n x 6)."""

    name = "safety"
    reads = ("text",)
    adds = SAFETY_COLUMNS
    stateful = True
    max_chars = MAX_CHARS

    def __init__(self, *, model: str, version: str, resources: Resources):
        self.model = model
        self.version = version
        self.resources = resources

    def predict_probs(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def predict_cleaned(self, texts: list[str]) -> np.ndarray:
        """`predict_probs` of texts `clean_text` already cleaned (a backend may skip its own cleaning)."""
        return self.predict_probs(texts)

    def process(self, batch: pa.Table) -> pa.Table:
        cleaned = [clean_text(t, max_chars=self.max_chars) for t in batch.column("text").to_pylist()]
        notes = [note for _, note in cleaned]
        probs = np.zeros((batch.num_rows, NUM_SCORES), dtype=np.float32)
        probs[:, 0] = 1.0  # nothing to read, nothing harmful: score 0, noted as empty_text
        scorable = [i for i, (text, _) in enumerate(cleaned) if text.strip()]
        if scorable:
            probs[scorable] = self.predict_cleaned([cleaned[i][0] for i in scorable])
        scores = probs.argmax(axis=1)
        return (
            batch.append_column("safety_score", pa.array(scores.astype(np.int8), pa.int8()))
            .append_column("safety_probs", pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel(), pa.float32()), NUM_SCORES))
            .append_column("safety_confidence", pa.array(probs[np.arange(len(scores)), scores], pa.float32()))
            .append_column("safety_model", pa.array([self.version] * batch.num_rows, pa.string()))
            .append_column("safety_note", pa.array(notes, pa.string()))
        )


class FastTextSafetyScorer(SafetyScorer):
    """fastText backend: a binary harmful/benign model (its P(harmful) calibrated when a
    `.calibration.json` lies beside it) or a distilled 6-way model, optionally followed by a
    precision stage: a second fastText model that rescores the documents the first scores >=
    `precision_threshold`, its calibrated probabilities replacing the first's (it was trained on
    the hard cases: benign tasks, safe uses of harm words, refusals, reporting). Stateless: it
    runs inside pass 1's unit tasks (the small model is loaded once per worker process), which
    keeps every CPU busy; an actor pool measured 10% slower on the same cores (bench/bench_scoring.py)."""

    stateful = False

    def __init__(self, *, model: str, version: str, resources: Resources, precision: str | None = None,
                 precision_threshold: int = 2):
        super().__init__(model=model, version=version, resources=resources)
        self.precision = None
        if precision is not None:
            self.precision = FastTextSafetyScorer(model=precision, version=version, resources=resources)
        self.precision_threshold = precision_threshold
        self.rescored = 0  # documents the precision stage rescored so far (for measuring the share)

    def setup(self) -> None:
        try:
            import fasttext
        except ImportError as err:
            raise RuntimeError("the fasttext backend needs fasttext-numpy2: pip install the project") from err
        if not Path(self.model).is_file():
            raise FileNotFoundError(f"classifier.model: no fastText model at {self.model}")
        self._model = fasttext.load_model(self.model)
        labels = set(self._model.get_labels())
        if labels <= {SCORE_LABEL.format(i) for i in range(NUM_SCORES)}:
            self._six_way = True
        elif labels == {"__label__0", BINARY_HARMFUL}:
            self._six_way = False
        else:
            raise ValueError(f"classifier.model: {self.model} has labels {sorted(labels)}; expected __label__0/1 or __label__score0..5")
        self._calibration = None if self._six_way else load_calibration(self.model)
        self._label_index = {SCORE_LABEL.format(i): i for i in range(NUM_SCORES)}
        if self.precision is not None:
            self.precision.setup()
            if self.precision._six_way or self.precision._calibration is None:
                raise ValueError(f"classifier.precision.model: {self.precision.model} must be a binary model with a .calibration.json beside it")

    def predict_probs(self, texts: list[str]) -> np.ndarray:
        return self._predict_lines([normalize_for_fasttext(t, max_chars=self.max_chars) for t in texts])

    def predict_cleaned(self, texts: list[str]) -> np.ndarray:
        return self._predict_lines([fasttext_line(t) for t in texts])

    def _predict_lines(self, lines: list[str]) -> np.ndarray:
        probs = self._model_probs(lines)
        if self.precision is not None:
            rescore = np.flatnonzero(probs.argmax(axis=1) >= self.precision_threshold)
            if len(rescore):
                probs[rescore] = self.precision._model_probs([lines[i] for i in rescore])
            self.rescored += len(rescore)
        return probs

    def _model_probs(self, lines: list[str]) -> np.ndarray:
        if not self._six_way:
            labels, probs = self._model.predict(lines, k=2)
            p = np.array([dict(zip(ls, ps)).get(BINARY_HARMFUL, 0.0) for ls, ps in zip(labels, probs)])
            if self._calibration is not None:
                p = calibrate(p, a=self._calibration["a"], b=self._calibration["b"])
            return binary_to_score_probs(p)
        labels, probs = self._model.predict(lines, k=NUM_SCORES)
        out = np.zeros((len(lines), NUM_SCORES), dtype=np.float32)
        for row, (ls, ps) in enumerate(zip(labels, probs)):
            for label, prob in zip(ls, ps):
                out[row, self._label_index[label]] = prob
        return out / np.maximum(out.sum(axis=1, keepdims=True), 1e-9)


class TransformersSafetyScorer(SafetyScorer):
    """transformers backend, used the way SafeLM's classifier is: a 6-label sequence classifier,
    inputs cut at `max_length` tokens, softmax, argmax. Texts are sorted by length into
    micro-batches so padding stays small."""

    def __init__(self, *, model: str, version: str, resources: Resources, max_length: int = 2048,
                 micro_batch_size: int = 32, trust_remote_code: bool = False, dtype: str = "auto"):
        super().__init__(model=model, version=version, resources=resources)
        self.max_length = max_length
        self.micro_batch_size = micro_batch_size
        self.trust_remote_code = trust_remote_code
        self.dtype = dtype
        # A token is rarely longer than ~10 characters; cutting first keeps tokenizing a 5 MB page cheap.
        self.max_chars = max_length * 10

    def setup(self) -> None:
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as err:
            raise RuntimeError("the transformers backend needs torch and transformers: install the `cpu` or `gpu` extra") from err
        self._torch = torch
        self._device = "cuda" if self.resources.num_gpus and torch.cuda.is_available() else "cpu"
        dtype = torch.float32
        if self._device == "cuda":
            dtype = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.dtype, torch.float32)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model, trust_remote_code=self.trust_remote_code)
        self._model = AutoModelForSequenceClassification.from_pretrained(
            self.model, trust_remote_code=self.trust_remote_code, dtype=dtype
        ).to(self._device).eval()
        if self._model.config.num_labels != NUM_SCORES:
            raise ValueError(f"classifier.model: {self.model} has {self._model.config.num_labels} labels; a 0-5 scorer needs 6")
        limit = getattr(self._model.config, "max_position_embeddings", None) or self.max_length
        # BERT-style position tables reserve no room for more positions than they were built with.
        self._max_tokens = min(self.max_length, limit, self._tokenizer.model_max_length)

    def predict_probs(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), NUM_SCORES), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self.micro_batch_size):
                idx = order[start : start + self.micro_batch_size]
                enc = self._tokenizer(
                    [texts[i] for i in idx], truncation=True, max_length=self._max_tokens, padding=True, return_tensors="pt"
                ).to(self._device)
                logits = self._model(**enc).logits.float()
                out[idx] = torch.softmax(logits, dim=-1).cpu().numpy()
        return out


class CascadeSafetyScorer(SafetyScorer):
    """fastText on every document, then a transformers classifier only on those fastText scores
    >= `threshold`, whose probabilities replace fastText's: the expensive model sees the small
    share of documents that could be bad, and decides them. A stateful stage (an actor pool,
    where the transformers model is loaded once per actor), as the transformers backend is."""

    def __init__(self, *, fast: FastTextSafetyScorer, slow: TransformersSafetyScorer, threshold: int, version: str, resources: Resources):
        super().__init__(model=fast.model, version=version, resources=resources)
        self.fast, self.slow, self.threshold = fast, slow, threshold
        self.max_chars = max(fast.max_chars, slow.max_chars)
        self.rescored = 0  # documents sent to the transformers model so far (for measuring the share)

    def setup(self) -> None:
        self.fast.setup()
        self.slow.setup()

    def predict_probs(self, texts: list[str]) -> np.ndarray:
        cleaned = [clean_text(t, max_chars=self.max_chars)[0] for t in texts]
        return self.predict_cleaned(cleaned)

    def predict_cleaned(self, texts: list[str]) -> np.ndarray:
        probs = self.fast.predict_cleaned([t[: self.fast.max_chars] for t in texts])
        rescore = np.flatnonzero(probs.argmax(axis=1) >= self.threshold)
        if len(rescore):
            probs[rescore] = self.slow.predict_cleaned([texts[i] for i in rescore])
        self.rescored += len(rescore)
        return probs


def build_scorer(cfg, *, resources: Resources) -> SafetyScorer:
    """The scorer named by a `ClassifierConfig` (with a cascade when `cfg.cascade.model` is set)."""
    uses_precision = cfg.backend == "fasttext" and cfg.precision.model is not None
    precision = {"precision": cfg.precision.model if uses_precision else None, "precision_threshold": cfg.precision.threshold}
    version = f"{cfg.version}+{cfg.precision.version}@{cfg.precision.threshold}" if uses_precision else cfg.version
    if cfg.backend == "fasttext" and cfg.cascade.model is None:
        return FastTextSafetyScorer(model=cfg.model, version=version, resources=resources, **precision)
    model = cfg.model if cfg.backend == "transformers" else cfg.cascade.model
    slow = TransformersSafetyScorer(
        model=model, version=cfg.version, resources=resources, max_length=cfg.max_length,
        micro_batch_size=cfg.micro_batch_size, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype,
    )
    if cfg.backend == "transformers":
        return slow
    fast = FastTextSafetyScorer(model=cfg.model, version=version, resources=resources, **precision)
    version = f"{version}+{cfg.cascade.version}@{cfg.cascade.threshold}"
    return CascadeSafetyScorer(fast=fast, slow=slow, threshold=cfg.cascade.threshold, version=version, resources=resources)
