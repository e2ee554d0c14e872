"""The target tokenizer: the vocabulary the training data is written in (SmolLM2's by default),
independent of the generator.

Everything that counts tokens uses it through one path, the Rust `tokenizers` tokenizer: token
counts for selection, pause points, the reflection budget, and the token streams. Source text is
encoded with special-token matching off, so a web page that contains the text `<|endoftext|>` or
`<assistant>` stays ordinary text; template tokens are added after the base vocabulary in a fixed
order and only ever inserted as ids. The end-of-document token is chosen explicitly.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pyarrow as pa

from annotator.engine.models import resolve_model
from annotator.core.stages import Resources, Stage


def load_tokenizer(spec: str):
    """The transformers tokenizer of `spec` (chat templates, saving a tokenizer directory)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise RuntimeError("this needs transformers: pip install the project") from err
    return AutoTokenizer.from_pretrained(resolve_model(spec))


def load_fast_tokenizer(spec: str):
    """The Rust `tokenizers.Tokenizer` of `spec`: a local `tokenizer.json` when there is one, else
    from the Hub by id (no transformers, hence no torch, in the workers that count tokens)."""
    from tokenizers import Tokenizer

    resolved = resolve_model(spec)
    local = Path(resolved) / "tokenizer.json"
    if local.is_file():
        return Tokenizer.from_file(str(local))
    if Path(resolved).is_file():
        return Tokenizer.from_file(resolved)
    try:
        return Tokenizer.from_pretrained(resolved)
    except Exception:  # noqa: BLE001 - a model without tokenizer.json: take transformers' conversion
        return load_tokenizer(spec).backend_tokenizer


class TargetTokenizer:
    """The Rust tokenizer of `spec` with `added` tokens after its vocabulary (in order) and an
    explicit end-of-document token; text is always encoded with special-token matching off."""

    def __init__(self, spec: str, *, eos_token: str | None = None, added: tuple[str, ...] = ()):
        self.spec = spec
        self.rust = load_fast_tokenizer(spec)
        self.base_vocab_size = self.rust.get_vocab_size(with_added_tokens=True)
        self.added_ids: dict[str, int] = {}
        for token in added:
            existing = self.rust.token_to_id(token)
            if existing is not None:
                raise ValueError(f"output.tokenizer {spec!r} already has {token!r} (id {existing}); template tokens must be new")
            self.rust.add_special_tokens([token])
            self.added_ids[token] = self.rust.token_to_id(token)
        expected = list(range(self.base_vocab_size, self.base_vocab_size + len(added)))
        if list(self.added_ids.values()) != expected:
            raise ValueError(f"template tokens got ids {self.added_ids}, expected {expected} after the base vocabulary")
        self.rust.encode_special_tokens = True
        self.eos_token = eos_token
        self.eos_id = self.rust.token_to_id(eos_token) if eos_token is not None else None
        if eos_token is not None and self.eos_id is None:
            raise ValueError(f"output.eos_token {eos_token!r} is not a token of {spec!r}")

    def __len__(self) -> int:
        return self.rust.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.rust.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.rust.encode_batch_fast(texts, add_special_tokens=False)]

    def offsets(self, text: str) -> list[tuple[int, int]]:
        return list(self.rust.encode(text, add_special_tokens=False).offsets)

    def count(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.rust.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.rust.decode([int(i) for i in ids], skip_special_tokens=False)


@lru_cache(maxsize=8)
def target_tokenizer(spec: str, eos_token: str | None = None, *, added: tuple[str, ...] = ()) -> TargetTokenizer:
    """One `TargetTokenizer` per process and settings (loading takes a fraction of a second)."""
    return TargetTokenizer(spec, eos_token=eos_token, added=added)


class TokenCounter(Stage):
    """Adds `token_length` (int32): target-tokenizer tokens of each document's full text. Stateless:
    the tokenizer loads in a fraction of a second and is kept per worker process."""

    name = "tokens"
    reads = ("text",)
    adds = ("token_length",)

    def __init__(self, *, tokenizer: str, resources: Resources):
        self.tokenizer_spec = tokenizer
        self.resources = resources
        self._tok = None

    def setup(self) -> None:
        self._tok = target_tokenizer(self.tokenizer_spec)

    def process(self, batch: pa.Table) -> pa.Table:
        lengths = self._tok.count(batch.column("text").to_pylist())
        return batch.append_column("token_length", pa.array(lengths, pa.int32()))


def count_tokens(tokenizer, texts: list[str]) -> list[int]:
    """Token count of each text (special-token strings count as text) with a `TargetTokenizer`, a
    `tokenizers.Tokenizer` or a transformers tokenizer."""
    if isinstance(tokenizer, TargetTokenizer):
        return tokenizer.count(texts)
    if hasattr(tokenizer, "encode_batch_fast"):
        return [len(e.ids) for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]]
