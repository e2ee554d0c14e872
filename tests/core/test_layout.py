"""The output layout: the path every kind of output gets, the globs that find a unit's files (and
only its own), what counts as this tool's output, and the types of the errors a run reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from annotator.core import layout
from annotator.core.errors import OutputDirError, ResourceError, RunError

UNIT, OTHER = "in-1a2b3c4d-000000000", "in-1a2b3c4d-000010000"


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_paths_of_every_output_kind(tmp_path):
    out = tmp_path
    assert layout.text_shard(out, f"{UNIT}-0003") == out / "shards" / f"{UNIT}-0003.parquet"
    prefix = layout.stream_prefix(out, "reflection-1p", name=UNIT)
    assert prefix == out / "tokenized" / "reflection-1p" / UNIT
    assert layout.mask_prefix(prefix) == out / "tokenized" / "reflection-1p" / f"{UNIT}_reflection_mask"
    assert layout.token_lengths_path(prefix) == out / "tokenized" / "reflection-1p" / f"{UNIT}.token_lengths.npy"
    assert layout.sidecar_path(out, UNIT) == out / "tokenized" / "sidecar" / f"{UNIT}.parquet"
    assert layout.safety_annotations_path(out, UNIT) == out / "safety_annotations" / f"{UNIT}.parquet"
    assert layout.sft_dataset_file(out, layout.SFT_PAIRED) == out / "data" / "paired" / "train-00000-of-00001.parquet"
    assert layout.generated_dir(out) == out / "_work" / "generated"
    assert layout.generated_dir(out, "summary+preflection") == out / "_work" / "generated-summary+preflection"
    assert layout.generated_batch_path(out, UNIT, index=7) == out / "_work" / "generated" / UNIT / "000007.parquet"
    assert layout.generated_batch_path(out, UNIT, index=12, pass_name="summary") == \
        out / "_work" / "generated-summary" / UNIT / "000012.parquet"
    # Path helpers take a str as well as a Path.
    assert layout.text_shard(str(out), "x") == layout.text_shard(out, "x")
    assert layout.sidecar_path(str(out), UNIT) == layout.sidecar_path(out, UNIT)


def test_every_output_lives_under_a_name_this_tool_owns():
    tops = {Path(p).parts[0] for p in (layout.SCORED, layout.GENERATED, layout.DONE, layout.SELECTION, layout.REJECTED_DOCUMENTS,
                                       layout.REJECTED_DUPLICATES, layout.REJECTED_GENERATIONS, layout.REJECTED_FILES,
                                       layout.TEXT_DIR, layout.TOKENS_DIR, layout.RUN_FILE, layout.STATS_FILE, layout.REPORT_FILE,
                                       layout.PLAN_FILE, layout.PLAN_WORK, layout.SAFETY_DIR)}
    assert tops <= set(layout.RUN_OUTPUTS) | set(layout.KEPT_ON_OVERWRITE)
    assert not set(layout.KEPT_ON_OVERWRITE) & set(layout.RUN_OUTPUTS)   # --overwrite keeps plan.json
    assert {layout.TOKENIZER_DIR, layout.AUDIT_DIR} <= set(layout.RUN_OUTPUTS)
    sft = {Path(p).parts[0] for p in (layout.SFT_PROMPTS, layout.SFT_DATA_DIR, layout.SFT_FAILURES, layout.RUN_FILE, layout.STATS_FILE)}
    assert sft <= set(layout.SFT_OUTPUTS)


def test_listings_find_shards_streams_and_sidecars_in_name_order(tmp_path):
    assert layout.text_shards(tmp_path) == [] and layout.stream_names(tmp_path) == [] and layout.sidecars(tmp_path) == []
    for name in (f"{OTHER}-0000", f"{UNIT}-0001", f"{UNIT}-0000"):
        touch(layout.text_shard(tmp_path, name))
    touch(tmp_path / "shards" / "notes.txt")
    assert [p.name for p in layout.text_shards(tmp_path)] == [f"{UNIT}-0000.parquet", f"{UNIT}-0001.parquet", f"{OTHER}-0000.parquet"]

    for stream in ("reflection-1p", "compact"):
        for unit in (OTHER, UNIT):
            prefix = layout.stream_prefix(tmp_path, stream, name=unit)
            for p in (prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")):
                touch(p)
            mask = layout.mask_prefix(prefix)
            touch(mask.with_name(mask.name + ".idx"))
    touch(layout.sidecar_path(tmp_path, UNIT))
    touch(tmp_path / "tokenized" / "metadata.json")
    assert layout.stream_names(tmp_path) == ["compact", "reflection-1p"]  # sidecar is not a stream, files are not either
    assert layout.stream_prefixes(tmp_path, "reflection-1p") == [
        layout.stream_prefix(tmp_path, "reflection-1p", name=UNIT), layout.stream_prefix(tmp_path, "reflection-1p", name=OTHER)]
    assert layout.sidecars(tmp_path) == [layout.sidecar_path(tmp_path, UNIT)]


def test_unit_outputs_are_the_units_own_files_only(tmp_path):
    mine = [
        layout.text_shard(tmp_path, f"{UNIT}-0000"), layout.text_shard(tmp_path, f"{UNIT}-0001"),
        tmp_path / "tokenized" / "reflection-1p" / f"{UNIT}.bin", tmp_path / "tokenized" / "reflection-1p" / f"{UNIT}.idx",
        tmp_path / "tokenized" / "reflection-1p" / f"{UNIT}_reflection_mask.bin",
        tmp_path / "tokenized" / "reflection-1p" / f"{UNIT}.token_lengths.npy",
        tmp_path / "tokenized" / "documents" / f"{UNIT}-0000.bin",
        layout.sidecar_path(tmp_path, UNIT), layout.safety_annotations_path(tmp_path, UNIT),
    ]
    theirs = [
        layout.text_shard(tmp_path, f"{OTHER}-0000"), tmp_path / "tokenized" / "compact" / f"{OTHER}.bin",
        tmp_path / "tokenized" / "metadata.json", tmp_path / "tokenized" / "reflection-1p" / f"{UNIT}0.bin",
        tmp_path / "_work" / "done" / f"{UNIT}.json", layout.safety_annotations_path(tmp_path, OTHER),
        tmp_path / "safety_annotations" / f"{UNIT}0.parquet",
    ]
    for p in mine + theirs:
        touch(p)
    assert layout.unit_outputs(tmp_path, UNIT) == sorted(mine)
    assert layout.unit_outputs(tmp_path / "empty", UNIT) == []


def test_errors_are_the_kinds_their_callers_catch():
    assert issubclass(OutputDirError, ValueError) and not issubclass(OutputDirError, RuntimeError)
    assert issubclass(RunError, RuntimeError) and issubclass(ResourceError, RuntimeError)
    assert not issubclass(RunError, ResourceError) and not issubclass(ResourceError, RunError)
    with pytest.raises(ValueError, match="not empty"):
        raise OutputDirError("output.path '/x' is not empty")
    try:
        raise RunError("documents read 3 != written 2")
    except ValueError:  # a run's broken invariant is never mistaken for a bad setting
        pytest.fail("RunError caught as ValueError")
    except RuntimeError as err:
        assert str(err) == "documents read 3 != written 2"
