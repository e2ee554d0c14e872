"""The training side of a run's output: the extended target tokenizer saved beside the token
streams, and `tokenized/metadata.json` (ids, window, streams, recipes, Megatron blend lines).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from importlib.metadata import version
from pathlib import Path

from annotator.config import RunConfig
from annotator.core import layout, storage
from annotator.core.checkpoint import write_json
from annotator.core.errors import RunError
from annotator.engine.models import cache_dir, resolve_model
from annotator.method.recipes import placed_fields, stream_name
from annotator.method.resolved import ResolvedRun


def save_training_metadata(cfg: RunConfig, out_dir: Path, *, stats: dict, resolved: ResolvedRun) -> dict:
    """The extended target tokenizer (saved beside the streams, EOS set to `output.eos_token`) and
    `tokenized/metadata.json`: every added token's id, EOS and pad ids, the window, each stream's
    size and files, and the blend line Megatron-LM's `--data-path` takes (weights proportional to
    windows: the natural mix of annotated and compact windows)."""
    from annotator.output.megatron import sequence_count, token_dtype
    from annotator.output.tokenized import special_tokens, training_tokenizer

    pack_sections = list(resolved.sections)
    added = special_tokens(cfg.output, pack_sections)
    ids = save_extended_tokenizer(cfg.output.tokenizer, added=tuple(added), eos_token=cfg.output.eos_token,
                                  dest=out_dir / layout.TOKENIZER_DIR)
    target = training_tokenizer(cfg.output, pack_sections)
    if ids != target.added_ids:
        raise RunError(f"the saved tokenizer numbers the template tokens {ids}, the streams {target.added_ids}")
    streams = {}
    for name in layout.stream_names(out_dir):
        prefixes = layout.stream_prefixes(out_dir, name)
        sequences = [sequence_count(p) for p in prefixes]
        merged = stats.get("streams", {}).get(name, {})
        streams[name] = {"files": len(prefixes), "sequences": sum(sequences), "tokens": merged.get("tokens", 0),
                         "padding": merged.get("padding", 0),
                         "prefixes": [storage.relative(p, out_dir) for p in prefixes], "sequences_per_file": sequences}
    pad = cfg.output.pad_token_id if cfg.output.pad_token_id is not None else target.eos_id
    meta = {
        "format": "megatron-mmidx",
        "layout": cfg.output.layout,
        "tokenizer": layout.TOKENIZER_DIR,
        "tokenizer_source": cfg.output.tokenizer,
        "base_vocab_size": target.base_vocab_size,
        "vocab_size": len(target),
        "dtype": token_dtype(len(target)).name,
        "eos_token": cfg.output.eos_token,
        "eos_token_id": target.eos_id,
        "pad_token_id": pad,
        "added_token_ids": target.added_ids,
        "seq_length": cfg.output.seq_length,
        "window_tokens": cfg.output.seq_length + 1 if cfg.output.layout == "windows" else None,
        "content_tokens": cfg.content_tokens if cfg.output.layout == "windows" else None,
        "reflection_budget_tokens": cfg.generation.max_reflection_tokens,
        "annotation_block_tokens": cfg.generation.annotations.max_block_tokens,
        "voices": cfg.output.voices,
        "reflection_mask_suffix": layout.MASK_SUFFIX,
        "token_lengths_suffix": layout.TOKEN_LENGTHS_SUFFIX if cfg.output.layout == "windows" else None,
        "sidecar": f"{layout.TOKENS_DIR}/{layout.SIDECAR}" if cfg.output.layout == "windows" else None,
        "streams": streams,
        "recipes": stream_recipes(resolved, voices=cfg.output.voices),
        "blend": blend_lines(out_dir, streams, cfg=cfg),
    }
    write_json(out_dir / layout.TOKENS_DIR / layout.METADATA, meta)
    return {k: v for k, v in meta.items() if k != "streams"} | {"streams": {k: {f: v[f] for f in ("files", "sequences", "tokens", "padding")}
                                                                           for k, v in streams.items()}}


# Files of a model folder that say nothing about its tokenizer (and are large).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
_IDS_FILE = "spp-added-token-ids.json"   # written last: a cached folder without it is incomplete


def save_extended_tokenizer(spec: str, *, added: tuple[str, ...], eos_token: str, dest: Path) -> dict[str, int]:
    """The target tokenizer with `added` as special tokens and `eos_token` as EOS, saved by
    transformers as a tokenizer folder at `dest`; returns each added token's id as transformers
    numbers it. The folder is a function of the source tokenizer's files, the added tokens, EOS and
    the transformers version, so for a local tokenizer it is built once and kept in the model cache
    (`$SPP_CACHE/tokenizers/<key>/`): importing and loading transformers' tokenizer cost ~5 s of
    every run's finish here. A Hub id is built every time (its files are not local to key on)."""
    source = Path(resolve_model(spec))
    if not source.is_dir():
        with tempfile.TemporaryDirectory(prefix="spp-tokenizer-") as built:
            ids = _build_extended_tokenizer(spec, added=added, eos_token=eos_token, dest=Path(built))
            _copy_folder(Path(built), dest)
        return ids
    cached = cache_dir() / "tokenizers" / _tokenizer_key(source, added=added, eos_token=eos_token)
    if not (cached / _IDS_FILE).is_file():
        tmp = cached.with_name(f"{cached.name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            ids = _build_extended_tokenizer(spec, added=added, eos_token=eos_token, dest=tmp)
            (tmp / _IDS_FILE).write_text(json.dumps(ids))
            os.rename(tmp, cached)
        except OSError:  # another run put the same folder there first
            if not (cached / _IDS_FILE).is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _copy_folder(cached, dest, skip=(_IDS_FILE,))
    return json.loads((cached / _IDS_FILE).read_text())


def _copy_folder(local: Path, dest, *, skip: tuple[str, ...] = ()) -> None:
    """The files of a local folder copied into `dest` (a folder or an object-storage prefix)."""
    storage.mkdirs(dest)
    for f in sorted(local.iterdir()):
        if f.is_file() and f.name not in skip:
            storage.copy_in(f, dest / f.name)


def _build_extended_tokenizer(spec: str, *, added: tuple[str, ...], eos_token: str, dest: Path) -> dict[str, int]:
    from annotator.core.tokens import load_tokenizer

    tokenizer = load_tokenizer(spec)
    tokenizer.add_special_tokens({"additional_special_tokens": list(added)}, replace_extra_special_tokens=False)
    tokenizer.eos_token = eos_token
    tokenizer.save_pretrained(dest)
    return {t: tokenizer.convert_tokens_to_ids(t) for t in added}


def _tokenizer_key(source: Path, *, added: tuple[str, ...], eos_token: str) -> str:
    h = hashlib.sha256(json.dumps({"added": list(added), "eos": eos_token, "transformers": version("transformers"),
                                   "tokenizers": version("tokenizers")}).encode())
    for f in sorted(p for p in source.rglob("*") if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES)):
        h.update(str(f.relative_to(source)).encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:32]


def stream_recipes(resolved: ResolvedRun, *, voices: list[str]) -> dict:
    """Per recipe: its pack version, what it applies to, where its text goes, and its streams."""
    out = {}
    for recipe, pack in resolved.pairs:
        out[recipe.name] = {"prompt_version": pack.version, "applies_to": recipe.applies_to, "placement": recipe.placement,
                            "streams": {stream_name(recipe, f): f for f in placed_fields(recipe, pack, voices=voices)}}
    return out


def blend_lines(out_dir: Path, streams: dict, *, cfg: RunConfig) -> dict[str, str]:
    """Per training stream of a recipe, `weight prefix weight prefix ...` over its files and the
    compact stream's (the recipe's own compact stream when it applies to every document; in the
    documents layout, over its own files alone), weights = each file's share of windows or
    sequences; prefixes relative to the output directory, so the line holds wherever the run is
    copied."""
    def line(names: list[str]) -> str:
        files = [(p, n) for name in names for p, n in zip(streams.get(name, {}).get("prefixes", []),
                                                          streams.get(name, {}).get("sequences_per_file", []))]
        total = sum(n for _, n in files) or 1
        return " ".join(f"{n / total:.6g} {p}" for p, n in files if n)

    out = {}
    for name in streams:
        if name == layout.COMPACT or name.endswith(f"-{layout.COMPACT}"):
            continue
        if cfg.output.layout == "documents":
            out[name] = line([name])
        else:
            own = f"{name}-{layout.COMPACT}"
            out[name] = line([name, own if own in streams else layout.COMPACT])
    return out
