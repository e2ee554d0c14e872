"""Checkpoints: atomic files, digests and config fingerprints (what a resume must match, what it
may change), and unit manifests (the scored store and saved generations: tests/score, tests/generate)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotator.config import RunConfig, load_config
from annotator.core.checkpoint import (
    OPERATIONAL_FIELDS, as_recorded, config_differences, content_fingerprint, digest, load_manifests, output_settings, unit_done, write_atomically,
    write_json, write_table,
)
from annotator.core.layout import DONE
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
    assert {k: v for k, v in base["files"].items() if k != "classifier"} == content_fingerprint(demo())
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


def test_every_recipes_pack_and_the_classifier_files_are_fingerprinted(tmp_path):
    """The fingerprint is the method: each recipe's pack by content (not only the first's), the
    classifier's model file with its calibration beside it; a Hub id is named."""
    import shutil

    from annotator.method.prompt_packs import load_pack, resolve_pack_path

    pack = shutil.copytree(resolve_pack_path("summary-v1"), tmp_path / "summary")
    model = tmp_path / "scorer.ftz"
    shutil.copyfile(REPO / "classifiers" / "models" / "safety-fasttext-v2.ftz", model)
    cfg = demo("generation.recipes=[reflection, summary]", f"generation.packs={{summary: '{pack}'}}", f"classifier.model={model}")
    files = output_settings(cfg)["files"]
    assert files["prompt_versions"] == {"reflection": load_pack("reflection-v2").version, "summary": load_pack(str(pack)).version}
    assert files["prompt_version"] == files["prompt_versions"]["reflection"]
    assert files["classifier"] == {"model": files["classifier"]["model"]} and len(files["classifier"]["model"]) == 16
    # the default: v3 and its precision stage after it, each with its calibration; null turns the stage off
    default = output_settings(demo())["files"]["classifier"]
    assert set(default) == {"model", "precision"} and "+" in default["precision"]
    assert set(output_settings(demo("classifier.precision.model=null"))["files"]["classifier"]) == {"model"}
    load_pack.cache_clear()   # packs are cached per process by their path; a new process reads the edit
    (pack / "system.md").write_text((pack / "system.md").read_text() + "\nedited\n")
    edited = output_settings(cfg)["files"]
    assert edited["prompt_versions"]["summary"] != files["prompt_versions"]["summary"]
    assert edited["prompt_versions"]["reflection"] == files["prompt_versions"]["reflection"]
    model.write_bytes(model.read_bytes() + b"\0")
    assert output_settings(cfg)["files"]["classifier"]["model"] != files["classifier"]["model"]
    calibrated = output_settings(demo())["files"]["classifier"]["model"]   # the shipped v3 model and its calibration file
    assert "+" in calibrated
    hub = output_settings(demo("classifier.backend=transformers", "classifier.model=locuslab/safety-classifier_gte-large-en-v1.5"))
    assert hub["files"]["classifier"] == {"model": "hub:locuslab/safety-classifier_gte-large-en-v1.5"}


def test_a_run_recorded_before_a_fingerprint_existed_is_compared_on_what_it_recorded():
    current = {"output_settings": {"files": {"prompt_version": "p@1", "prompt_versions": {"reflection": "p@1"}, "classifier": {}}},
               "plan": {}}
    old = {"output_settings": {"files": {"prompt_version": "p@1"}}, "plan": {}}
    assert as_recorded(current, old)["output_settings"]["files"] == {"prompt_version": "p@1"}
    assert as_recorded(current, current) == current


def test_manifests_mark_units_done_in_name_order(tmp_path):
    units = [Unit(key=f"u-{i:09d}", path="in.parquet", row_groups=(i,), row_start=i, rows=1) for i in range(3)]
    assert load_manifests(tmp_path) == [] and not unit_done(tmp_path, units[0])
    for u in (units[2], units[0]):
        write_json(tmp_path / DONE / f"{u.key}.json", {"unit": u.key, "rows": 1})
    assert [unit_done(tmp_path, u) for u in units] == [True, False, True]
    assert [m["unit"] for m in load_manifests(tmp_path)] == [units[0].key, units[2].key]
