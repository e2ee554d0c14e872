"""The extended target tokenizer saved beside the token streams: built by transformers once per
(tokenizer files, added tokens, EOS, library versions) and copied from the model cache after that."""

from __future__ import annotations

import shutil

import pytest

from annotator.engine.models import resolve_model
from annotator.output import training_metadata
from annotator.output.training_metadata import save_extended_tokenizer

ADDED = ("<assistant>", "</assistant>", "<charter_1.1>")


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def tokenizer_dir(tmp_path, monkeypatch):
    """A local tokenizer folder (the built-in model's tokenizer files) and an empty cache (set once
    the built-in model is found: an empty SPP_CACHE would convert the model again)."""
    builtin = resolve_model("builtin:smollm2-135m-instruct")
    monkeypatch.setenv("SPP_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "tok"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        shutil.copyfile(f"{builtin}/{name}", src / name)
    return src


def test_cached_folder_is_the_one_transformers_saves(tokenizer_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    spec = str(tokenizer_dir)
    direct = training_metadata._build_extended_tokenizer(spec, added=ADDED, eos_token="<|endoftext|>", dest=tmp_path / "direct")
    first = save_extended_tokenizer(spec, added=ADDED, eos_token="<|endoftext|>", dest=tmp_path / "a")
    assert first == direct == {"<assistant>": 49152, "</assistant>": 49153, "<charter_1.1>": 49154}
    assert files(tmp_path / "a") == files(tmp_path / "direct")
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 1   # no temp folder left beside it

    def no_build(*args, **kwargs):
        raise AssertionError("built again instead of taken from the cache")

    monkeypatch.setattr(training_metadata, "_build_extended_tokenizer", no_build)
    again = save_extended_tokenizer(spec, added=ADDED, eos_token="<|endoftext|>", dest=tmp_path / "b")
    assert again == first and files(tmp_path / "b") == files(tmp_path / "a")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "b")
    assert loaded.convert_tokens_to_ids("<assistant>") == 49152 and loaded.eos_token == "<|endoftext|>"
    # Other added tokens, another EOS or an edited tokenizer file are another folder: built, not reused.
    for args in ({"added": ADDED[:2], "eos_token": "<|endoftext|>"}, {"added": ADDED, "eos_token": "<|im_end|>"}):
        with pytest.raises(AssertionError, match="built again"):
            save_extended_tokenizer(spec, dest=tmp_path / "c", **args)
    config = tokenizer_dir / "tokenizer_config.json"
    edited = config.read_text().replace('"pad_token": "<|im_end|>"', '"pad_token": "<|endoftext|>"')
    assert edited != config.read_text()
    config.write_text(edited)
    with pytest.raises(AssertionError, match="built again"):
        save_extended_tokenizer(spec, added=ADDED, eos_token="<|endoftext|>", dest=tmp_path / "c")
