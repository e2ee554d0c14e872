"""Recipes: the SPP annotation tracks as data. A recipe names its prompt pack, the documents it
applies to, where its text goes in the training text, and the columns and streams it adds; the
generation stage serves every recipe of a run from one engine load, and the writer places each
recipe's text in its own training stream over the same windows.

    reflection          selected  at the reading pause point      reflection_1p, reflection_3p (published names)
    reflection_end      selected  at the end of the kept content   reflection_end_1p, reflection_end_3p
    refusal_reflection  selected  at the same pause point          refusal_reflection_1p
    preflection         selected  before the document              preflection_charter_summary, _neutral, _judgemental, _idealisation
    summary             selected  after the document               summary
    rephrase            bad only  replacing the document           rephrase_text (+ rephrase_style)
    annotations         selected or all (annotations.apply_to): a key:value block in front   annotations
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from annotator.method.prompt_packs import PromptPack, load_pack

# The main recipe keeps the published dataset's column names.
_PUBLISHED = {"reflection_1p": "reflection_1p", "reflection_3p": "reflection_3p", "analysis": "reflection_analysis",
              "citations": "citations", "citations_dropped": "citations_dropped", "canary_type": "canary_type",
              "canary_present_1p": "canary_present_1p", "canary_present_3p": "canary_present_3p",
              "prompt_version": "prompt_version"}
_ANNOTATIONS = {"tags": "annotations", "status": "annotation_status"}


@dataclass(frozen=True)
class Placement:
    """Where a recipe's text goes in training data, and what the generator reads for it: every
    stage that places text or picks the generator's view asks this table, not the name."""

    name: str
    point: str | None   # inserted at a token point of the content: "pause" (the seeded pause point) or "end"
    reads: str          # what the generator is shown: "pause" (up to the pause point), "content" (the kept content), "opening"
    text: str           # how the text is written: "wrapped" (between the template tokens), "block" (annotation tags), "raw"

    @property
    def at_point(self) -> bool:
        return self.point is not None

    @property
    def replaces(self) -> bool:
        """The text stands instead of the document."""
        return self.text == "raw"

    @property
    def leads(self) -> bool:
        """The text goes before the document."""
        return self.point is None and not self.replaces

    @property
    def wrapped(self) -> bool:
        return self.text == "wrapped"


PLACEMENTS = {p.name: p for p in (
    Placement("pause", point="pause", reads="pause", text="wrapped"),
    Placement("end", point="end", reads="content", text="wrapped"),
    Placement("before", point=None, reads="content", text="wrapped"),
    Placement("prefix", point=None, reads="opening", text="block"),
    Placement("replace", point=None, reads="content", text="raw"),
)}


@dataclass(frozen=True)
class Recipe:
    name: str
    pack: str
    applies_to: str          # selected | bad | all
    placement: str           # a key of PLACEMENTS
    canaries: bool

    @property
    def place(self) -> Placement:
        return PLACEMENTS[self.placement]

    @property
    def wrapped(self) -> bool:
        """Placed between the template tokens (pause, end, before)."""
        return self.place.wrapped

    def load_pack(self) -> PromptPack:
        return load_pack(self.pack)

    def column(self, key: str) -> str:
        """The output column of a pack field or of a per-recipe fact (status, attempts,
        attempt_log, generated_tokens, citations, citations_dropped, token_index, position,
        fraction, canary_type, canary_present_<voice>, prompt_version, style)."""
        if self.name == "reflection":
            return _PUBLISHED.get(key, f"reflection_{key}")
        if self.name == "annotations":
            return _ANNOTATIONS.get(key, f"annotation_{key}")
        suffix = key.removeprefix("reflection_")
        return self.name if suffix == self.name else f"{self.name}_{suffix}"


BUILTIN = {
    "reflection": Recipe("reflection", "reflection-v2", "selected", "pause", canaries=True),
    "reflection_end": Recipe("reflection_end", "reflection-v2", "selected", "end", canaries=True),
    "refusal_reflection": Recipe("refusal_reflection", "refusal-reflection-v1", "selected", "pause", canaries=True),
    "preflection": Recipe("preflection", "preflection-v1", "selected", "before", canaries=False),
    "summary": Recipe("summary", "summary-v1", "selected", "end", canaries=False),
    "rephrase": Recipe("rephrase", "rephrase-v1", "bad", "replace", canaries=False),
    "annotations": Recipe("annotations", "annotations-v1", "selected", "prefix", canaries=False),
}


def run_recipes(gen) -> list[Recipe]:
    """The recipes of a run, in `generation.recipes` order, each with its pack (`generation.packs`
    overrides a recipe's; the reflection recipe's is `generation.prompt_pack`) and, for
    annotations, `annotations.apply_to`."""
    out = []
    for name in gen.recipes:
        base = BUILTIN[name]
        pack = gen.prompt_pack if name == "reflection" else gen.packs.get(name, base.pack)
        applies = gen.annotations.apply_to if name == "annotations" else base.applies_to
        out.append(Recipe(name, pack, applies, base.placement, base.canaries))
    return out


def placed_fields(recipe: Recipe, pack: PromptPack, *, voices: list[str]) -> list[str]:
    """The reply fields a recipe places in training text (one stream each): the voices the output
    asks for (`output.voices`) of a pack with voices 1p/3p; all voice fields otherwise (the four
    preflection framings); the one field of a text or tags pack."""
    if pack.format != "json":
        return list(pack.fields)
    kinds = set(pack.voices.values())
    if len(kinds) == len(pack.voices):  # one field per voice: 1p / 3p
        chosen = [f for f, v in pack.voices.items() if v in voices]
        return chosen or [next(iter(pack.voices))]
    return list(pack.voices)


def stream_name(recipe: Recipe, field: str) -> str:
    """reflection-1p, reflection_end-3p, refusal_reflection-1p, preflection-neutral, summary,
    rephrase, annotations: the recipe, then the field's column suffix unless it adds nothing."""
    suffix = field.removeprefix("reflection_")
    return recipe.name if suffix in (recipe.name, "text", "tags") else f"{recipe.name}-{suffix}"


def recipe_columns(recipe: Recipe, pack: PromptPack) -> dict[str, pa.DataType]:
    """The columns a recipe adds, with their types."""
    c = recipe.column
    cols: dict[str, pa.DataType] = {}
    usage = {c("generated_tokens"): pa.int32(), c("prompt_tokens"): pa.int32(), c("cached_prompt_tokens"): pa.int32()}
    if pack.format == "tags":
        return {c("tags"): pa.list_(pa.string()), c("status"): pa.string(), c("attempts"): pa.int8(), **usage}
    for f in pack.fields:
        cols[c(f)] = pa.string()
    if pack.format == "json" and pack.constitution is not None:
        cols[c("citations")] = pa.list_(pa.string())
        cols[c("citations_dropped")] = pa.int16()
    cols.update({c("token_index"): pa.int32(), c("position"): pa.int32(), c("fraction"): pa.float32(),
                 c("status"): pa.string(), c("attempts"): pa.int8(), c("attempt_log"): pa.list_(pa.string()),
                 **usage, c("prompt_version"): pa.string()})
    if recipe.canaries:
        cols[c("canary_type")] = pa.string()
        for f, v in pack.voices.items():
            cols[c(f"canary_present_{v}")] = pa.bool_()
    if pack.styles:
        cols[c("style")] = pa.string()
    return cols


@dataclass(frozen=True)
class Placed:
    """One training stream: a recipe's field, placed as the recipe says."""

    recipe: Recipe
    pack: PromptPack
    field: str
    stream: str


def placed_streams(recipes: list[tuple[Recipe, PromptPack]], *, voices: list[str]) -> list[Placed]:
    """One stream per placed field of each recipe, in recipe order."""
    return [Placed(r, p, f, stream_name(r, f)) for r, p in recipes for f in placed_fields(r, p, voices=voices)]
