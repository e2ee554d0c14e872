"""The target tokenizer (`annotator/core/tokens.py`): the same counts as the transformers tokenizer
with special-token strings read as text, template tokens after the base vocabulary, an explicit
EOS, and no transformers import in the counting workers."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa

import pytest

from annotator.core.tokens import TargetTokenizer, TokenCounter, load_tokenizer
from annotator.core.stages import Resources
from tests.support import REPO, read_input

MODEL = "builtin:smollm2-135m-instruct"


def test_counts_equal_the_transformers_tokenizer_on_the_corpus():
    texts = list(read_input().values())[:800] + ["<assistant> x </assistant>", "<|im_start|>user hi", "", " \n "]
    counter = TokenCounter(tokenizer=MODEL, resources=Resources())
    counter.setup()
    counted = counter.process(pa.table({"text": texts})).column("token_length").to_pylist()
    reference = [len(ids) for ids in load_tokenizer(MODEL)(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]]
    assert counted == reference
    assert counted[-2] == 0 and sum(counted) > 100 * len(texts)
    assert counted[-3] > 3  # "<|im_start|>" counts as the text it is, not as one special token


def test_template_tokens_follow_the_base_vocabulary_and_eos_is_explicit():
    tok = TargetTokenizer(MODEL, eos_token="<|endoftext|>", added=("<assistant>", "</assistant>", "<annotations>"))
    assert tok.base_vocab_size == 49152 and len(tok) == 49155
    assert tok.added_ids == {"<assistant>": 49152, "</assistant>": 49153, "<annotations>": 49154}
    assert tok.eos_id == 0  # not the instruct tokenizer's default <|im_end|> (2)
    text = "x <assistant> y <|endoftext|> z <|im_end|>"
    ids = tok.encode(text)
    assert not set(ids) & {0, 1, 2, 49152, 49153, 49154} and tok.decode(ids) == text
    assert tok.decode([49152, *tok.encode(" hi"), 49153, 0]) == "<assistant> hi</assistant><|endoftext|>"
    with pytest.raises(ValueError, match="output.eos_token '<eos>' is not a token"):
        TargetTokenizer(MODEL, eos_token="<eos>")
    with pytest.raises(ValueError, match="already has '<\\|im_end\\|>'"):
        TargetTokenizer(MODEL, added=("<|im_end|>",))


def test_counter_does_not_import_transformers_or_torch():
    code = ("import sys; from annotator.core.tokens import TokenCounter; from annotator.core.stages import Resources; "
            f"c = TokenCounter(tokenizer={MODEL!r}, resources=Resources()); c.setup(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
