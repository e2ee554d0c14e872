"""Writer: interleaved shards, atomic files, token shards that round-trip, filtered baseline."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotator.config import OutputConfig
from annotator.megatron import IndexedDatasetWriter, read_indexed_dataset
from annotator.tokens import load_tokenizer
from annotator.writer import ShardWriter
from tests.support import read_input, require_shared_data, run_pipeline


def _batch(n: int, *, share: float, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    selected = rng.random(n) < share
    return pa.table({
        "doc_id": [f"d{i:06d}" for i in range(n)],
        "text": [f"text {i}" for i in range(n)],
        "safety_score": pa.array(np.zeros(n), pa.int8()),
        "selected": selected,
        "selected_reason": ["token_matched_sample" if s else "not_selected" for s in selected],
        "token_length": pa.array(np.full(n, 2), pa.int32()),
        "reflection_status": ["ok" if s else "not_selected" for s in selected],
        "annotation_status": ["not_requested"] * n,
        "canary_type": pa.array([None] * n, pa.string()),
        "citations": pa.array([None] * n, pa.list_(pa.string())),
        "citations_dropped": pa.array([0] * n, pa.int16()),
        "annotations": pa.array([None] * n, pa.list_(pa.string())),
        "reflection_1p": [f"I reflect on text {i}." if s else None for i, s in enumerate(selected)],
        "reflection_3p": [f"They reflect on text {i}." if s else None for i, s in enumerate(selected)],
    })


def test_shards_interleave_annotated_documents_evenly(tmp_path):
    # Input order puts all selected documents first; every shard still gets ~10% of them.
    batch = _batch(10_000, share=0.1).sort_by([("selected", "descending")])
    writer = ShardWriter(out_dir=str(tmp_path), output=OutputConfig(path=str(tmp_path), rows_per_shard=1000, tokenized=False), tokenizer="builtin:smollm2-135m-instruct")
    writer.setup()
    names = json.loads(writer.process(batch).column("shard")[0].as_py())
    assert len(names) == 10
    shares = [np.mean(pq.read_table(tmp_path / "shards" / f"{n}.parquet").column("selected").to_numpy()) for n in names]
    overall = np.mean(batch.column("selected").to_numpy())
    # binomial sd for 1000 rows at p=0.1 is 0.0095; 4 sd
    assert all(abs(s - overall) < 0.038 for s in shares), shares
    # same input, same names and order
    again = ShardWriter(out_dir=str(tmp_path / "again"), output=OutputConfig(path="x", rows_per_shard=1000, tokenized=False), tokenizer="builtin:smollm2-135m-instruct")
    assert json.loads(again.process(batch).column("shard")[0].as_py()) == names
    first = pq.read_table(tmp_path / "shards" / f"{names[0]}.parquet").column("doc_id")
    assert first.equals(pq.read_table(tmp_path / "again" / "shards" / f"{names[0]}.parquet").column("doc_id"))


def test_a_shard_never_exists_half_written_under_its_final_name(tmp_path, monkeypatch):
    import annotator.checkpoint as checkpoint_mod  # the one atomic writer, used by ShardWriter

    def write_half_then_die(table, where, **kwargs):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_mod.pq, "write_table", write_half_then_die)
    writer = ShardWriter(out_dir=str(tmp_path), output=OutputConfig(path="x", tokenized=False), tokenizer="builtin:smollm2-135m-instruct")
    with pytest.raises(OSError, match="disk full"):
        writer.process(_batch(50, share=0.2))
    assert list((tmp_path / "shards").iterdir()) == []


def test_indexed_dataset_round_trip(tmp_path):
    docs = [[1, 2, 3], [], [65000, 7], list(range(1000))]
    w = IndexedDatasetWriter(tmp_path / "x", dtype=np.uint16)
    for d in docs:
        w.add_document(d)
    w.close()
    ds = read_indexed_dataset(tmp_path / "x")
    assert [ds[i].tolist() for i in range(len(ds))] == docs
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4]
    assert (tmp_path / "x.idx").read_bytes()[:9] == b"MMIDIDX\x00\x00"


def check_tokenized(out_dir) -> int:
    """Every text shard has a token shard and a mask shard that match it document by document."""
    meta = json.loads((out_dir / "tokenized" / "metadata.json").read_text())
    tok = load_tokenizer(str(out_dir / "tokenizer"))
    for token, tid in meta["added_token_ids"].items():
        assert tok(token, add_special_tokens=False)["input_ids"] == [tid]
    open_id, close_id = meta["added_token_ids"]["<assistant>"], meta["added_token_ids"]["</assistant>"]
    checked = 0
    for shard in sorted((out_dir / "shards").glob("*.parquet")):
        rows = pq.read_table(shard, columns=["text", "reflection_status"]).to_pylist()
        ids = read_indexed_dataset(out_dir / "tokenized" / shard.stem)
        masks = read_indexed_dataset(out_dir / "tokenized" / f"{shard.stem}_reflection_mask")
        assert len(ids) == len(masks) == len(rows)
        for i, row in enumerate(rows):
            doc, mask = ids[i].astype(np.int64), masks[i]
            assert doc[-1] == meta["eod_token_id"] and len(mask) == len(doc)
            assert tok.decode(doc[:-1].tolist()) == row["text"]
            if row["reflection_status"] == "ok":
                region = doc[mask == 1].tolist()
                assert region[0] == open_id and region[-1] == close_id
                reflection = row["text"].split("<assistant>")[1].split("</assistant>")[0]
                assert tok.decode(region) == f"<assistant>{reflection}</assistant>"
            else:
                assert mask.sum() == 0
            checked += 1
    return checked


@pytest.mark.slow
def test_filtered_baseline_drops_bad_documents(tmp_path):
    require_shared_data()
    out = tmp_path / "baseline"
    proc = run_pipeline("--config", "configs/demo.yaml", "--limit", "200", "--output", str(out),
                        "--set", "selection.mode=filtered_baseline", "--set", "generation.enabled=false")
    assert proc.returncode == 0, proc.stderr[-4000:]
    stats = json.loads((out / "stats.json").read_text())
    rows = pq.read_table(out / "shards").to_pylist()
    bad = sum(v for k, v in stats["score_histogram"].items() if int(k) >= 3)
    assert bad >= 1
    assert stats["documents_in"] == 200 and stats["documents_out"] == len(rows) == 200 - bad
    assert stats["selected_by_reason"]["dropped_bad"] == bad
    assert all(r["safety_score"] < 3 and r["reflection_status"] == "not_selected" for r in rows)
    source = read_input()
    assert all(r["text"] == source[r["doc_id"]] for r in rows)
    assert check_tokenized(out) == len(rows)
