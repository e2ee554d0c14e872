"""Recipes: the built-in tracks, their packs, the columns each adds (the main recipe keeps the
published names, the others are prefixed) and the training streams each writes."""

from __future__ import annotations

import pyarrow as pa
import pytest

from annotator.config import ConfigError, GenerationConfig, load_config
from annotator.generate.generator import choose_style
from annotator.method.prompt_packs import load_pack
from annotator.method.recipes import builtin_recipes, load_recipe, placed_fields, recipe_columns, run_recipes, stream_name
from tests.support import REPO

ALL = ["reflection", "reflection_end", "refusal_reflection", "preflection", "summary", "rephrase", "annotations"]


def test_every_builtin_recipe_loads_its_pack():
    assert builtin_recipes() == sorted(ALL)
    for name in ALL:
        recipe = load_recipe(name)
        pack = recipe.load_pack()
        assert pack.version.startswith(pack.name + "@")
        if recipe.canaries:
            assert pack.canary_template is not None, name
        # Reflection-family packs share the v2 constitution; the control tracks have none.
        assert (pack.constitution is not None) == (name in ("reflection", "reflection_end", "refusal_reflection", "preflection")), name


def test_columns_published_for_the_main_recipe_prefixed_for_the_others():
    cols = {name: recipe_columns(load_recipe(name), load_recipe(name).load_pack()) for name in ALL}
    assert {"reflection_1p", "reflection_3p", "reflection_analysis", "citations", "reflection_position", "reflection_token_index",
            "canary_type", "canary_present_1p", "reflection_status", "prompt_version"} <= set(cols["reflection"])
    assert {"reflection_end_1p", "reflection_end_3p", "reflection_end_citations", "reflection_end_position",
            "reflection_end_canary_type", "reflection_end_status"} <= set(cols["reflection_end"])
    assert {"refusal_reflection_1p", "refusal_reflection_canary_present_1p"} <= set(cols["refusal_reflection"])
    assert "refusal_reflection_3p" not in cols["refusal_reflection"]
    assert {"preflection_charter_summary", "preflection_neutral", "preflection_judgemental", "preflection_idealisation",
            "preflection_citations"} <= set(cols["preflection"])
    assert {"summary", "summary_status"} <= set(cols["summary"]) and "summary_citations" not in cols["summary"]
    assert {"rephrase_text", "rephrase_style", "rephrase_status"} <= set(cols["rephrase"])
    assert set(cols["annotations"]) == {"annotations", "annotation_status", "annotation_attempts", "annotation_generated_tokens",
                                        "annotation_prompt_tokens", "annotation_cached_prompt_tokens"}
    names = [c for name in ALL for c in cols[name]]
    assert len(names) == len(set(names))  # no two recipes write the same column
    assert cols["preflection"]["preflection_citations"] == pa.list_(pa.string())


def test_streams_per_placed_field():
    def streams(name, voices=("1p",)):
        recipe = load_recipe(name)
        pack = recipe.load_pack()
        return [stream_name(recipe, f) for f in placed_fields(recipe, pack, voices=list(voices))]

    assert streams("reflection") == ["reflection-1p"]
    assert streams("reflection", ("1p", "3p")) == ["reflection-1p", "reflection-3p"]
    assert streams("reflection_end", ("3p",)) == ["reflection_end-3p"]
    assert streams("refusal_reflection", ("3p",)) == ["refusal_reflection-1p"]  # its only voice
    assert streams("preflection") == ["preflection-charter_summary", "preflection-neutral", "preflection-judgemental",
                                      "preflection-idealisation"]
    assert streams("summary") == ["summary"] and streams("rephrase") == ["rephrase"] and streams("annotations") == ["annotations"]


def test_run_recipes_from_config():
    cfg = GenerationConfig(recipes=["reflection", "annotations", "preflection"], prompt_pack="reflection-v1",
                           packs={"preflection": "preflection-v1"}, annotations={"apply_to": "all"})
    recipes = run_recipes(cfg)
    assert [r.name for r in recipes] == ["reflection", "annotations", "preflection"]
    assert recipes[0].pack == "reflection-v1" and recipes[1].applies_to == "all" and recipes[2].placement == "before"
    with pytest.raises(ConfigError, match=r"generation\.recipes: .*recipes must have distinct names"):
        load_config(REPO / "configs" / "demo.yaml", overrides=["generation.recipes=[reflection, reflection]"])


def test_rephrase_style_is_seeded_and_uniform():
    pack = load_pack("rephrase-v1")
    assert len(pack.styles) == 7
    picks = [choose_style(pack, seed=1, doc_id=f"d{i}") for i in range(7000)]
    counts = {s: picks.count(s) for s in pack.styles}
    assert all(800 < n < 1200 for n in counts.values()), counts
    assert picks[:50] == [choose_style(pack, seed=1, doc_id=f"d{i}") for i in range(50)]
    assert picks[:50] != [choose_style(pack, seed=2, doc_id=f"d{i}") for i in range(50)]
    systems = {pack.system_prompt(s) for s in pack.styles}
    assert len(systems) == 7  # each style its own cacheable system prompt
