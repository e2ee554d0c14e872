"""A run's method resolved once (`method/resolved.py`): recipes with their packs loaded, the
constitution sections in section order, and the streams their fields are placed in."""

from __future__ import annotations

from annotator.config import load_config
from annotator.method.prompt_packs import section_order
from annotator.method.recipes import load_recipe, stream_name
from annotator.method.resolved import resolve_run
from tests.support import REPO


def test_a_run_resolves_its_recipes_packs_sections_and_streams():
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides=["generation.recipes=[reflection, preflection, annotations]"])
    run = resolve_run(cfg.generation, voices=["1p", "3p"])
    assert [r.name for r in run.recipes] == ["reflection", "preflection", "annotations"]
    assert list(run.packs) == ["reflection", "preflection", "annotations"]
    assert run.packs["reflection"].name == "reflection-v2" and run.main_pack is run.packs["reflection"]
    assert [(r.name, p.name) for r, p in run.pairs] == [(n, run.packs[n].name) for n in run.packs]
    ids = {s for p in run.packs.values() if p.constitution for s in p.constitution.ids}
    assert list(run.sections) == sorted(ids, key=section_order) and len(run.sections) == len(ids) > 10
    streams = [s.stream for s in run.streams]
    assert streams[:2] == [stream_name(load_recipe("reflection"), "reflection_1p"), stream_name(load_recipe("reflection"), "reflection_3p")]
    assert {s.recipe.name for s in run.streams} == {"reflection", "preflection", "annotations"}


def test_a_subset_of_recipes_keeps_only_their_streams():
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides=["generation.recipes=[reflection, summary]"])
    added = resolve_run(cfg.generation, voices=["1p"], recipes=[r for r in resolve_run(cfg.generation, voices=["1p"]).recipes if r.name == "summary"])
    assert [r.name for r in added.recipes] == ["summary"] and list(added.packs) == ["summary"]
    assert {s.recipe.name for s in added.streams} == {"summary"}
