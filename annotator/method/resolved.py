"""A run's method resolved once: its recipes with their loaded packs, the constitution sections
they number charter tokens by, and the training streams they place. Each driver (an annotation
run, `--add-recipe`, statistics of a recorded config) builds one and hands the stages the parts
they use, instead of every stage re-deriving them from the whole config.
"""

from __future__ import annotations

from dataclasses import dataclass

from annotator.config import GenerationConfig
from annotator.method.prompt_packs import PromptPack, section_order
from annotator.method.recipes import Placed, Recipe, check_columns, check_recipe, placed_streams, run_recipes


@dataclass(frozen=True)
class ResolvedRun:
    recipes: tuple[Recipe, ...]
    packs: dict[str, PromptPack]      # by recipe name, in recipe order
    sections: tuple[str, ...]         # constitution section ids of every pack, in section order
    streams: tuple[Placed, ...]       # the training streams the recipes' fields go to

    @property
    def pairs(self) -> list[tuple[Recipe, PromptPack]]:
        return [(r, self.packs[r.name]) for r in self.recipes]

    @property
    def main_pack(self) -> PromptPack | None:
        return next(iter(self.packs.values()), None)


def resolve_run(gen: GenerationConfig, *, voices: list[str], recipes: list[Recipe] | None = None) -> ResolvedRun:
    """The recipes of `gen` (or the given ones, e.g. those `--add-recipe` adds), each pack loaded
    once and checked against its recipe, and no column written twice (`RecipeError` otherwise)."""
    chosen = tuple(recipes if recipes is not None else run_recipes(gen))
    packs = {r.name: r.load_pack() for r in chosen}
    for r in chosen:
        check_recipe(r, packs[r.name])
    check_columns([(r, packs[r.name]) for r in chosen])
    ids = {s for p in packs.values() if p.constitution for s in p.constitution.ids}
    sections = tuple(sorted(ids, key=section_order))
    streams = tuple(placed_streams([(r, packs[r.name]) for r in chosen], voices=voices))
    return ResolvedRun(recipes=chosen, packs=packs, sections=sections, streams=streams)
