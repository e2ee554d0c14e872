"""The checks every run's token streams must pass, read with Megatron-LM's own reader
(megatron-core's `IndexedDataset`): window sizes, lengths against `token_lengths.npy` and the
sidecar, decoded content against the training text, the template token at the recorded index,
EOS only at the end of a document, the masks, and the compact stream against the plain documents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from annotator.tokens import TargetTokenizer, load_tokenizer

OPEN, CLOSE = "<assistant>", "</assistant>"


def megatron_dataset(prefix: Path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


def expected_window_text(row: dict, *, voice: str, first_voice: str, tok: TargetTokenizer, charter_render=None) -> str:
    """What an annotated window's content decodes to: the annotation block, the document up to the
    pause, the reflection between the template tokens, the rest of the kept content."""
    def spliced(v: str) -> str:
        if row["reflection_status"] != "ok":
            return ""
        reflection = row[f"reflection_{v}"]
        return OPEN + (charter_render(reflection) if charter_render else reflection) + CLOSE

    text = row["text"]
    offsets = tok.offsets(text)
    keep = row["token_length"]
    end = offsets[keep - 1][1] if 0 < keep < len(offsets) else (len(text) if keep else 0)
    # training_text is the annotation block + the document with the first voice spliced in.
    block = row["training_text"][: len(row["training_text"]) - len(text) - len(spliced(first_voice))]
    pos = row["reflection_position"] if row["reflection_status"] == "ok" else end
    return block + text[:pos] + spliced(voice) + text[pos:end]


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
    tok = TargetTokenizer(str(out_dir / "tokenizer"), eos_token=meta["eos_token"])
    open_id = meta["added_token_ids"][OPEN]
    counts = {"windows": 0, "reflected": 0, "compact_documents": 0}

    sidecars = sorted((out_dir / "tokenized" / "sidecar").glob("*.parquet"))
    for voice in meta["voices"]:
        stream = out_dir / "tokenized" / f"annotated-{voice}"
        prefixes = sorted(p.with_suffix("") for p in stream.glob("*.idx") if not p.stem.endswith("_reflection_mask"))
        assert [p.name for p in prefixes] == [s.stem for s in sidecars]
        for prefix, side in zip(prefixes, sidecars):
            rows = pq.read_table(side).to_pylist()
            ds = megatron_dataset(prefix)
            masks = megatron_dataset(prefix.with_name(prefix.name + "_reflection_mask"))
            lengths = np.load(prefix.with_name(prefix.name + ".token_lengths.npy"))
            assert len(ds) == len(masks) == len(rows) == len(lengths)
            for i, row in enumerate(rows):
                w, mask = ds[i].astype(np.int64), masks[i]
                assert len(w) == size and row["window"] == i
                n = int(lengths[i])
                assert n == row[f"window_tokens_{voice}"]
                assert w[n] == eos and (w[n + 1:] == pad).all()
                content = w[:n]
                assert eos not in content.tolist()  # EOS never inside a document
                assert row["token_length"] <= meta["content_tokens"]
                assert row["token_length"] + row["clipped_tokens"] == row["source_token_length"]
                assert tok.decode(content) == expected_window_text(row, voice=voice, first_voice=meta["voices"][0], tok=tok,
                                                                   charter_render=charter_render)
                reflected = row["reflection_status"] == "ok"
                assert (content == open_id).sum() == int(reflected)
                if reflected:
                    block = len(content) - row["token_length"] - int(mask.sum())
                    assert w[block + row["reflection_token_index"]] == open_id
                    region = w[mask == 1]
                    assert region[0] == open_id and region[-1] == meta["added_token_ids"][CLOSE]
                    counts["reflected"] += 1
                else:
                    assert mask.sum() == 0
                counts["windows"] += 1

    compact = sorted(p.with_suffix("") for p in (out_dir / "tokenized" / "compact").glob("*.idx"))
    by_unit: dict[str, list[str]] = {}
    for shard in sorted((out_dir / "shards").glob("*.parquet")):
        unit = shard.stem.rsplit("-", 1)[0]
        by_unit.setdefault(unit, []).extend(
            r["training_text"] for r in pq.read_table(shard, columns=["reflection_status", "training_text"]).to_pylist()
            if r["reflection_status"] in ("not_selected", "generation_disabled"))
    assert [p.name for p in compact] == [u for u, docs in sorted(by_unit.items()) if docs]
    for prefix in compact:
        ds = megatron_dataset(prefix)
        flat = np.concatenate([ds[i].astype(np.int64) for i in range(len(ds))])
        assert all(len(ds[i]) == size for i in range(len(ds)))
        ends = np.flatnonzero(flat == eos)
        docs, start = [], 0
        for e in ends:
            docs.append(tok.decode(flat[start:e]))
            start = e + 1
        expected = by_unit[prefix.name]
        assert docs[: len(expected)] == expected  # after them: only padding (pad == EOS gives empty documents)
        assert all(d == "" for d in docs[len(expected):]) and (flat[start:] == pad).all()
        counts["compact_documents"] += len(expected)
    return counts
