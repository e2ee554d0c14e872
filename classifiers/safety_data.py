"""The v2 safety scorer's training set: the harm data, the toxicity data and benign web text,
each (source, label) group weighted, split into a fit part and a calibration part.

Weights (rows a group contributes, in effective copies): min(rows, GROUP_CAP) * quality, so no
large or templated source dominates, times a quality factor for sources whose labels are noisy
or off-target (`QUALITY`). fastText has no sample weights: a weight w becomes floor(w) copies of
the row plus one more with probability frac(w), seeded (`expand`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from annotator.score.safety import normalize_for_fasttext
from classifiers.categories import row_categories

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HARM_DIR = SHARED / "safety-v2"
TOXICITY_DIR = SHARED / "safety"
CORPUS_DIR = SHARED / "corpus"
# web-sample-00000 (which holds the demo's 300 documents) is never trained on: it is the web
# split on which the flagged share is measured and read.
WEB_TRAIN_FILES = ("web-sample-00001.parquet", "web-sample-00002.parquet")
WEB_HELDOUT_FILES = ("web-sample-00000.parquet",)
# Web pages of the training files read by hand: harmful ones become label 1, unclear ones are left out.
WEB_REVIEW = Path(__file__).resolve().parent / "web_review.json"

GROUP_CAP = 2000
# Quality factors, from each PROVENANCE.md's caveats:
QUALITY = {
    ("aart", 1): 0.5,  # machine-generated and templated ("how to get away with X in <city>"), ~10% benign-reading
    ("davidson_hate_offensive", "offensive_language"): 0.5,  # profanity in tweets: offensive, rarely the harm SPP targets
    ("jigsaw_toxic_comments", 1): 0.75,  # noisy labels ("BOMB IN THE ASSHOLE" is 0)
    ("jigsaw_toxic_comments", 0): 0.75,
    ("web", 0): 2.0,  # the domain the scorer runs on: benign web pages are the negatives that matter most
    ("web", 1): 2.0,  # the few web pages read and judged harmful: the only explicit web documents on the harmful side
    ("web_chunks", 0): 2.0,  # the same benign pages cut into request-sized pieces (`web_chunks`)
}
CALIBRATION_SHARE = 0.15


@dataclass
class Rows:
    """Columns of labelled rows (lists of equal length)."""

    text: list[str]
    label: np.ndarray
    source: list[str]
    group: list[str]
    category: list[str]

    def __len__(self) -> int:
        return len(self.text)

    def take(self, idx) -> "Rows":
        idx = list(idx)
        return Rows([self.text[i] for i in idx], self.label[idx], [self.source[i] for i in idx],
                    [self.group[i] for i in idx], [self.category[i] for i in idx])


def _rows(table: pa.Table, *, source: str | None = None) -> Rows:
    n = table.num_rows
    sources = table.column("source").to_pylist() if source is None else [source] * n
    labels = np.array(table.column("label").to_pylist(), dtype=int)
    if source is not None:
        table = table.append_column("source", pa.array(sources, pa.string()))
    orig = table.column("orig_label").to_pylist() if "orig_label" in table.column_names else [""] * n
    # Davidson's hate and offensive rows are different kinds of text; they are weighted apart.
    groups = [f"{s}|{o}" if s == "davidson_hate_offensive" else f"{s}|{l}" for s, o, l in zip(sources, orig, labels)]
    return Rows(table.column("text").to_pylist(), labels, sources, groups, row_categories(table))


def read_labelled_dir(directory: Path, split: str) -> Rows:
    return _rows(pq.read_table(directory / f"{split}.parquet"))


def read_web(files, *, review: dict | None = None) -> tuple[Rows, list[str]]:
    """Web pages as benign rows, after the hand review (harmful -> 1, unclear -> left out). Returns the rows and their ids."""
    table = pa.concat_tables([pq.read_table(CORPUS_DIR / f, columns=["id", "text"]) for f in files])
    review = review or {}
    keep, labels, ids = [], [], []
    for i, doc_id in enumerate(table.column("id").to_pylist()):
        verdict = review.get(doc_id, {}).get("verdict", "benign")
        if verdict == "unclear":
            continue
        keep.append(i)
        labels.append(1 if verdict == "harmful" else 0)
        ids.append(doc_id)
    table = table.take(keep).drop(["id"])
    table = table.append_column("label", pa.array(labels, pa.int8()))
    rows = _rows(table, source="web")
    rows.category = ["sexual" if l else "web_text" for l in labels]  # every page reviewed harmful was sexual content
    return rows, ids


def web_chunks(pages: Rows, *, words: int = 80, per_page: int = 4) -> Rows:
    """Benign web pages cut into pieces of `words` words (at most `per_page`, at least 20 words):
    benign text as short as the harmful requests, so length and first-person phrasing alone do not
    read as harm. Measured by training on one web file and flagging the other (1.86% -> 1.60%)."""
    texts = []
    for text, label in zip(pages.text, pages.label):
        tokens = text.split()
        if label == 0:
            texts += [" ".join(tokens[k : k + words]) for k in range(0, min(len(tokens), words * per_page), words)
                      if len(tokens[k : k + words]) >= 20]
    n = len(texts)
    return Rows(texts, np.zeros(n, dtype=int), ["web_chunks"] * n, ["web_chunks|0"] * n, ["web_text"] * n)


def load_review() -> dict:
    return {r["id"]: r for r in json.loads(WEB_REVIEW.read_text())["pages"]} if WEB_REVIEW.is_file() else {}


def training_rows() -> Rows:
    """Every training row: harm train, toxicity train, reviewed web training files and their chunks."""
    web = read_web(WEB_TRAIN_FILES, review=load_review())[0]
    return concat_rows(read_labelled_dir(HARM_DIR, "train"), read_labelled_dir(TOXICITY_DIR, "train"), web, web_chunks(web))


def concat_rows(*parts: Rows) -> Rows:
    return Rows(sum((p.text for p in parts), []), np.concatenate([p.label for p in parts]), sum((p.source for p in parts), []),
                sum((p.group for p in parts), []), sum((p.category for p in parts), []))


def group_weights(rows: Rows, *, cap: int = GROUP_CAP, quality: dict | None = None) -> np.ndarray:
    """Per-row weight: each (source, label) group contributes min(n, cap) * quality effective rows."""
    quality = QUALITY if quality is None else quality
    groups, counts = np.unique(rows.group, return_counts=True)
    size = dict(zip(groups, counts))
    out = np.empty(len(rows))
    for i, (group, source, label) in enumerate(zip(rows.group, rows.source, rows.label)):
        q = quality.get((source, group.split("|", 1)[1]), quality.get((source, int(label)), 1.0))
        out[i] = min(size[group], cap) / size[group] * q
    return out


def in_calibration(text: str, *, share: float = CALIBRATION_SHARE) -> bool:
    """A seeded, order-free split: a row's side depends only on its text."""
    digest = hashlib.sha1(normalize_for_fasttext(text).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < share


def split_calibration(rows: Rows, *, share: float = CALIBRATION_SHARE) -> tuple[Rows, Rows]:
    calib = np.array([in_calibration(t, share=share) for t in rows.text])
    return rows.take(np.flatnonzero(~calib)), rows.take(np.flatnonzero(calib))


def expand(rows: Rows, weights: np.ndarray, *, seed: int = 0) -> tuple[list[str], list[int]]:
    """Weights as repeated rows, shuffled: (texts, labels) for fastText."""
    rng = np.random.default_rng(seed)
    copies = np.floor(weights).astype(int) + (rng.random(len(weights)) < weights - np.floor(weights))
    order = rng.permutation(np.repeat(np.arange(len(rows)), copies))
    return [rows.text[i] for i in order], [int(rows.label[i]) for i in order]
