"""Token counting for selection (`annotator/tokens.py`): the same counts as the transformers
tokenizer the shards use, without importing transformers into the counting workers."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa

from annotator.tokens import TokenCounter, load_tokenizer
from annotator.stages import Resources
from tests.support import REPO, read_input

MODEL = "builtin:smollm2-135m-instruct"


def test_counts_equal_the_transformers_tokenizer_on_the_corpus():
    texts = list(read_input().values())[:800] + ["<assistant> x </assistant>", "<|im_start|>user hi", "", " \n "]
    counter = TokenCounter(tokenizer=MODEL, resources=Resources())
    counter.setup()
    counted = counter.process(pa.table({"text": texts})).column("token_length").to_pylist()
    reference = [len(ids) for ids in load_tokenizer(MODEL)(texts, add_special_tokens=False)["input_ids"]]
    assert counted == reference
    assert counted[-2] == 0 and sum(counted) > 100 * len(texts)


def test_counter_does_not_import_transformers_or_torch():
    code = ("import sys; from annotator.tokens import TokenCounter; from annotator.stages import Resources; "
            f"c = TokenCounter(tokenizer={MODEL!r}, resources=Resources()); c.setup(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
