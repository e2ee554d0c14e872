"""Checkpoints: atomic files, digests and config fingerprints (what a resume must match, what it
may change), and the durable per-unit state of pass 1, manifests and saved generations."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotator.config import RunConfig, load_config
from annotator.core.checkpoint import (
    OPERATIONAL_FIELDS, WriteScored, cached_generations, clear_unit_scoring, config_differences, content_fingerprint, digest,
    generation_key, load_manifests, output_settings, read_unit_scored, rejected_count, unit_done, unit_scored,
    write_atomically, write_json, write_table,
)
from annotator.core.layout import DONE, REJECTED_DOCUMENTS, SCORED, generated_batch_path
from annotator.core.units import Unit
from tests.support import REPO

DEMO = REPO / "configs" / "demo.yaml"


def demo(*overrides: str) -> RunConfig:
    return load_config(DEMO, overrides=list(overrides))


def test_write_json_is_atomic_and_sorted(tmp_path):
    path = tmp_path / "deep" / "er" / "run.json"
    write_json(path, {"b": [1, 2], "a": {"z": 1, "y": None}})
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.json"]  # no temporary left beside it
    text = path.read_text()
    assert text.endswith("}\n") and text.index('"a"') < text.index('"b"') and text.index('"y"') < text.index('"z"')
    assert json.loads(text) == {"a": {"y": None, "z": 1}, "b": [1, 2]}
    write_json(path, {"c": 3})  # replaces the earlier file whole
    assert json.loads(path.read_text()) == {"c": 3}
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]


def test_a_failed_write_keeps_the_earlier_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text("earlier\n")

    def half_written(tmp):
        tmp.write_text("half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_written)
    assert path.read_text() == "earlier\n"
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]

    def nothing_written(tmp):
        raise RuntimeError("before any byte")

    with pytest.raises(RuntimeError):
        write_atomically(tmp_path / "new.json", nothing_written)
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]


def test_write_table_round_trips_with_the_asked_compression(tmp_path):
    table = pa.table({"doc_id": ["a", "b", "c"], "n": pa.array([1, 2, 3], pa.int32())})
    write_table(tmp_path / "z.parquet", table)
    write_table(tmp_path / "s.parquet", table, compression="snappy")
    for name, codec in (("z.parquet", "ZSTD"), ("s.parquet", "SNAPPY")):
        assert pq.read_table(tmp_path / name).equals(table)
        assert pq.ParquetFile(tmp_path / name).metadata.row_group(0).column(0).compression == codec
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.parquet", "z.parquet"]


def test_digest_is_stable_and_order_sensitive_only_where_order_means_something():
    d = digest({"a": 1, "b": [1, 2]}, "x")
    assert len(d) == 16 and int(d, 16) >= 0
    assert d == digest({"b": [1, 2], "a": 1}, "x")  # mapping order does not matter
    assert d != digest({"a": 1, "b": [2, 1]}, "x")  # list order does
    assert digest(1, 2) != digest(2, 1)
    assert digest(REPO) == digest(str(REPO))  # anything else by its string


def test_config_differences_name_each_changed_leaf():
    old = {"generation": {"temperature": 0.7, "pause": {"snap": "word"}}, "output": {"layout": "windows"}, "gone": 1}
    new = {"generation": {"temperature": 0.2, "pause": {"snap": "token"}}, "output": {"layout": "windows"}, "added": [1]}
    assert config_differences(old, new) == [
        "added: None -> [1]",
        "generation.pause.snap: 'word' -> 'token'",
        "generation.temperature: 0.7 -> 0.2",
        "gone: 1 -> None",
    ]
    assert config_differences(old, old) == []
    assert config_differences({"a": {"b": 1}}, {"a": 5}) == ["a: {'b': 1} -> 5"]
    assert config_differences({"b": 1}, {"b": 2}, prefix="sec.") == ["sec.b: 1 -> 2"]


def test_operational_fields_are_real_fields_of_their_sections():
    fields = RunConfig.model_fields
    for section, names in OPERATIONAL_FIELDS.items():
        assert section in fields, section
        if names is not None:
            sub = fields[section].annotation.model_fields
            assert names <= set(sub), (section, names - set(sub))


def test_output_settings_ignore_how_fast_a_run_goes_but_not_what_it_writes():
    base = output_settings(demo())
    assert not {"publish", "ray", "audit", "plan", "sft"} & set(base)
    assert not {"path", "overwrite", "keep_work"} & set(base["output"])
    assert base["files"] == content_fingerprint(demo())
    assert base["files"]["prompt_version"] and len(base["files"]["canary_file"]) == 12
    same = output_settings(demo("generation.concurrency=4", "generation.num_gpus=1", "output.path=/elsewhere",
                                "classifier.batch_size=7", "ray.num_cpus=16", "plan.documents=5", "output.keep_work=true"))
    assert same == base
    for changed in ("generation.temperature=0.2", "generation.batch_size=8", "output.seq_length=4096", "selection.seed=3"):
        assert output_settings(demo(changed)) != base, changed


def test_canary_file_content_is_part_of_the_fingerprint(tmp_path):
    canaries = tmp_path / "canaries.yaml"
    canaries.write_text("canaries: []\n")
    first = output_settings(demo(f"generation.canaries.file={canaries}"))
    canaries.write_text("canaries: [] # edited\n")
    second = output_settings(demo(f"generation.canaries.file={canaries}"))
    assert first["files"]["canary_file"] != second["files"]["canary_file"]
    assert config_differences(first, second) == [
        f"files.canary_file: {first['files']['canary_file']!r} -> {second['files']['canary_file']!r}"]
    assert output_settings(demo("generation.canaries.file=null"))["files"]["canary_file"] is None


def test_generation_key_follows_what_decides_a_generation():
    key = generation_key(demo())
    assert len(key) == 16
    for same in ("generation.concurrency=3", "generation.enabled=false", "output.path=/x", "selection.bad_threshold=4",
                 "generation.enforce_eager=false"):
        assert generation_key(demo(same)) == key, same
    # sampling, the engine batches, and the content a window keeps (pause points) change it
    for other in ("generation.temperature=0.1", "generation.batch_size=16", "output.seq_length=4096",
                  "generation.prompt_pack=reflection-v1"):
        assert generation_key(demo(other)) != key, other


def scored_batch(unit: str, rows: list[tuple[int, str, str | None]]) -> pa.Table:
    """What pass 1 hands WriteScored: (source_row, doc_id, reject_reason) per row of one unit."""
    return pa.table({
        "_unit": [unit] * len(rows), "doc_id": [d for _, d, _ in rows], "text": [f"text of {d}" for _, d, _ in rows],
        "source_file": ["in.parquet"] * len(rows), "source_row": pa.array([r for r, _, _ in rows], pa.int64()),
        "reject_reason": pa.array([why for _, _, why in rows], pa.string()),
        "text_preview": [f"text of {d}"[:5] for _, d, _ in rows],
    })


def test_write_scored_records_a_unit_as_complete_by_file_names(tmp_path):
    a = Unit(key="in-aaaa-000000000", path="in.parquet", row_groups=(0,), row_start=0, rows=5)
    b = Unit(key="in-aaaa-000000005", path="in.parquet", row_groups=(1,), row_start=5, rows=2)
    batch = pa.concat_tables([
        scored_batch(a.key, [(3, "d3", None), (0, "d0", None), (1, "d1", "empty_text"), (4, "d4", "too_long:9_chars"), (2, "d2", None)]),
        scored_batch(b.key, [(5, "d5", "null_text"), (6, "d6", "null_text")]),
    ])
    counts = WriteScored(out_dir=str(tmp_path)).process(batch)
    assert counts.to_pylist() == [{"unit": a.key, "scored": 3, "rejected": 2}, {"unit": b.key, "scored": 0, "rejected": 2}]
    assert sorted(p.name for p in (tmp_path / SCORED / a.key).iterdir()) == ["000000000-3.parquet"]
    assert sorted(p.name for p in (tmp_path / SCORED / b.key).iterdir()) == ["000000005-0.parquet"]  # written even empty
    assert rejected_count(tmp_path, a) == 2 and rejected_count(tmp_path, b) == 2
    assert unit_scored(tmp_path, a) and unit_scored(tmp_path, b)

    rejects = pq.read_table(tmp_path / REJECTED_DOCUMENTS / f"{a.key}-000000000-2.parquet")
    assert rejects.column_names == ["doc_id", "source_file", "source_row", "reason", "text_preview"]
    assert sorted(zip(rejects.column("doc_id").to_pylist(), rejects.column("reason").to_pylist())) == [
        ("d1", "empty_text"), ("d4", "too_long:9_chars")]

    kept = read_unit_scored(tmp_path, a)
    assert kept.column("doc_id").to_pylist() == ["d0", "d2", "d3"]  # input order, whatever the batch order
    assert "reject_reason" not in kept.column_names and "text_preview" not in kept.column_names
    assert read_unit_scored(tmp_path, a, columns=["doc_id"]).column_names == ["doc_id", "source_row"]
    assert read_unit_scored(tmp_path, b).num_rows == 0

    clear_unit_scoring(tmp_path, a)
    assert not unit_scored(tmp_path, a) and rejected_count(tmp_path, a) == 0
    assert unit_scored(tmp_path, b)  # the other unit's state is untouched
    assert read_unit_scored(tmp_path, a).num_rows == 0


def test_a_unit_missing_rows_is_not_scored(tmp_path):
    unit = Unit(key="in-bbbb-000000000", path="in.parquet", row_groups=(0,), row_start=0, rows=3)
    WriteScored(out_dir=str(tmp_path)).process(scored_batch(unit.key, [(0, "d0", None), (1, "d1", "empty_text")]))
    assert not unit_scored(tmp_path, unit)


def test_manifests_mark_units_done_in_name_order(tmp_path):
    units = [Unit(key=f"u-{i:09d}", path="in.parquet", row_groups=(i,), row_start=i, rows=1) for i in range(3)]
    assert load_manifests(tmp_path) == [] and not unit_done(tmp_path, units[0])
    for u in (units[2], units[0]):
        write_json(tmp_path / DONE / f"{u.key}.json", {"unit": u.key, "rows": 1})
    assert [unit_done(tmp_path, u) for u in units] == [True, False, True]
    assert [m["unit"] for m in load_manifests(tmp_path)] == [units[0].key, units[2].key]


def test_cached_generations_keep_only_this_generation_key(tmp_path):
    assert cached_generations(tmp_path, "u", key="k1") is None
    for index, (keys, ids) in enumerate([(["k1", "k0"], ["a", "b"]), (["k1"], ["c"])]):
        write_table(generated_batch_path(tmp_path, "u", index=index), pa.table({"doc_id": ids, "generation_key": keys}))
    write_table(generated_batch_path(tmp_path, "u", index=0, pass_name="summary"),
                pa.table({"doc_id": ["z"], "generation_key": ["k1"]}))
    assert cached_generations(tmp_path, "u", key="k1").column("doc_id").to_pylist() == ["a", "c"]
    assert cached_generations(tmp_path, "u", key="k0").column("doc_id").to_pylist() == ["b"]
    assert cached_generations(tmp_path, "u", key="k9").num_rows == 0
    assert cached_generations(tmp_path, "u", key="k1", pass_name="summary").column("doc_id").to_pylist() == ["z"]
    assert cached_generations(tmp_path, "other", key="k1") is None
