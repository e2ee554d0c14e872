"""Reading pause points.

The pause point is seeded by (seed, doc_id) (`core.seeding`). It follows the method: a density that rises linearly
over the first 20% of the document and is flat after, over the first `max_content_tokens` target
tokens only (what a training window keeps), never at token 0 and never after the last token.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from annotator.core.seeding import unit_hash

# Pause point density: rises linearly on [0, RAMP] and is flat on [RAMP, 1].
RAMP = 0.2
_RAMP_MASS = RAMP / (2 - RAMP)  # CDF at RAMP: (RAMP/2) / (RAMP/2 + 1 - RAMP)


def pause_fraction_from_uniform(u: float) -> float:
    """Inverse CDF of the pause point density (linear ramp over the first 20%, then uniform)."""
    if u < _RAMP_MASS:
        return RAMP * (u / _RAMP_MASS) ** 0.5
    return RAMP + (u - _RAMP_MASS) / (1 - _RAMP_MASS) * (1 - RAMP)


def sample_pause_fraction(seed: int, doc_id: str) -> float:
    return pause_fraction_from_uniform(unit_hash("pause", seed, doc_id))


@dataclass
class Pause:
    token_index: int  # target tokens of the document before the reflection
    char_index: int   # the same point as a character offset into the document
    fraction: float   # token_index / content tokens
    prompt_prefix: str


def _word_char(ch: str) -> bool:
    # Letters, digits and combining marks (Tamil or Devanagari vowel signs belong to their word).
    return ch.isalnum() or unicodedata.category(ch).startswith("M")


def word_boundary(text: str, char_index: int) -> bool:
    """True when a reflection at `char_index` would not split a word."""
    if char_index <= 0 or char_index >= len(text):
        return True
    return not (_word_char(text[char_index - 1]) and _word_char(text[char_index]))


def char_boundary(offsets: list[tuple[int, int]], k: int) -> bool:
    """True when token `k` starts a new character: byte-level tokens can split one in two."""
    return k <= 0 or k >= len(offsets) or offsets[k][0] >= offsets[k - 1][1]


def clip_at_char(offsets: list[tuple[int, int]], keep: int) -> int:
    """The largest token count <= `keep` that ends on a character boundary."""
    while 0 < keep < len(offsets) and not char_boundary(offsets, keep):
        keep -= 1
    return keep


def pause_point(text: str, offsets: list[tuple[int, int]], *, fraction: float, max_prefix_tokens: int,
                max_content_tokens: int, snap: str = "word", at_end: bool = False) -> Pause:
    """Where the reflection goes, after `token_index` target tokens (at `char_index` in `text`).

    The point lies in [1, m-1] for m = min(tokens, max_content_tokens), so the reflection sits
    inside what a training window keeps and has text on both sides (a one-token document pauses
    after it). `snap="word"` moves the point back (else forward) to the nearest token that starts
    a word; `"token"` keeps any token boundary. `at_end` pins the pause after the last kept token.
    The prompt shows at most the last `max_prefix_tokens` tokens before the pause."""
    n = len(offsets)
    m = clip_at_char(offsets, min(n, max_content_tokens))  # what the window keeps
    if m == 0:
        return Pause(token_index=0, char_index=0, fraction=0.0, prompt_prefix="")
    if at_end:
        k = m
    else:
        k = min(max(1, round(fraction * m)), max(1, m - 1))
        k = _snap(text, offsets, k=k, upper=max(1, m - 1), words=snap == "word")
    char_index = offsets[k][0] if k < n else len(text)
    if k == m and k < n:
        char_index = offsets[k - 1][1]  # after the last kept token, before whatever the window drops
    start = offsets[k - max_prefix_tokens][0] if k > max_prefix_tokens else 0
    return Pause(token_index=k, char_index=char_index, fraction=k / m, prompt_prefix=text[start:char_index])


def _snap(text: str, offsets: list[tuple[int, int]], *, k: int, upper: int, words: bool) -> int:
    """The nearest point at or before `k` (else after it) that does not split a character, nor,
    with `words`, a word."""
    def ok(i: int) -> bool:
        if i >= len(offsets):
            return True
        return char_boundary(offsets, i) and (not words or word_boundary(text, offsets[i][0]))

    if ok(k):
        return k
    for i in range(k, 0, -1):
        if ok(i):
            return i
    for i in range(k + 1, upper + 1):
        if ok(i):
            return i
    return k  # one long word: any split is inside it (and the decoded prefix shows it)
