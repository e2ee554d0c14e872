"""The end-of-run summary: every figure of a hand-built stats dict on its line, optional lines
where the run has them, and the sample reflection taken from the first shard that holds one."""

from __future__ import annotations

import pyarrow as pa

from annotator.core import layout
from annotator.core.checkpoint import write_table
from annotator.output.summary import format_summary, sample_reflection


def base_stats() -> dict:
    return {
        "shards": ["u-0000", "u-0001"],
        "documents_in": 10, "documents_out": 9, "tokens_in": 12345,
        "score_histogram": {"3": 2, "0": 5, "1": 2},
        "selected_documents": 4, "selected_tokens": 400, "selected_by_reason": {"bad": 2, "matched_sample": 2},
        "reflection_status": {"ok": 3, "failed:checks=third_person": 1, "failed:parse": 2},
        "generation_tokens": {"output": 300},
        "generation_throughput": {"output_tokens_per_second": 12.5, "prefix_cache_hit_rate": 0.75},
        "wall_seconds": {"total": 42.0},
        "documents_per_second": {"end_to_end": 0.24},
    }


def shard(out, name: str, rows: list[tuple[str, int, str, str | None, str]]) -> None:
    """A text shard with the columns the summary reads: (doc_id, score, reason, reflection, status)."""
    write_table(layout.text_shard(out, name), pa.table({
        "doc_id": [r[0] for r in rows], "safety_score": pa.array([r[1] for r in rows], pa.int8()),
        "selected_reason": [r[2] for r in rows], "reflection_1p": pa.array([r[3] for r in rows], pa.string()),
        "reflection_status": pa.array([r[4] for r in rows], pa.string()), "text": ["t"] * len(rows),
    }))


def test_summary_of_a_plain_run(tmp_path):
    text = format_summary(base_stats(), output=str(tmp_path))
    out = tmp_path.resolve()
    assert text.splitlines() == [
        f"output:      {out / layout.TEXT_DIR} (2 shards), stats: {out / 'stats.json'}",
        "documents:   10 in, 9 out, 12345 tokens",
        "safety:      score histogram {'0': 5, '1': 2, '3': 2}",
        "selected:    4 documents, 400 tokens, by reason {'bad': 2, 'matched_sample': 2}",
        "reflections: 3 written, 3 failed {'failed:checks=third_person': 1, 'failed:parse': 2}",
        "generation:  300 output tokens, 12.5 tokens/s per replica, prefix-cache hit rate 0.75",
        "time:        42.0s wall; documents/s {'end_to_end': 0.24}",
    ]


def test_no_failures_leave_no_trailing_dict(tmp_path):
    stats = {**base_stats(), "reflection_status": {}}
    line = format_summary(stats, output=str(tmp_path)).splitlines()[4]
    assert line == "reflections: 0 written, 0 failed"


def test_optional_lines_go_in_their_places(tmp_path):
    stats = {
        **base_stats(),
        "reply_checks": {"checks": {"first_person": {"pass_rate": 0.9}, "citations": {"pass_rate": 1.0}}},
        "reflection_tokens_per_reflection": {"generated": 80.5, "kept": 70.25},
        "tokenized": {"streams": {"reflection-1p": {"sequences": 1234, "tokens": 2_531_000}, "compact": {"sequences": 5, "tokens": 10245}}},
        "annotation_status": {"ok": 4, "failed:parse": 1},
    }
    lines = format_summary(stats, output=str(tmp_path)).splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "output", "documents", "safety", "selected", "reflections", "annotations", "checks", "generation", "streams", "time"]
    assert lines[5] == "annotations: {'ok': 4, 'failed:parse': 1}"
    assert lines[6] == ("checks:      pass rate per parsed reply first_person 0.9, citations 1.0; "
                        "tokens per reflection generated 80.5 / kept 70.25")
    assert lines[8] == "streams:     reflection-1p 1,234 windows, 2,531,000 tokens; compact 5 windows, 10,245 tokens"


def test_annotation_line_only_when_annotations_ran(tmp_path):
    def labels(annotations):
        return [line.split(":")[0] for line in format_summary({**base_stats(), "annotation_status": annotations},
                                                              output=str(tmp_path)).splitlines()]

    assert "annotations" not in labels({})
    assert "annotations" not in labels({"ok": 0})
    assert "annotations" in labels({"failed:parse": 3})  # all failed is still worth saying


def test_the_sample_is_the_first_ok_reflection_in_shard_order(tmp_path):
    assert sample_reflection(str(tmp_path)) is None
    shard(tmp_path, "u-0000", [("a", 0, "not_selected", None, "not_selected"), ("b", 4, "bad", None, "failed:parse")])
    assert sample_reflection(str(tmp_path)) is None
    shard(tmp_path, "u-0001", [("c", 1, "matched_sample", "I note calm.", "ok"), ("d", 5, "bad", "I see harm.", "ok")])
    shard(tmp_path, "v-0000", [("e", 5, "bad", "A later shard.", "ok")])
    assert sample_reflection(str(tmp_path)) == {"doc_id": "c", "safety_score": 1, "selected_reason": "matched_sample",
                                                "reflection_1p": "I note calm.", "reflection_status": "ok"}
    lines = format_summary(base_stats(), output=str(tmp_path)).splitlines()
    assert lines[-1] == "sample:      [c, score 1, matched_sample] I note calm."
