"""Pause points: the method's distribution, seeded per document, inside the content a training
window keeps, never at token 0 or after the last token, and (by default) never inside a word."""

from __future__ import annotations

import numpy as np
import pytest

from annotator.generate.pause import pause_fraction_from_uniform, pause_point, sample_pause_fraction, word_boundary
from annotator.core.tokens import target_tokenizer
from tests.support import read_input


@pytest.fixture(scope="module")
def tok():
    return target_tokenizer("builtin:smollm2-135m-instruct")


def test_pause_point_distribution_matches_ramp_then_uniform():
    # The density rises linearly to x=0.2 and is flat after, so P(x<0.2) = 0.1/0.9 = 1/9 and
    # P(x<0.1) = 1/36; on [0.2,1] the CDF is linear. Kolmogorov-Smirnov on 50k seeded points.
    xs = np.sort([sample_pause_fraction(7, f"doc-{i}") for i in range(50_000)])
    cdf = np.where(xs < 0.2, (xs / 0.2) ** 2 / 9, 1 / 9 + (xs - 0.2) / 0.9)
    empirical = np.arange(1, len(xs) + 1) / len(xs)
    assert np.max(np.abs(empirical - cdf)) < 1.36 / np.sqrt(len(xs))  # 95% KS bound
    assert abs(np.mean(xs < 0.1) - 1 / 36) < 0.004
    assert xs.min() >= 0 and xs.max() <= 1
    assert pause_fraction_from_uniform(1 / 9) == pytest.approx(0.2)


def test_pause_point_is_seeded_per_document():
    assert sample_pause_fraction(0, "a") == sample_pause_fraction(0, "a")
    assert sample_pause_fraction(0, "a") != sample_pause_fraction(1, "a")


def test_token_snap_splits_text_at_a_token_boundary(tok):
    text = "The quick brown fox jumps over the lazy dog. It was not amused, and said so loudly."
    offsets = tok.offsets(text)
    p = pause_point(text, offsets, fraction=0.5, max_prefix_tokens=4, max_content_tokens=1920, snap="token")
    assert p.token_index == round(0.5 * len(offsets))
    assert tok.encode(text[: p.char_index]) == tok.encode(text)[: p.token_index]
    assert len(tok.encode(p.prompt_prefix)) <= 5  # cut to the last 4 tokens
    assert text[: p.char_index].endswith(p.prompt_prefix)


def test_word_snap_never_splits_a_word(tok):
    # "Músculos" is several tokens; a token-boundary pause inside it would splice a reflection
    # into the word ("Músc<assistant>...</assistant>ulos").
    text = "Los Músculos del cuerpo humano trabajan juntos para movernos cada día."
    offsets = tok.offsets(text)
    inside = [k for k in range(1, len(offsets)) if not word_boundary(text, offsets[k][0])]
    assert inside, "the tokenizer splits some word of the sample"
    for k in inside:
        fraction = k / len(offsets)
        token = pause_point(text, offsets, fraction=fraction, max_prefix_tokens=100, max_content_tokens=1920, snap="token")
        word = pause_point(text, offsets, fraction=fraction, max_prefix_tokens=100, max_content_tokens=1920, snap="word")
        assert not word_boundary(text, token.char_index)  # the method's token snap can split the word
        assert word_boundary(text, word.char_index) and word.token_index < token.token_index
        assert tok.encode(text[: word.char_index]) == tok.encode(text)[: word.token_index]


def test_pause_stays_inside_the_kept_content_and_off_the_edges(tok):
    docs = list(read_input().values())
    long = max(docs, key=len)
    offsets = tok.offsets(long)
    assert len(offsets) > 1920
    for i in range(300):
        p = pause_point(long, offsets, fraction=sample_pause_fraction(i, "long"), max_prefix_tokens=5000, max_content_tokens=1920)
        assert 1 <= p.token_index <= 1919
        assert word_boundary(long, p.char_index)
    for f in (0.0, 1.0):
        edge = pause_point("one two three", tok.offsets("one two three"), fraction=f, max_prefix_tokens=10, max_content_tokens=1920)
        assert 1 <= edge.token_index <= 2  # three tokens: after the first or second, never 0 or 3
    single = pause_point("word", tok.offsets("word"), fraction=0.5, max_prefix_tokens=10, max_content_tokens=1920)
    assert single.token_index == 1 and single.char_index == 4
    end = pause_point(long, offsets, fraction=0.3, max_prefix_tokens=5000, max_content_tokens=1920, at_end=True)
    assert end.token_index == 1920 and end.char_index == offsets[1919][1]
