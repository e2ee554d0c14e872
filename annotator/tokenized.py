"""The target tokenizer extended with the template (and charter) special tokens, and training
text turned into token ids plus a reflection mask for the Megatron shards."""

from __future__ import annotations

import numpy as np

from annotator.reflection_prompt import constitution_sections


def charter_token(section: str) -> str:
    return f"<charter_{section}>"


def special_tokens(*, reflection_open: str, reflection_close: str, annotation_open: str, annotation_close: str,
                   charter_tokens: bool) -> list[str]:
    tokens = [reflection_open, reflection_close, annotation_open, annotation_close]
    if charter_tokens:
        tokens += [charter_token(s) for s in sorted(constitution_sections(), key=lambda s: tuple(map(int, s.split("."))))]
    return list(dict.fromkeys(tokens))


def extend_tokenizer(tokenizer, tokens: list[str]) -> dict[str, int]:
    """Add `tokens` as special tokens (each encodes to one id); returns their ids."""
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    return {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}


def reflection_mask(ids: np.ndarray, *, open_id: int, close_id: int) -> np.ndarray:
    """1 from each opening template token through the next closing one (inclusive), else 0."""
    index = np.arange(len(ids))
    last_open = np.maximum.accumulate(np.where(ids == open_id, index, -1)) if len(ids) else index
    closes = np.where(ids == close_id, index, -1)
    # The close token itself is inside: compare with the last close strictly before each position.
    last_close_before = np.concatenate(([-1], np.maximum.accumulate(closes)[:-1])) if len(ids) else index
    return ((last_open >= 0) & (last_open > last_close_before)).astype(np.uint8)


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens, in batch; the fast path skips offsets and masks."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_training_texts(tokenizer, texts: list[str], *, open_id: int, close_id: int, eod_id: int):
    """Token ids of each document (EOD appended) and its reflection mask."""
    for ids in encode_texts(tokenizer, texts):
        arr = np.asarray([*ids, eod_id], dtype=np.int64)
        yield arr, reflection_mask(arr, open_id=open_id, close_id=close_id)


def tokenize_training_text(tokenizer, text: str, *, open_id: int, close_id: int, eod_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of one document (EOD appended) and a 0/1 mask over them that is 1 from the
    reflection's opening template token through its closing one."""
    return next(tokenize_training_texts(tokenizer, [text], open_id=open_id, close_id=close_id, eod_id=eod_id))
