"""The checks every run's token streams must pass, read with Megatron-LM's own reader
(megatron-core's `IndexedDataset`): for every recipe stream, window sizes, lengths against
`token_lengths.npy` and the sidecar, decoded content against the document with the recipe's text
placed where the recipe says, the template token at the recorded index, EOS only at the end of a
document, the masks; and the compact streams against the plain documents, in order."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from annotator.config import OutputConfig
from annotator.method.recipes import Recipe, load_recipe, run_recipes
from annotator.output.tokenized import annotation_block
from annotator.core.tokens import TargetTokenizer, load_tokenizer

OPEN, CLOSE = "<assistant>", "</assistant>"


def megatron_dataset(prefix: Path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


def run_recipe(out_dir: Path, name: str, info: dict) -> Recipe:
    """The recipe as the run's recorded config gives it (a built-in one or a file), checked
    against what the training metadata says of it; the built-in one of that name for an output
    the writer made without a run record (the writer's own tests)."""
    from annotator.config import RunConfig

    record = out_dir / "run.json"
    if record.exists():
        cfg = RunConfig.model_validate(json.loads(record.read_text())["config"])
        recipe = next(r for r in run_recipes(cfg.generation) if r.name == name)
    else:
        recipe = replace(load_recipe(name), applies_to=info["applies_to"])
    assert (recipe.applies_to, recipe.placement) == (info["applies_to"], info["placement"]), name
    return recipe


def inserted_text(recipe: Recipe, field: str, row: dict, *, tok: TargetTokenizer, meta: dict, charter_render=None) -> str | None:
    """What the stream places for `row`, as text, or None."""
    c = recipe.column
    if row.get(c("status")) != "ok":
        return None
    value = row[c(field)]
    if recipe.placement == "prefix":
        _, block = annotation_block(tok, value, output=OutputConfig(path="x"), max_tokens=meta["annotation_block_tokens"])
        return block or None
    if recipe.placement == "replace":
        return tok.decode(tok.encode(value)[: meta["seq_length"]])
    return OPEN + (charter_render(value) if charter_render else value) + CLOSE


def expected_text(recipe: Recipe, field: str, row: dict, *, tok: TargetTokenizer, meta: dict, charter_render=None,
                  whole: bool = False) -> str:
    """The stream's text for a document: its kept content (all of it when `whole`) with the
    recipe's text placed where the recipe says."""
    text = row["text"]
    offsets = tok.offsets(text)
    keep = len(offsets) if whole else row["token_length"]
    end = offsets[keep - 1][1] if 0 < keep < len(offsets) else (len(text) if keep else 0)
    inserted = inserted_text(recipe, field, row, tok=tok, meta=meta, charter_render=charter_render)
    if inserted is None:
        return text[:end]
    if recipe.placement in ("pause", "end"):
        pos = row[recipe.column("position")]
        return text[:pos] + inserted + text[pos:end]
    if recipe.placement == "replace":
        return inserted
    return inserted + text[:end]


def check_streams(out_dir: Path, *, charter_render=None) -> dict:
    """Returns counts of what was checked."""
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "tokenized" / "metadata.json").read_text())
    assert meta["layout"] == "windows"
    size = meta["window_tokens"]
    eos, pad = meta["eos_token_id"], meta["pad_token_id"]
    saved = load_tokenizer(str(out_dir / "tokenizer"))
    assert saved.eos_token == meta["eos_token"] and saved.convert_tokens_to_ids(meta["eos_token"]) == eos
    for token, tid in meta["added_token_ids"].items():
        assert saved(token, add_special_tokens=False)["input_ids"] == [tid]
    assert meta["added_token_ids"][OPEN] == meta["base_vocab_size"]
    added = tuple(t for t, _ in sorted(meta["added_token_ids"].items(), key=lambda kv: kv[1]))
    tok = TargetTokenizer(meta["tokenizer_source"], eos_token=meta["eos_token"], added=added)
    open_id, close_id = meta["added_token_ids"][OPEN], meta["added_token_ids"][CLOSE]
    counts = {"windows": 0, "placed": 0, "compact_documents": 0}

    sidecars = sorted((out_dir / "tokenized" / "sidecar").glob("*.parquet"))
    side_rows = {s.stem: pq.read_table(s).to_pylist() for s in sidecars}
    for name, info in meta["recipes"].items():
        recipe = run_recipe(out_dir, name, info)
        for stream, field in info["streams"].items():
            prefixes = sorted(p.with_suffix("") for p in (out_dir / "tokenized" / stream).glob("*.idx")
                              if not p.stem.endswith("_reflection_mask"))
            assert [p.name for p in prefixes] == [s.stem for s in sidecars], stream
            for prefix in prefixes:
                rows = side_rows[prefix.name]
                ds = megatron_dataset(prefix)
                masks = megatron_dataset(prefix.with_name(prefix.name + "_reflection_mask"))
                lengths = np.load(prefix.with_name(prefix.name + ".token_lengths.npy"))
                assert len(ds) == len(masks) == len(rows) == len(lengths)
                for i, row in enumerate(rows):
                    w, mask = ds[i].astype(np.int64), masks[i]
                    assert len(w) == size and row["window"] == i
                    n = int(lengths[i])
                    assert n == row[f"window_tokens_{stream}"]
                    assert w[n] == eos and (w[n + 1:] == pad).all()
                    content = w[:n]
                    assert eos not in content.tolist()  # EOS never inside a document
                    assert row["token_length"] <= meta["content_tokens"]
                    assert row["token_length"] + row["clipped_tokens"] == row["source_token_length"]
                    assert tok.decode(content) == expected_text(recipe, field, row, tok=tok, meta=meta, charter_render=charter_render)
                    placed = row.get(recipe.column("status")) == "ok"
                    assert (content == open_id).sum() == int(placed and recipe.wrapped)
                    if placed:
                        region = w[mask == 1]
                        assert len(region) > 0
                        if recipe.wrapped:
                            assert region[0] == open_id and region[-1] == close_id
                        if recipe.placement == "pause":
                            assert w[row[recipe.column("token_index")]] == open_id
                        counts["placed"] += 1
                    else:
                        assert mask.sum() == 0
                    counts["windows"] += 1

    first = next(iter(meta["recipes"]))  # the run's main recipe (metadata lists them in the run's order)
    first_status = run_recipe(out_dir, first, meta["recipes"][first]).column("status")
    by_unit: dict[str, list[dict]] = {}
    for shard in sorted((out_dir / "shards").glob("*.parquet")):
        unit = shard.stem.rsplit("-", 1)[0]
        by_unit.setdefault(unit, []).extend(r for r in pq.read_table(shard).to_pylist()
                                            if not r["selected"] or r[first_status] == "generation_disabled")
    compact_streams = {"compact": None}
    for name, info in meta["recipes"].items():
        if info["applies_to"] == "all":
            for stream, field in info["streams"].items():
                compact_streams[f"{stream}-compact"] = (run_recipe(out_dir, name, info), field)
    for cname, spec in compact_streams.items():
        prefixes = sorted(p.with_suffix("") for p in (out_dir / "tokenized" / cname).glob("*.idx"))
        assert [p.name for p in prefixes] == [u for u, docs in sorted(by_unit.items()) if docs], cname
        for prefix in prefixes:
            ds = megatron_dataset(prefix)
            flat = np.concatenate([ds[i].astype(np.int64) for i in range(len(ds))])
            assert all(len(ds[i]) == size for i in range(len(ds)))
            ends = np.flatnonzero(flat == eos)
            docs, start = [], 0
            for e in ends:
                docs.append(tok.decode(flat[start:e]))
                start = e + 1
            rows = by_unit[prefix.name]
            expected = [r["text"] if spec is None else expected_text(spec[0], spec[1], r, tok=tok, meta=meta, whole=True) for r in rows]
            assert docs[: len(expected)] == expected  # after them: only padding (pad == EOS gives empty documents)
            assert all(d == "" for d in docs[len(expected):]) and (flat[start:] == pad).all()
            if spec is None:
                counts["compact_documents"] += len(expected)
    return counts
