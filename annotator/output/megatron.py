"""Tokenized shards in Megatron-LM's indexed dataset format (`.bin` + `.idx`, "MMIDIDX").

One sequence per document (EOD token appended), `document_indices` marking document boundaries,
and an optional parallel uint8 dataset that marks the tokens of a spliced reflection (template
tokens included), for recipes that mask the loss on them or block attention to them.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from annotator.core import layout
from annotator.core.storage import commit, location, temp_path

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
# Megatron-LM's DType codes (megatron/core/datasets/indexed_dataset.py).
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8}
_CODE_DTYPES = {code: np.dtype(t) for t, code in _DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice: uint16 when every id fits, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


class IndexedDatasetWriter:
    """Writes `<prefix>.bin` and `<prefix>.idx` under temporary names, renamed on `close()`."""

    def __init__(self, prefix: str | Path, *, dtype: np.dtype):
        self.prefix = location(prefix)
        self.dtype = np.dtype(dtype)
        self._tmp_bin = temp_path(self.prefix.with_suffix(".bin"))
        self._bin = open(self._tmp_bin, "wb")
        self._sizes: list[int] = []

    def add_document(self, tokens) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._sizes.append(len(arr))

    def close(self) -> None:
        self._bin.close()
        sizes = np.array(self._sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            pointers[1:] = np.cumsum(sizes[:-1].astype(np.int64)) * self.dtype.itemsize
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)  # one sequence per document
        tmp_idx = temp_path(self.prefix.with_suffix(".idx"))
        with open(tmp_idx, "wb") as f:
            f.write(_MAGIC)
            f.write(struct.pack("<Q", _VERSION))
            f.write(struct.pack("<B", _DTYPE_CODES[self.dtype.type]))
            f.write(struct.pack("<Q", len(sizes)))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(sizes.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))
        commit(self._tmp_bin, self.prefix.with_suffix(".bin"))
        commit(tmp_idx, self.prefix.with_suffix(".idx"))


@dataclass
class IndexedDataset:
    """A read-only view of one `.bin`/`.idx` pair (memory-mapped)."""

    sizes: np.ndarray
    pointers: np.ndarray
    document_indices: np.ndarray
    tokens: np.memmap

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = self.pointers[i] // self.tokens.itemsize
        return np.asarray(self.tokens[start : start + self.sizes[i]])


def sequence_count(prefix) -> int:
    """Sequences in `<prefix>.idx`, from its header (any location: only the header is read)."""
    with location(prefix).with_suffix(".idx").open("rb") as f:
        head = f.read(len(_MAGIC) + 8 + 1 + 8)
    if not head.startswith(_MAGIC) or len(head) < len(_MAGIC) + 17:
        raise ValueError(f"{prefix}.idx is not a Megatron MMIDIDX index")
    return struct.unpack("<Q", head[len(_MAGIC) + 9:])[0]


def read_indexed_dataset(prefix: str | Path) -> IndexedDataset:
    prefix = Path(prefix)
    with open(prefix.with_suffix(".idx"), "rb") as f:
        if f.read(len(_MAGIC)) != _MAGIC:
            raise ValueError(f"{prefix}.idx is not a Megatron MMIDIDX index")
        (version,) = struct.unpack("<Q", f.read(8))
        if version != _VERSION:
            raise ValueError(f"{prefix}.idx has version {version}, expected {_VERSION}")
        (code,) = struct.unpack("<B", f.read(1))
        (count,) = struct.unpack("<Q", f.read(8))
        (doc_count,) = struct.unpack("<Q", f.read(8))
        sizes = np.frombuffer(f.read(4 * count), dtype=np.int32)
        pointers = np.frombuffer(f.read(8 * count), dtype=np.int64)
        doc_idx = np.frombuffer(f.read(8 * doc_count), dtype=np.int64)
    dtype = _CODE_DTYPES[code]
    bin_path = prefix.with_suffix(".bin")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r") if os.path.getsize(bin_path) else np.zeros(0, dtype=dtype)
    return IndexedDataset(sizes=sizes, pointers=pointers, document_indices=doc_idx, tokens=tokens)


class WindowDataset:
    """The windows of one stream in write order, never re-packed: item `i` is exactly the
    `seq_length + 1` tokens that were written (Megatron's GPTDataset would concatenate and re-cut
    them, splitting a reflection from its text). `sample(i)` gives what a training step needs:
    inputs `w[:-1]`, labels `w[1:]` and, for annotated streams, a loss mask that stops after EOS."""

    def __init__(self, prefixes: list[str | Path]):
        self.prefixes = [Path(p) for p in prefixes]
        self.parts = [read_indexed_dataset(p) for p in self.prefixes]
        self.lengths = [self._lengths(p) for p in self.prefixes]
        self.offsets = np.cumsum([0, *(len(d) for d in self.parts)])

    @staticmethod
    def _lengths(prefix: Path) -> np.ndarray | None:
        path = layout.token_lengths_path(prefix)
        return np.load(path) if path.exists() else None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return part, i - int(self.offsets[part])

    def __getitem__(self, i: int) -> np.ndarray:
        part, j = self._locate(i)
        return self.parts[part][j]

    def sample(self, i: int) -> dict[str, np.ndarray]:
        part, j = self._locate(i)
        w = self.parts[part][j].astype(np.int64)
        lengths = self.lengths[part]
        # Labels 0..n-1 are w[1..n]: the rest of the content, then EOS (w[n]); after it, padding.
        mask = np.arange(len(w) - 1) < (lengths[j] if lengths is not None else len(w) - 1)
        return {"tokens": w[:-1], "labels": w[1:], "loss_mask": mask.astype(np.float32)}


def stream_dataset(out_dir: str | Path, stream: str) -> WindowDataset:
    """All files of one stream of a run (`reflection-1p`, `reflection-3p`, `summary`, `compact`, ...), in name order."""
    return WindowDataset(layout.stream_prefixes(Path(out_dir), stream))
