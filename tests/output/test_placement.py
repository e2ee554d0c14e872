"""Where the writer puts each recipe's text: in the training text (`TrainingText`) and as ids in
a stream (`StreamWriter`), per placement (pause, end, before, replace, prefix), plus the row order
of shards, their column order, which documents get windows, and one unit's windows read back."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotator.config import OutputConfig
from annotator.core import layout
from annotator.method.recipes import load_recipe
from annotator.output.megatron import read_indexed_dataset
from annotator.output.tokenized import training_tokenizer
from annotator.method.recipes import placed_streams
from annotator.output.writer import PUBLISHED_COLUMNS, StreamWriter, TrainingText, chosen_mask, interleave_order, shard_columns

SECTIONS = sorted(load_recipe("reflection").load_pack().constitution.ids)
TEXT = "Hello world. Another sentence follows here."
PAUSE = len("Hello world.")


def streams(*names: str, voices=("1p",)):
    return placed_streams([(load_recipe(n), load_recipe(n).load_pack()) for n in names], voices=list(voices))


def stream(name: str, field: str | None = None):
    found = [s for s in streams(name, voices=("1p", "3p")) if field is None or s.field == field]
    return found[0]


def splice(output: OutputConfig | None = None, *, names=("reflection",), content_tokens=1920, annotation_tokens=64, enabled=True):
    return TrainingText(output or OutputConfig(path="unused"), content_tokens=content_tokens, sections=SECTIONS,
                        annotation_tokens=annotation_tokens, streams=streams(*names), generation_enabled=enabled)


def writer(tmp_path, *names: str, **output) -> StreamWriter:
    out = OutputConfig(path=str(tmp_path), **output)
    return StreamWriter(out_dir=str(tmp_path), output=out, sections=SECTIONS, annotation_tokens=64, streams=streams(*names))


@pytest.fixture(scope="module")
def tok():
    return training_tokenizer(OutputConfig(path="unused"), SECTIONS)


def test_placed_streams_follow_the_recipes_and_voices():
    assert [(s.stream, s.field) for s in streams("reflection", voices=("1p", "3p"))] == [
        ("reflection-1p", "reflection_1p"), ("reflection-3p", "reflection_3p")]
    assert [s.stream for s in streams("reflection", voices=("3p",))] == ["reflection-3p"]
    # Framings that are not voices are all placed, whatever the voices; one-field packs give one stream.
    assert [s.stream for s in streams("preflection")] == [
        "preflection-charter_summary", "preflection-neutral", "preflection-judgemental", "preflection-idealisation"]
    assert [s.stream for s in streams("summary", "rephrase", "annotations")] == ["summary", "rephrase", "annotations"]


def test_training_text_per_placement(tok):
    t = splice()
    ok = {"text": TEXT, "reflection_status": "ok", "reflection_1p": "I pause here.", "reflection_position": PAUSE}
    assert t.place_text(stream("reflection", "reflection_1p"), ok, tok=tok) == \
        "Hello world.<assistant>I pause here.</assistant> Another sentence follows here."
    assert t.place_text(stream("reflection", "reflection_1p"), {**ok, "reflection_status": "failed:parse"}, tok=tok) == TEXT
    assert t.inserted_text(stream("reflection", "reflection_1p"), {**ok, "reflection_status": None}, tok=tok) is None

    end = {"text": TEXT, "summary_status": "ok", "summary": "A short summary.", "summary_position": len(TEXT)}
    assert t.place_text(stream("summary"), end, tok=tok) == TEXT + "<assistant>A short summary.</assistant>"
    before = {"text": TEXT, "preflection_status": "ok", "preflection_neutral": "A neutral framing."}
    assert t.place_text(stream("preflection", "neutral"), before, tok=tok) == "<assistant>A neutral framing.</assistant>" + TEXT
    replace = {"text": TEXT, "rephrase_status": "ok", "rephrase_text": "Rewritten safely."}
    assert t.place_text(stream("rephrase"), replace, tok=tok) == "Rewritten safely."  # unwrapped, instead of the text
    tags = {"text": TEXT, "annotation_status": "ok", "annotations": ["topic: greetings", "style: plain"]}
    assert t.place_text(stream("annotations"), tags, tok=tok) == "<annotations>topic: greetings\nstyle: plain</annotations>\n" + TEXT


def test_annotation_tags_that_do_not_fit_are_left_out(tok):
    tags = {"text": TEXT, "annotation_status": "ok", "annotations": ["topic: greetings", "style: a very long and winding description"]}
    block = len([0, *tok.encode("topic: greetings"), 0, *tok.encode("\n")])
    assert splice(annotation_tokens=block).inserted_text(stream("annotations"), tags, tok=tok) == \
        "<annotations>topic: greetings</annotations>\n"
    assert splice(annotation_tokens=3).inserted_text(stream("annotations"), tags, tok=tok) is None  # nothing fits: no block


def test_charter_tokens_replace_real_citations_only():
    out = OutputConfig(path="unused", template={"charter_tokens": True})
    tok = training_tokenizer(out, SECTIONS)
    row = {"text": TEXT, "reflection_status": "ok", "reflection_position": PAUSE,
           "reflection_1p": "I weigh this [1.1, 2.1] and that [99.9]."}
    assert splice(out).inserted_text(stream("reflection", "reflection_1p"), row, tok=tok) == \
        "<assistant>I weigh this <charter_1.1><charter_2.1> and that [99.9].</assistant>"


def test_training_text_stage_clips_chosen_documents_on_a_character_boundary(tok):
    long_text = "One two three four five six seven eight nine ten eleven twelve."
    texts = [long_text, long_text, TEXT]
    n = [len(tok.encode(t)) for t in texts]
    batch = pa.table({
        "doc_id": ["a", "b", "c"], "text": texts, "token_length": pa.array(n, pa.int32()), "selected": [True, False, True],
        "reflection_status": ["failed:parse", None, "ok"], "reflection_1p": [None, None, "I pause."],
        "reflection_position": pa.array([None, None, PAUSE], pa.int32()),
    })
    out = splice(content_tokens=5).process(batch)
    keep = out.column("token_length").to_pylist()
    assert n[0] > 5 and n[2] > 5
    # Chosen documents keep 5 tokens (every boundary of this ASCII text is a character boundary),
    # whether or not their reflection succeeded; the unchosen one keeps all of its tokens.
    assert keep == [5, n[1], 5]
    assert out.column("source_token_length").to_pylist() == n
    assert out.column("clipped_tokens").to_pylist() == [n[i] - keep[i] for i in range(3)]
    # The kept tokens end on a character boundary: they decode to a prefix of the text.
    assert long_text.startswith(tok.decode(tok.encode(long_text)[: keep[0]]))
    assert out.column("training_text").to_pylist() == [long_text, long_text, "Hello world.<assistant>I pause.</assistant>" + TEXT[PAUSE:]]
    assert out.column("training_stream").to_pylist() == [None, None, "reflection-1p"]
    # Generation off: nothing chosen, nothing clipped or placed.
    off = splice(content_tokens=5, enabled=False).process(batch)
    assert off.column("token_length").to_pylist() == n
    assert off.column("training_text").to_pylist() == texts and off.column("training_stream").to_pylist() == [None] * 3


def test_stream_ids_per_placement(tmp_path, tok):
    w = writer(tmp_path, "reflection")
    doc = tok.encode(TEXT)
    refl = stream("reflection", "reflection_1p")
    row = {"reflection_status": "ok", "reflection_1p": "I pause.", "reflection_token_index": 3}
    inserted = [w.open_id, *tok.encode("I pause."), w.close_id]
    assert w.inserted(refl, row) == inserted
    a = w.content(refl, row, doc=doc, keep=6)
    assert a.ids == [*doc[:3], *inserted, *doc[3:6]]
    assert (a.reflection_start, a.reflection_end) == (3, 3 + len(inserted))
    assert w.content(refl, {**row, "reflection_status": "failed:parse"}, doc=doc, keep=6).ids == doc[:6]
    with pytest.raises(ValueError, match="past the 2 content tokens"):
        w.content(refl, row, doc=doc, keep=2)

    end = {"summary_status": "ok", "summary": "Sum.", "summary_token_index": None}
    e = w.content(stream("summary"), end, doc=doc, keep=4)  # no token index: at the end of the kept content
    assert e.ids == [*doc[:4], w.open_id, *tok.encode("Sum."), w.close_id] and e.reflection_start == 4
    rep = w.content(stream("rephrase"), {"rephrase_status": "ok", "rephrase_text": "New text."}, doc=doc, keep=4)
    assert rep.ids == tok.encode("New text.") and (rep.reflection_start, rep.reflection_end) == (0, len(rep.ids))
    pre = w.content(stream("annotations"), {"annotation_status": "ok", "annotations": ["topic: x"]}, doc=doc, keep=4)
    block = [tok.added_ids["<annotations>"], *tok.encode("topic: x"), tok.added_ids["</annotations>"], *tok.encode("\n")]
    assert pre.ids == [*block, *doc[:4]] and pre.reflection_end == len(block)


def test_writer_ids_and_padding(tmp_path, tok):
    w = writer(tmp_path, "reflection", seq_length=64)
    assert (w.open_id, w.close_id) == (tok.added_ids["<assistant>"], tok.added_ids["</assistant>"])
    assert w.eos_id == tok.eos_id == w.pad_id and w.size == 65
    assert writer(tmp_path, "reflection", pad_token_id=7).pad_id == 7
    long = {"rephrase_status": "ok", "rephrase_text": "word " * 200}
    assert len(w.inserted(stream("rephrase"), long)) == 64  # a rewrite is cut to the sequence length


def test_chosen_mask_and_shard_order():
    table = pa.table({"selected": [True, False, None, True]})
    assert chosen_mask(table, generation_enabled=True) == [True, False, False, True]
    assert chosen_mask(table, generation_enabled=False) == [False] * 4

    ids = [f"doc-{i}" for i in range(40)]
    order = interleave_order(ids, 0)
    assert sorted(order.tolist()) == list(range(40)) and order.tolist() != list(range(40))
    assert interleave_order(ids, 0).tolist() == order.tolist()
    assert interleave_order(ids, 1).tolist() != order.tolist()
    # The order belongs to the ids, not to where they start.
    shuffled = ids[::-1]
    assert [shuffled[i] for i in interleave_order(shuffled, 0)] == [ids[i] for i in order]


def test_shard_columns_put_the_published_ones_first_and_drop_internal_ones():
    table = pa.table({"selected_reason": ["bad"], "_unit": ["u"], "text": ["t"], "model": ["m"], "doc_id": ["d"],
                      "is_bad": [True], "training_text": ["t"], "safety_score": [4]})
    assert shard_columns(table).column_names == ["doc_id", "text", "safety_score", "is_bad", "selected_reason", "model", "training_text"]
    assert list(PUBLISHED_COLUMNS[:2]) == ["doc_id", "text"]


def test_one_unit_of_windows_read_back(tmp_path, tok):
    w = writer(tmp_path, "reflection", seq_length=64)
    texts = [TEXT, "A plain page of text.", "Another plain one."]
    docs = [tok.encode(t) for t in texts]
    table = pa.table({
        "doc_id": ["a", "b", "c"], "text": texts, "token_length": pa.array([len(d) for d in docs], pa.int32()),
        "selected": [True, False, False], "reflection_status": ["ok", None, None], "reflection_1p": ["I pause.", None, None],
        "reflection_token_index": pa.array([3, None, None], pa.int32()), "source_row": pa.array([0, 1, 2], pa.int64()),
    })
    sizes = w.write_windows(table, "u-000000000", compression="zstd")
    inserted = [w.open_id, *tok.encode("I pause."), w.close_id]
    content = [*docs[0][:3], *inserted, *docs[0][3:]]
    assert sizes["reflection-1p"] == {"files": 1, "sequences": 1, "tokens": len(content) + 1, "padding": 65 - len(content) - 1}
    prefix = layout.stream_prefix(tmp_path, "reflection-1p", name="u-000000000")
    window = read_indexed_dataset(prefix)[0]
    assert window.tolist() == [*content, w.eos_id, *[w.pad_id] * (65 - len(content) - 1)]
    mask = read_indexed_dataset(layout.mask_prefix(prefix))[0]
    assert np.flatnonzero(mask).tolist() == list(range(3, 3 + len(inserted)))
    assert np.load(layout.token_lengths_path(prefix)).tolist() == [len(content)]

    packed = [*docs[1], w.eos_id, *docs[2], w.eos_id]
    assert sizes["compact"] == {"files": 1, "sequences": 1, "tokens": len(packed), "padding": 65 - len(packed)}
    compact = read_indexed_dataset(layout.stream_prefix(tmp_path, "compact", name="u-000000000"))[0]
    assert compact.tolist()[: len(packed)] == packed
    side = pq.read_table(layout.sidecar_path(tmp_path, "u-000000000"))
    assert side.column("window").to_pylist() == [0] and side.column("doc_id").to_pylist() == ["a"]
    assert side.column("window_tokens_reflection-1p").to_pylist() == [len(content)]
