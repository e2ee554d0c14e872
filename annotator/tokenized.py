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


def tokenize_training_text(tokenizer, text: str, *, open_id: int, close_id: int, eod_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of one document (EOD appended) and a 0/1 mask over them that is 1 from the
    reflection's opening template token through its closing one."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eod_id]
    mask = np.zeros(len(ids), dtype=np.uint8)
    inside = False
    for i, tok in enumerate(ids):
        if tok == open_id:
            inside = True
        if inside:
            mask[i] = 1
        if tok == close_id:
            inside = False
    return np.asarray(ids, dtype=np.int64), mask
