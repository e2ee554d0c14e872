"""Writer: the training text, text shards in the published schema, the windows and documents
layouts read back with Megatron-LM's own reader, special-token text that stays text, atomic
files, and a filtered-baseline run (whose dropped documents keep their safety annotations)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotator.config import RunConfig
from annotator.method.resolved import resolve_run
from annotator.output.finalize import finalize_stages
from annotator.generate.generator import column_defaults, generator_columns
from annotator.output.megatron import IndexedDatasetWriter, WindowDataset, read_indexed_dataset, stream_dataset
from annotator.generate.pause import pause_point
from annotator.output.tokenized import training_tokenizer
from annotator.core.tokens import target_tokenizer
from tests.streams_check import check_streams, megatron_dataset
from tests.support import read_input, require_shared_data, run_pipeline

TOKENIZER = "builtin:smollm2-135m-instruct"
SPECIAL_TEXT = "Tags: <assistant> fake </assistant>, chat <|im_end|> end <|endoftext|> and <annotations>x</annotations>. Real text follows here."


def config(tmp_path, **output) -> RunConfig:
    return RunConfig.model_validate({"input": {"paths": ["/nonexistent"]},
                                     "output": {"path": str(tmp_path), "rows_per_shard": 1000, **output}})


def unit_table(docs: list[tuple[str, str, str | None]], *, cfg: RunConfig, tokenizer=TOKENIZER, content_tokens: int = 1920) -> pa.Table:
    """What finalize has before splicing: (doc_id, text, reflection or None) per row; a row with a
    reflection is selected and paused where the generator would pause it; 'FAIL' marks a failure."""
    tok = target_tokenizer(tokenizer)
    n = len(docs)
    columns, defaults = generator_columns(cfg.generation), column_defaults(cfg.generation)
    cols = {k: [defaults.get(k)] * n for k in columns}
    for i, (_, text, reflection) in enumerate(docs):
        if reflection is None:
            continue
        offsets = tok.offsets(text)
        p = pause_point(text, offsets, fraction=0.5, max_prefix_tokens=10_000, max_content_tokens=content_tokens)
        cols["reflection_token_index"][i], cols["reflection_position"][i] = p.token_index, p.char_index
        if reflection == "FAIL":
            cols["reflection_status"][i] = "failed:checks=third_person"
        else:
            cols["reflection_status"][i] = "ok"
            cols["reflection_1p"][i], cols["reflection_3p"][i] = f"I {reflection}", f"The text {reflection}"
    table = pa.table({
        "doc_id": [d for d, _, _ in docs], "text": [t for _, t, _ in docs],
        "token_length": pa.array(tok.count([t for _, t, _ in docs]), pa.int32()),
        "safety_score": pa.array([4 if r else 0 for _, _, r in docs], pa.int8()),
        "safety_confidence": pa.array([0.9] * n, pa.float32()),
        "source_file": ["f.parquet"] * n, "source_row": pa.array(range(n), pa.int64()), "_unit": ["u-000000000"] * n,
        "is_bad": [bool(r) for _, _, r in docs], "selected": [bool(r) for _, _, r in docs],
        "selected_reason": ["bad" if r else "not_selected" for _, _, r in docs],
    })
    for key, typ in columns.items():
        table = table.append_column(key, pa.array(cols[key], typ))
    return table


def resolved(cfg: RunConfig):
    return resolve_run(cfg.generation, voices=cfg.output.voices)


def write_unit(tmp_path, docs, **output) -> tuple[RunConfig, dict]:
    cfg = config(tmp_path, **output)
    splice, writer = finalize_stages(cfg, out_dir=str(tmp_path), resolved=resolved(cfg))
    result = writer.process(splice.process(unit_table(docs, cfg=cfg, content_tokens=cfg.content_tokens)))
    stats = json.loads(result.column("stats_json")[0].as_py())
    return cfg, stats


def save_metadata(cfg: RunConfig, stats: dict) -> None:
    from annotator.output.training_metadata import save_training_metadata

    save_training_metadata(cfg, Path(cfg.output.path), stats=stats, resolved=resolved(cfg))


def test_published_schema_and_training_text(tmp_path):
    docs = [("a", "Plain text about gardening and soil.", None), ("b", "Some people were hurt in the attack yesterday.", "am moved [2.1].")]
    write_unit(tmp_path, docs)
    table = pq.read_table(tmp_path / "shards")
    assert table.column_names[:10] == ["doc_id", "text", "token_length", "safety_score", "is_bad", "reflection_1p", "reflection_3p",
                                       "reflection_position", "reflection_token_index", "canary_type"]
    types = {f.name: f.type for f in table.schema}
    assert types["token_length"] == pa.int32() and types["reflection_position"] == pa.int32()
    assert types["reflection_token_index"] == pa.int32() and types["safety_score"] == pa.int8() and types["is_bad"] == pa.bool_()
    assert "source_text" not in table.column_names and "reflection_char_index" not in table.column_names
    rows = {r["doc_id"]: r for r in table.to_pylist()}
    assert rows["a"]["text"] == rows["a"]["training_text"] == docs[0][1]
    b = rows["b"]
    assert b["text"] == docs[1][1]  # the ORIGINAL text
    pos = b["reflection_position"]  # a character offset into it
    assert b["training_text"] == b["text"][:pos] + "<assistant>I am moved [2.1].</assistant>" + b["text"][pos:]
    tok = target_tokenizer(TOKENIZER)
    assert tok.encode(b["text"][:pos]) == tok.encode(b["text"])[: b["reflection_token_index"]]


def test_windows_layout_read_by_megatron_core(tmp_path):
    corpus = list(read_input().items())
    long_doc = next((d, t) for d, t in corpus if len(target_tokenizer(TOKENIZER).encode(t)) > 3000)
    docs = [(d, t, None) for d, t in corpus[:30]] + [(corpus[30][0], corpus[30][1], "see harm [2.1]."), (long_doc[0], long_doc[1], "notice [1.1]."),
                                                     (corpus[31][0], corpus[31][1], "FAIL")]
    cfg, stats = write_unit(tmp_path, docs, voices=["1p", "3p"])
    save_metadata(cfg, stats)
    counts = check_streams(tmp_path)
    assert counts == {"windows": 6, "placed": 4, "compact_documents": 30}  # 3 annotated windows x 2 voices
    side = pq.read_table(tmp_path / "tokenized" / "sidecar").to_pylist()
    clipped = [r for r in side if r["doc_id"] == long_doc[0]][0]
    assert clipped["token_length"] <= 1920 and clipped["clipped_tokens"] > 1000
    assert [r["reflection_status"] for r in side if r["doc_id"] == corpus[31][0]] == ["failed:checks=third_person"]
    meta = json.loads((tmp_path / "tokenized" / "metadata.json").read_text())
    assert meta["streams"]["reflection-1p"]["sequences"] == meta["streams"]["reflection-3p"]["sequences"] == 3
    assert meta["eos_token_id"] == 0 and meta["added_token_ids"]["<assistant>"] == 49152 and meta["window_tokens"] == 2049
    weights = meta["blend"]["reflection-3p"].split()[0::2]
    assert abs(sum(map(float, weights)) - 1) < 1e-4 and len(weights) == 2
    # The reader for training: fixed windows, labels shifted, loss stops after EOS.
    ds = stream_dataset(tmp_path, "reflection-1p")
    sample = ds.sample(0)
    n = int(np.load(next((tmp_path / "tokenized" / "reflection-1p").glob("*.token_lengths.npy")))[0])
    assert len(ds) == 3 and sample["tokens"].shape == (2048,) and sample["labels"][n - 1] == 0
    assert sample["loss_mask"][: n].all() and not sample["loss_mask"][n:].any()


def test_special_token_text_stays_text(tmp_path):
    docs = [("special-plain", SPECIAL_TEXT, None), ("special-reflected", SPECIAL_TEXT, "notice odd tags.")]
    cfg, stats = write_unit(tmp_path, docs)
    save_metadata(cfg, stats)
    check_streams(tmp_path)
    meta = json.loads((tmp_path / "tokenized" / "metadata.json").read_text())
    special_ids = set(meta["added_token_ids"].values()) | {0, 1, 2}  # template tokens, <|endoftext|>, <|im_start|>, <|im_end|>
    tok = target_tokenizer(TOKENIZER)
    (annotated,) = [megatron_dataset(p.with_suffix("")) for p in (tmp_path / "tokenized" / "reflection-1p").glob("*[0-9].idx")]
    window = annotated[0]  # a view into the dataset's memory map: keep the dataset alive
    n = int(np.load(next((tmp_path / "tokenized" / "reflection-1p").glob("*.npy")))[0])
    content = window[:n].astype(int).tolist()
    assert [t for t in content if t in special_ids] == [meta["added_token_ids"]["<assistant>"], meta["added_token_ids"]["</assistant>"]]
    (compact,) = [megatron_dataset(p.with_suffix("")) for p in (tmp_path / "tokenized" / "compact").glob("*.idx")]
    doc = compact[0].astype(int).tolist()
    first_eos = doc.index(0)
    assert tok.decode(doc[:first_eos]) == SPECIAL_TEXT  # round trip, and the first id 0 is the real end
    assert not set(doc[:first_eos]) & special_ids


def test_documents_layout_one_sequence_per_document(tmp_path):
    docs = [("a", SPECIAL_TEXT, None), ("b", "A long story about a fire that hurt two people.", "feel for them [2.1].")]
    cfg, _ = write_unit(tmp_path, docs, layout="documents")
    rows = pq.read_table(tmp_path / "shards").to_pylist()
    (prefix,) = [p.with_suffix("") for p in (tmp_path / "tokenized" / "reflection-1p").glob("*[0-9].idx")]
    ds, masks = megatron_dataset(prefix), megatron_dataset(prefix.with_name(prefix.name + "_reflection_mask"))
    tok = training_tokenizer(cfg.output, list(resolved(cfg).sections))
    assert len(ds) == 2
    for i, row in enumerate(rows):
        ids = ds[i].astype(int)
        assert ids[-1] == 0 and 0 not in ids[:-1].tolist()
        assert tok.decode(ids[:-1]) == row["training_text"]
        reflected = row["doc_id"] == "b"
        assert masks[i].sum() == (len(tok.encode("I feel for them [2.1].")) + 2 if reflected else 0)  # with the template tokens


def test_clipped_tail_goes_to_compact_when_asked(tmp_path):
    corpus = list(read_input().values())
    long_text = max(corpus, key=len)
    _, stats = write_unit(tmp_path, [("long", long_text, "notice [1.1].")], clipped_tail="compact")
    side = pq.read_table(tmp_path / "tokenized" / "sidecar").to_pylist()[0]
    tok = target_tokenizer(TOKENIZER)
    ids = tok.encode(long_text)
    (compact,) = [megatron_dataset(p.with_suffix("")) for p in (tmp_path / "tokenized" / "compact").glob("*.idx")]
    flat = np.concatenate([compact[i] for i in range(len(compact))]).astype(int).tolist()
    assert flat[: side["clipped_tokens"]] == ids[side["token_length"]:] and flat[side["clipped_tokens"]] == 0
    assert stats["clipped_tokens"] == side["clipped_tokens"] > 0


def test_an_all_rejected_unit_writes_nothing(tmp_path):
    cfg = config(tmp_path)
    _, writer = finalize_stages(cfg, out_dir=str(tmp_path), resolved=resolved(cfg))
    empty = unit_table([("x", "text", None)], cfg=cfg).slice(0, 0)
    result = writer.process(empty)
    assert json.loads(result.column("shard")[0].as_py()) == []
    assert not (tmp_path / "shards").exists() or not list((tmp_path / "shards").iterdir())


def test_shards_interleave_annotated_documents_evenly(tmp_path):
    # Input order puts all selected documents first; every shard still gets ~10% of them.
    rng = np.random.default_rng(0)
    docs = [(f"d{i:05d}", f"text {i}", "care." if rng.random() < 0.1 else None) for i in range(3000)]
    docs.sort(key=lambda d: d[2] is None)
    write_unit(tmp_path, docs, rows_per_shard=300, tokenized=False)
    shards = sorted((tmp_path / "shards").glob("*.parquet"))
    assert len(shards) == 10
    shares = [np.mean(pq.read_table(s).column("selected").to_numpy()) for s in shards]
    overall = np.mean([d[2] is not None for d in docs])
    assert all(abs(s - overall) < 0.07 for s in shares), shares  # binomial sd at 300 rows, p=0.1: 0.017; 4 sd
    write_unit(tmp_path / "again", docs, rows_per_shard=300, tokenized=False)
    assert [pq.read_table(s).column("doc_id") for s in shards] == [pq.read_table(tmp_path / "again" / "shards" / s.name).column("doc_id")
                                                                  for s in shards]


def test_a_shard_never_exists_half_written_under_its_final_name(tmp_path, monkeypatch):
    import annotator.core.checkpoint as checkpoint_mod  # the one atomic writer, used by ShardWriter

    def write_half_then_die(table, where, **kwargs):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_mod.pq, "write_table", write_half_then_die)
    with pytest.raises(OSError, match="disk full"):
        write_unit(tmp_path, [("a", "some text", None)], tokenized=False)
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
    mcore = megatron_dataset(tmp_path / "x")
    assert [mcore[i].tolist() for i in range(len(mcore))] == docs
    assert WindowDataset([tmp_path / "x"])[3].tolist() == docs[3]


@pytest.mark.slow
def test_filtered_baseline_drops_bad_documents_and_publishes_every_score(tmp_path):
    require_shared_data()
    out = tmp_path / "baseline"
    proc = run_pipeline("--config", "configs/demo.yaml", "--limit", "200", "--output", str(out),
                        "--set", "selection.mode=filtered_baseline", "--set", "generation.enabled=false")
    assert proc.returncode == 0, proc.stderr[-4000:]
    stats = json.loads((out / "stats.json").read_text())
    rows = pq.read_table(out / "shards").to_pylist()
    threshold = stats["config"]["selection"]["bad_threshold"]
    bad = sum(v for k, v in stats["score_histogram"].items() if int(k) >= threshold)
    assert bad >= 1
    assert stats["documents_in"] == 200 and stats["documents_out"] == len(rows) == 200 - bad
    assert stats["selected_by_reason"]["dropped_bad"] == bad
    assert all(r["safety_score"] < threshold and r["reflection_status"] == "not_selected" for r in rows)
    source = read_input()
    assert all(r["text"] == r["training_text"] == source[r["doc_id"]] for r in rows)
    assert check_streams(out)["compact_documents"] == len(rows)

    # The scores of every scored document, the dropped ones too: the `safety_annotations` config of the
    # run's Hub repository (staged by the publish command), loaded with `datasets`.
    from datasets import load_dataset

    from pipelines.publish import main

    repo = tmp_path / "repo"
    assert main(["--output", str(out), "--dry-run", str(repo), "--sample-rows", "10", "--include-safety-annotations"]) == 0
    ds = load_dataset(str(repo), "safety_annotations", split="train", cache_dir=str(tmp_path / "cache"))
    schema = ds.data.schema
    assert ds.column_names == ["id", "safety_score", "safety_probs"] and schema.field("id").type == pa.string()
    assert schema.field("safety_score").type == pa.int8() and ds.features["safety_score"].dtype == "int8"
    assert pa.types.is_list(schema.field("safety_probs").type) and schema.field("safety_probs").type.value_type == pa.float32()
    scores = {r["id"]: r for r in ds}
    assert ds.num_rows == len(scores) == stats["documents_in"] == 200 and set(scores) <= set(source)
    for r in rows:   # the written documents: the shards' own columns
        assert (scores[r["doc_id"]]["safety_score"], scores[r["doc_id"]]["safety_probs"]) == (r["safety_score"], r["safety_probs"])
    dropped = set(scores) - {r["doc_id"] for r in rows}
    assert len(dropped) == bad and all(scores[d]["safety_score"] >= threshold and len(scores[d]["safety_probs"]) == 6 for d in dropped)
