"""Recipes as files: the built-in ones are YAML files shipped with the package, a user's recipe is
a YAML file given by path, and what cannot work is refused at start naming the file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from annotator.config import ConfigError, load_config
from annotator.method.recipes import RecipeError, builtin_recipes, load_recipe, recipe_columns, stream_name
from annotator.method.resolved import resolve_run
from tests.support import REPO

EXAMPLE = REPO / "examples" / "recipes" / "normative_note.yaml"
EXAMPLE_PACK = EXAMPLE.parent / "normative_note_pack"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def recipe_text(name: str = "note", **changes) -> str:
    keys = {"name": name, "pack": str(EXAMPLE_PACK), "applies_to": "bad", "placement": "pause", **changes}
    return "".join(f"{k}: {v}\n" for k, v in keys.items() if v is not None)


def test_builtin_recipes_are_files_in_the_package():
    names = builtin_recipes()
    assert names == sorted(["annotations", "preflection", "reflection", "reflection_end", "refusal_reflection", "rephrase", "summary"])
    for name in names:
        recipe = load_recipe(name)
        assert recipe.builtin and Path(recipe.source).name == f"{name}.yaml" and recipe.version.startswith(f"{name}@")
    assert load_recipe("reflection").column("analysis") == "reflection_analysis"  # the published names, from its file
    assert load_recipe("annotations").column("attempts") == "annotation_attempts"


def test_the_example_recipe_runs_beside_the_builtin_ones():
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides=[f"generation.recipes=[reflection, {EXAMPLE}]"])
    assert cfg.generation.recipes == ["reflection", str(EXAMPLE)]  # a file is recorded by its absolute path
    run = resolve_run(cfg.generation, voices=["1p", "3p"])
    note, pack = run.recipes[1], run.packs["normative_note"]
    assert (note.name, note.applies_to, note.placement, note.voices, note.max_output_tokens) == ("normative_note", "bad", "pause", ("1p",), 200)
    assert not note.builtin and pack.name == "normative-note-v1" and pack.constitution.ordered_ids() == ["1.1", "1.2", "2.1", "2.2", "3.1"]
    cols = recipe_columns(note, pack)
    assert "normative_note_reasoning" in cols and "normative_note_1p" in cols and "normative_note_analysis" not in cols
    assert [s.stream for s in run.streams] == ["reflection-1p", "reflection-3p", "normative_note-1p"]
    assert stream_name(note, "reflection_1p") == "normative_note-1p"
    # {language}: the document's language by name, in the user message only.
    user = pack.messages("Der Text.", language="German")[1]["content"]
    assert "The page is written in German." in user and "the note in German" in user and "Der Text." in user
    assert "{language}" not in pack.system_prompt()


@pytest.mark.parametrize("changes, line, message", [
    ({"colour": "blue"}, 5, "unknown key 'colour'"),
    ({"placement": "middle"}, 4, "unknown placement 'middle' (known: pause, end, before, prefix, replace)"),
    ({"applies_to": "good"}, 3, "applies_to must be one of selected, bad, all"),
    ({"name": "Note-1"}, 1, "name 'Note-1' must be lowercase"),
    ({"voices": "[2p]"}, 5, "voices must be a non-empty list"),
])
def test_a_recipe_file_with_a_wrong_key_is_refused_naming_file_and_line(tmp_path, changes, line, message):
    path = write(tmp_path, "bad", recipe_text(**changes))
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    assert str(err.value).startswith(f"{path}:{line}: ") and message in str(err.value)
    with pytest.raises(ConfigError, match=f"{path}:{line}: "):  # at config load: before anything starts
        load_config(REPO / "configs" / "demo.yaml", overrides=[f"generation.recipes=[reflection, {path}]"])


@pytest.mark.parametrize("changes, key, message", [
    ({"placement": "prefix"}, "placement", "placement 'prefix' places a tags reply, but pack normative-note-v1"),
    ({"placement": "replace"}, "placement", "placement 'replace' places a text reply"),
    ({"voices": "[3p]"}, "voices", "pack normative-note-v1"),
    ({"canaries": "true"}, None, None),  # the pack has a voice field: allowed
    ({"columns": "{shout: loud}"}, "columns", "columns: 'shout' is neither a field of pack normative-note-v1"),
])
def test_a_pack_the_placement_cannot_use_is_refused_at_start(tmp_path, changes, key, message):
    path = write(tmp_path, "mismatch", recipe_text(**changes))
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides=[f"generation.recipes=[reflection, {path}]"])
    if message is None:
        resolve_run(cfg.generation, voices=["1p"])
        return
    line = path.read_text().splitlines().index(next(x for x in path.read_text().splitlines() if x.startswith(f"{key}:"))) + 1
    with pytest.raises(RecipeError) as err:
        resolve_run(cfg.generation, voices=["1p"])
    assert str(err.value).startswith(f"{path}:{line}: ") and message in str(err.value)


def test_a_column_clash_names_both_files(tmp_path):
    first = write(tmp_path, "first", recipe_text("note_a", columns="{analysis: shared_reasoning}"))
    second = write(tmp_path, "second", recipe_text("note_b", columns="{analysis: shared_reasoning}"))
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides=[f"generation.recipes=[reflection, {first}, {second}]"])
    with pytest.raises(RecipeError) as err:
        resolve_run(cfg.generation, voices=["1p"])
    assert f"{second}:5: column 'shared_reasoning' is also written by recipe note_a ({first}:5)" in str(err.value)
    core = write(tmp_path, "core", recipe_text("note_c", columns="{analysis: training_text}"))
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides=[f"generation.recipes=[{core}]"])
    with pytest.raises(RecipeError, match="column 'training_text' is one of the shards' own columns"):
        resolve_run(cfg.generation, voices=["1p"])
    # A file that names itself like a built-in recipe it runs beside.
    same = write(tmp_path, "same", recipe_text("reflection"))
    with pytest.raises(ConfigError, match="recipes must have distinct names"):
        load_config(REPO / "configs" / "demo.yaml", overrides=[f"generation.recipes=[reflection, {same}]"])
