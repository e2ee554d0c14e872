"""Where a run may write: never into its input, a fresh run or a resume of the same config, an
overwrite only of this tool's own output (a plan kept); the plan's calibration slice; and what
`--add-recipe` reads back from a finished run's run.json and refuses."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotator.config import RunConfig, load_config
from annotator.core import layout
from annotator.core.checkpoint import write_json
from annotator.core.storage import location, temp_path
from annotator.core.errors import OutputDirError
from annotator.core.units import InputPlan, RejectedFile, Unit
from annotator.run.add_recipe import AddRecipeError, comparable, plan_added, recorded_config
from annotator.run.pipeline import check_output_location, open_output
from annotator.run.plan import calibration_slice
from tests.support import REPO

DEMO = REPO / "configs" / "demo.yaml"


def config(tmp_path, *overrides: str) -> RunConfig:
    return load_config(DEMO, overrides=[f"input.paths=[{tmp_path / 'in'}/*.parquet]", f"output.path={tmp_path / 'out'}",
                                        "output.overwrite=false", *overrides])


def input_plan(tmp_path, rows: int = 10) -> InputPlan:
    path = str(tmp_path / "in" / "a.parquet")
    return InputPlan(units=[Unit(key="a-1234abcd-000000000", path=path, row_groups=(0, 1), row_start=0, rows=rows)],
                     rejected_files=[RejectedFile(path=str(tmp_path / "in" / "bad.parquet"), reason="no text column")])


def test_never_into_the_input(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    cfg = config(tmp_path)
    files = [str(tmp_path / "in" / "a.parquet")]
    check_output_location((tmp_path / "out").resolve(), cfg, files=files)  # a sibling is fine
    for inside in (tmp_path / "in", tmp_path / "in" / "sub" / "out"):
        with pytest.raises(OutputDirError, match="is inside the input directory .*refusing to write into the input"):
            check_output_location(inside.resolve(), cfg, files=files)
    # An input file listed anywhere below the output (here: a file input, no directory glob).
    file_cfg = load_config(DEMO, overrides=[f"input.paths=[{tmp_path / 'data' / 'x' / 'f.parquet'}]", f"output.path={tmp_path / 'data'}"])
    with pytest.raises(OutputDirError, match="contains the input file .*f.parquet"):
        check_output_location((tmp_path / "data").resolve(), file_cfg, files=[str(tmp_path / "data" / "x" / "f.parquet")])
    # URLs are not local directories.
    url_cfg = load_config(DEMO, overrides=["input.paths=['hf://datasets/x/y/*.parquet']", f"output.path={tmp_path / 'o'}"])
    check_output_location((tmp_path / "o").resolve(), url_cfg, files=["hf://datasets/x/y/a.parquet"])
    # On object storage: an output prefix that holds the input, or lies inside the input's folder, is refused.
    s3_cfg = load_config(DEMO, overrides=["input.paths=['s3://data/corpus/*.parquet']", "output.path=s3://data/out"])
    check_output_location(location("s3://data/out"), s3_cfg, files=["s3://data/corpus/a.parquet"])   # a sibling prefix is fine
    for out in ("s3://data/corpus/out", "s3://data/corpus", "s3://data"):
        with pytest.raises(OutputDirError, match=r"and the input .* overlap; refusing to write into the input"):
            check_output_location(location(out), s3_cfg, files=["s3://data/corpus/a.parquet"])


def test_a_fresh_run_records_its_settings_and_a_rerun_resumes(tmp_path):
    cfg, plan = config(tmp_path), input_plan(tmp_path)
    out = tmp_path / "out"
    assert open_output(out, cfg, plan=plan) is False
    record = json.loads((out / layout.RUN_FILE).read_text())
    assert record["plan"] == json.loads(json.dumps(plan.to_json()))
    assert record["config"] == cfg.model_dump(mode="json")
    assert "spp-annotator" in record["versions"] and record["output_settings"]["generation"]["temperature"] == 0.7
    (out / "shards").mkdir()
    # Same config (operational settings may change): a resume that touches nothing.
    assert open_output(out, config(tmp_path, "generation.concurrency=3"), plan=plan) is True
    assert (out / "shards").is_dir() and json.loads((out / layout.RUN_FILE).read_text()) == record


def test_a_different_run_in_the_way_is_named_not_replaced(tmp_path):
    plan = input_plan(tmp_path)
    out = tmp_path / "out"
    open_output(out, config(tmp_path), plan=plan)
    with pytest.raises(OutputDirError, match=r"holds a run with a different config \(generation\.temperature: 0\.7 -> 0\.2\); use --overwrite"):
        open_output(out, config(tmp_path, "generation.temperature=0.2"), plan=plan)
    with pytest.raises(OutputDirError, match=r"the input \(files, row groups or limit\) changed"):
        open_output(out, config(tmp_path), plan=input_plan(tmp_path, rows=11))
    assert json.loads((out / layout.RUN_FILE).read_text())["output_settings"]["generation"]["temperature"] == 0.7


def test_overwrite_replaces_only_this_tools_output_and_keeps_the_plan(tmp_path):
    plan = input_plan(tmp_path)
    out = tmp_path / "out"
    open_output(out, config(tmp_path), plan=plan)
    (out / "shards").mkdir()
    (out / "shards" / "a-0000.parquet").write_bytes(b"old shard")
    (out / layout.PLAN_FILE).write_text('{"key": "k"}')
    (out / "notes.md").write_text("the user's own file, beside the run")
    assert open_output(out, config(tmp_path, "generation.temperature=0.2", "output.overwrite=true"), plan=plan) is False
    assert sorted(p.name for p in out.iterdir()) == ["notes.md", layout.PLAN_FILE, layout.RUN_FILE]
    assert (out / layout.PLAN_FILE).read_text() == '{"key": "k"}'
    assert json.loads((out / layout.RUN_FILE).read_text())["output_settings"]["generation"]["temperature"] == 0.2
    # overwrite also restarts a run of the same config from nothing
    (out / "shards").mkdir()
    assert open_output(out, config(tmp_path, "generation.temperature=0.2", "output.overwrite=true"), plan=plan) is False
    assert not (out / "shards").exists()


def test_a_folder_of_someone_elses_files_is_never_deleted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(OutputDirError, match="is not empty; set output.overwrite=true to replace it"):
        open_output(out, config(tmp_path), plan=input_plan(tmp_path))
    with pytest.raises(OutputDirError, match=r"holds no run of this tool \(run\.json\); --overwrite replaces only"):
        open_output(out, config(tmp_path, "output.overwrite=true"), plan=input_plan(tmp_path))
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    # Names this tool also uses are no sign that a folder is this tool's: only its run.json is.
    for name in ("shards", "tokenized", "_work"):
        (out / name).mkdir()
    (out / "stats.json").write_text("{}")
    with pytest.raises(OutputDirError, match="holds no run of this tool"):
        open_output(out, config(tmp_path, "output.overwrite=true"), plan=input_plan(tmp_path))
    (out / "run.json").write_text('{"model": "someone else\'s run record"}')
    for overwrite in ("false", "true"):
        with pytest.raises(OutputDirError, match="holds a run.json this tool did not write; refusing to write or delete anything"):
            open_output(out, config(tmp_path, f"output.overwrite={overwrite}"), plan=input_plan(tmp_path))
    assert sorted(p.name for p in out.iterdir()) == ["_work", "run.json", "shards", "stats.json", "thesis.tex", "tokenized"]


def test_a_folder_holding_only_a_plan_is_a_fresh_start(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / layout.PLAN_FILE).write_text('{"key": "k"}')
    # The lock, and a heartbeat's temporary left by a process killed while writing it, are not content.
    leftover = temp_path(out / layout.LOCK_FILE)
    leftover.write_text("{")
    assert open_output(out, config(tmp_path), plan=input_plan(tmp_path)) is False
    assert sorted(p.name for p in out.iterdir()) == sorted([leftover.name, layout.PLAN_FILE, layout.RUN_FILE])


def test_calibration_slice_is_the_first_selected_documents_in_the_runs_column_names(tmp_path):
    shards = []
    for name, rows in (("u-0000", [("a", True), ("b", False), ("c", True)]), ("u-0001", [("d", True), ("e", True), ("f", True)])):
        path = layout.text_shard(tmp_path / "score", name)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"doc_id": [d for d, _ in rows], "text": [f"text {d}" for d, _ in rows],
                                 "selected": [s for _, s in rows], "safety_score": [0] * len(rows)}), path)
        shards.append(path)
    cfg = config(tmp_path, "input.text_column=body", "input.id_column=null")
    dest = tmp_path / "calibration" / "slice.parquet"
    assert calibration_slice(shards, n=4, cfg=cfg, dest=dest) == 4
    table = pq.read_table(dest)
    assert table.column_names == ["id", "body"]
    assert table.to_pylist() == [{"id": d, "body": f"text {d}"} for d in ("a", "c", "d", "e")]
    assert calibration_slice(shards, n=100, cfg=config(tmp_path), dest=dest) == 5
    assert pq.read_table(dest).column_names == ["id", "text"]
    assert calibration_slice([], n=3, cfg=config(tmp_path), dest=dest) == 0 and pq.read_table(dest).num_rows == 0


def finished_run(tmp_path, *overrides: str):
    """A finished run's run.json (as `open_output` writes it) and its one unit's manifest."""
    cfg, plan = config(tmp_path, *overrides), input_plan(tmp_path)
    out = tmp_path / "out"
    open_output(out, cfg, plan=plan)
    write_json(out / layout.DONE / f"{plan.units[0].key}.json", {"unit": plan.units[0].key, "rows": 10, "stats": {}})
    return out.resolve(), cfg, plan


def test_add_recipe_reads_the_recorded_config_and_plan(tmp_path):
    with pytest.raises(AddRecipeError, match="holds no run of this tool"):
        recorded_config(tmp_path)
    write_json(tmp_path / layout.RUN_FILE, {"plan": {"units": []}})
    with pytest.raises(AddRecipeError, match="predates recorded configs"):
        recorded_config(tmp_path)
    out, cfg, plan = finished_run(tmp_path)
    record, recorded, read_plan = recorded_config(out)
    assert recorded == cfg
    assert read_plan.units == plan.units and read_plan.rejected_files == plan.rejected_files
    assert record["plan"]["units"][0]["row_groups"] == [0, 1]


def test_added_recipes_keep_the_runs_recipes_and_packs(tmp_path):
    out, cfg, _ = finished_run(tmp_path)
    given = config(tmp_path, "generation.temperature=0.3", "generation.prompt_pack=reflection-v1", "output.path=/elsewhere")
    assert comparable(given) == comparable(cfg)  # where it is written is no difference
    new, plan, recipes = plan_added(out, ["summary"], given=given)
    assert new.generation.recipes == ["reflection", "summary"] and [r.name for r in recipes] == ["summary"]
    assert new.generation.prompt_pack == cfg.generation.prompt_pack  # the run's own pack, as it was written
    assert new.generation.temperature == 0.3  # the given engine settings serve the new recipe
    assert new.output.path == str(out)
    assert plan_added(out, ["summary"], given=None)[0].generation.temperature == cfg.generation.temperature


def test_added_recipes_that_do_not_fit_are_refused_by_reason(tmp_path):
    out, _, plan = finished_run(tmp_path)
    refusals = {
        "the config differs from the run .* selection.bad_threshold: 2 -> 4": (["summary"], config(tmp_path, "selection.bad_threshold=4")),
        r"\['reflection'\] already in the run's recipes": (["reflection"], None),
        # annotations settings must match the run's, so apply_to=all is refused as a difference here ...
        r"generation.annotations.apply_to: 'selected' -> 'all'": (["annotations"], config(tmp_path, "generation.annotations.apply_to=all")),
    }
    for message, (names, given) in refusals.items():
        with pytest.raises(AddRecipeError, match=message):
            plan_added(out, names, given=given)
    (out / layout.DONE / f"{plan.units[0].key}.json").unlink()
    with pytest.raises(AddRecipeError, match=r"is not finished \(1 units without a manifest\)"):
        plan_added(out, ["summary"], given=None)


def test_annotations_over_every_document_cannot_be_added(tmp_path):
    # ... and a run recorded with apply_to=all cannot take the annotations recipe over its windows.
    out, _, _ = finished_run(tmp_path, "generation.annotations.apply_to=all")
    with pytest.raises(AddRecipeError, match=r"\['annotations'\] would annotate documents outside the windows"):
        plan_added(out, ["annotations"], given=None)
    assert plan_added(out, ["summary"], given=None)[0].generation.recipes == ["reflection", "summary"]


@pytest.mark.parametrize("override,message", [("output.layout=documents", "was written with output.layout=documents"),
                                              ("generation.enabled=false", "is a score-and-select run")])
def test_runs_without_windows_take_no_added_recipe(tmp_path, override, message):
    out, _, _ = finished_run(tmp_path, override)
    with pytest.raises(AddRecipeError, match=message):
        plan_added(out, ["summary"], given=None)


def test_an_output_inside_the_directory_of_a_glob_input_is_refused(tmp_path):
    """`in/part-*.parquet` names the directory `in`: an output below it would write into the input."""
    (tmp_path / "in").mkdir()
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides=[f"input.paths=['{tmp_path}/in/part-*.parquet']"])
    with pytest.raises(OutputDirError, match="inside the input directory"):
        check_output_location(tmp_path / "in" / "out", cfg, files=[])
    check_output_location(tmp_path / "out", cfg, files=[])  # beside the input is fine
