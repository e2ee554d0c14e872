"""Recipes: the SPP annotation tracks as files. A recipe is a YAML file naming its prompt pack, the
documents it applies to, where its text goes in the training text, and the columns and streams it
adds; the generation stage serves every recipe of a run from one engine load, and the writer places
each recipe's text in its own training stream over the same windows. The seven built-in recipes are
such files (`recipe_files/`), and `generation.recipes` takes a built-in name or a path:

    reflection          selected  at the reading pause point      reflection_1p, reflection_3p (published names)
    reflection_end      selected  at the end of the kept content   reflection_end_1p, reflection_end_3p
    refusal_reflection  selected  at the same pause point          refusal_reflection_1p
    preflection         selected  before the document              preflection_charter_summary, _neutral, _judgemental, _idealisation
    summary             selected  after the document               summary
    rephrase            bad only  replacing the document           rephrase_text (+ rephrase_style)
    annotations         selected or all (annotations.apply_to): a key:value block in front   annotations

A recipe file's problems (unknown keys, an unknown placement, a pack the placement cannot use, a
column another recipe or the shards already have) are found at start, naming the file and line.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path

import pyarrow as pa
import yaml

from annotator.method.layouts import in_layout
from annotator.method.prompt_packs import VOICES, PackError, PromptPack, load_pack

RECIPE_DIR = "recipe_files"
RECIPE_KEYS = ("name", "description", "pack", "applies_to", "placement", "canaries", "voices", "column_prefix", "columns",
               "max_output_tokens")
APPLIES_TO = ("selected", "bad", "all")
# Per-recipe facts a recipe's columns hold besides its pack's fields (`columns:` may rename them).
FACTS = ("status", "attempts", "attempt_log", "generated_tokens", "prompt_tokens", "cached_prompt_tokens", "citations",
         "citations_dropped", "token_index", "position", "fraction", "canary_type", "prompt_version", "style", "tags",
         *(f"canary_present_{v}" for v in VOICES))
# Columns of the shards that no recipe may take.
CORE_COLUMNS = ("doc_id", "text", "token_length", "source_token_length", "clipped_tokens", "training_text", "training_stream",
                "model", "gen_prompt_tokens", "gen_cached_prompt_tokens", "gen_output_tokens", "safety_score", "safety_probs",
                "safety_confidence", "safety_model", "safety_note", "is_bad", "selected", "selected_reason", "source_file",
                "source_row", "input_note", "language", "language_score")
_NAME = re.compile(r"[a-z][a-z0-9_]*")


class RecipeError(PackError):
    """A recipe file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Placement:
    """Where a recipe's text goes in training data, and what the generator reads for it: every
    stage that places text or picks the generator's view asks this table, not the name."""

    name: str
    point: str | None   # inserted at a token point of the content: "pause" (the seeded pause point) or "end"
    reads: str          # what the generator is shown: "pause" (up to the pause point), "content" (the kept content), "opening"
    text: str           # how the text is written: "wrapped" (between the template tokens), "block" (annotation tags), "raw"
    formats: tuple[str, ...] = ("json", "text")  # the pack reply formats it can place

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
    Placement("prefix", point=None, reads="opening", text="block", formats=("tags",)),
    Placement("replace", point=None, reads="content", text="raw", formats=("text",)),
)}


@dataclass(frozen=True)
class Recipe:
    name: str
    pack: str
    applies_to: str          # selected | bad | all
    placement: str           # a key of PLACEMENTS
    canaries: bool
    voices: tuple[str, ...] = ()                 # the voices it places; (): output.voices
    column_prefix: str = ""                      # "": the name
    columns: tuple[tuple[str, str], ...] = ()    # (field or fact, column) renames
    max_output_tokens: int | None = None         # generated-token cap; None: derived from the pack's format
    source: str = ""                             # the recipe file
    lines: tuple[tuple[str, int], ...] = ()      # (key, line in the file), for messages
    digest: str = ""                             # of the file's bytes
    prompt_layout: str = "auto"                  # generation.prompt_layout: auto (the pack's choice), published, shared

    @property
    def place(self) -> Placement:
        return PLACEMENTS[self.placement]

    @property
    def wrapped(self) -> bool:
        """Placed between the template tokens (pause, end, before)."""
        return self.place.wrapped

    @property
    def version(self) -> str:
        return f"{self.name}@{self.digest}"

    @property
    def builtin(self) -> bool:
        return Path(self.source).parent == _builtin_dir()

    def where(self, key: str = "name") -> str:
        """`file:line` of a key (`columns.<field>` for a rename)."""
        lines = dict(self.lines)
        line = lines.get(key) or lines.get(key.split(".")[0]) or lines.get("name") or 1
        return f"{self.source}:{line}"

    def load_pack(self) -> PromptPack:
        """The recipe's pack, building prompts in the run's layout (`layouts.in_layout`)."""
        return in_layout(load_pack(self.pack), self.prompt_layout)

    def column(self, key: str) -> str:
        """The output column of a pack field or of a per-recipe fact (status, attempts,
        attempt_log, generated_tokens, citations, citations_dropped, token_index, position,
        fraction, canary_type, canary_present_<voice>, prompt_version, style)."""
        renamed = dict(self.columns).get(key)
        if renamed:
            return renamed
        suffix = key.removeprefix("reflection_")
        return self.name if suffix == self.name else f"{self.column_prefix or self.name}_{suffix}"


def _builtin_dir() -> Path:
    return Path(str(resources.files("annotator.method").joinpath(RECIPE_DIR))).resolve()


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in _builtin_dir().glob("*.yaml"))


def resolve_recipe_path(spec: str) -> Path:
    """A built-in recipe's name (`reflection`) or a recipe YAML file."""
    if spec in builtin_recipes():
        return _builtin_dir() / f"{spec}.yaml"
    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.resolve()
    raise RecipeError(f"recipe {spec!r}: not a built-in recipe ({', '.join(builtin_recipes())}) and no such .yaml file")


def recipe_spec(spec: str) -> str:
    """How a run records a recipe: a built-in name as it is, a file by its absolute path."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if spec not in builtin_recipes() and path.is_file() else spec


def _key_lines(text: str, path: Path) -> dict[str, int]:
    """1-based line of each top-level key and of each `columns:` entry (as `columns.<key>`)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(node, yaml.MappingNode):
        raise RecipeError(f"{path}:1: the top level must be a mapping of {', '.join(RECIPE_KEYS)}")
    lines = {}
    for key, value in node.value:
        lines[str(key.value)] = key.start_mark.line + 1
        if key.value == "columns" and isinstance(value, yaml.MappingNode):
            lines.update({f"columns.{k.value}": k.start_mark.line + 1 for k, _ in value.value})
    return lines


@lru_cache(maxsize=64)
def load_recipe(spec: str) -> Recipe:
    """The recipe a name or file gives, its keys checked (its pack is checked by `check_recipe`)."""
    path = resolve_recipe_path(spec)
    raw = path.read_bytes()
    text = raw.decode("utf-8")
    lines = _key_lines(text, path)
    data = yaml.safe_load(text)

    def fail(key: str, message: str):
        raise RecipeError(f"{path}:{lines.get(key, 1)}: {message}")

    for key in data:
        if key not in RECIPE_KEYS:
            fail(key, f"unknown key {key!r} (known: {', '.join(RECIPE_KEYS)})")
    for key in ("name", "pack", "placement"):
        if not isinstance(data.get(key), str) or not data[key]:
            fail(key, f"{key!r} is required (a string)")
    name = data["name"]
    if not _NAME.fullmatch(name):
        fail("name", f"name {name!r} must be lowercase letters, digits and _, starting with a letter (it names columns and streams)")
    if data["placement"] not in PLACEMENTS:
        fail("placement", f"unknown placement {data['placement']!r} (known: {', '.join(PLACEMENTS)})")
    applies = data.get("applies_to", "selected")
    if applies not in APPLIES_TO:
        fail("applies_to", f"applies_to must be one of {', '.join(APPLIES_TO)}, got {applies!r}")
    canaries = data.get("canaries", False)
    if not isinstance(canaries, bool):
        fail("canaries", f"canaries must be true or false, got {canaries!r}")
    voices = data.get("voices") or []
    if not isinstance(voices, list) or not voices and "voices" in data or any(v not in VOICES for v in voices) or len(set(voices)) != len(voices):
        fail("voices", f"voices must be a non-empty list of distinct {' / '.join(VOICES)}, got {data.get('voices')!r}")
    prefix = data.get("column_prefix", "")
    if prefix and not _NAME.fullmatch(str(prefix)):
        fail("column_prefix", f"column_prefix {prefix!r} must be lowercase letters, digits and _")
    columns = data.get("columns") or {}
    if not isinstance(columns, dict) or not all(isinstance(v, str) and _NAME.fullmatch(v) for v in columns.values()):
        fail("columns", "columns must map a pack field or a recipe fact to a column name (lowercase letters, digits and _)")
    cap = data.get("max_output_tokens")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        fail("max_output_tokens", f"max_output_tokens must be a positive integer, got {cap!r}")
    pack = data["pack"]
    beside = (path.parent / pack).expanduser()
    if beside.exists():  # a pack folder or file beside the recipe; otherwise a built-in pack's name
        pack = str(beside.resolve())
    return Recipe(name=name, pack=pack, applies_to=applies, placement=data["placement"], canaries=canaries,
                  voices=tuple(voices), column_prefix=str(prefix), columns=tuple((str(k), v) for k, v in columns.items()),
                  max_output_tokens=cap, source=str(path), lines=tuple(sorted(lines.items())),
                  digest=hashlib.sha256(raw).hexdigest()[:12])


def check_recipe(recipe: Recipe, pack: PromptPack) -> None:
    """A recipe's pack can be used at its placement: the reply format it places, the voices it
    asks for, canaries only with voices, and renames only of fields and facts it has."""
    place = recipe.place
    if pack.format not in place.formats:
        raise RecipeError(f"{recipe.where('placement')}: placement {recipe.placement!r} places a "
                          f"{' or '.join(place.formats)} reply, but pack {pack.name} ({pack.source}) replies in {pack.format}")
    kinds = set(pack.voices.values())
    if recipe.voices and not place.wrapped:
        raise RecipeError(f"{recipe.where('voices')}: placement {recipe.placement!r} places one text; voices apply to pause, end and before")
    missing = [v for v in recipe.voices if v not in kinds]
    if missing:
        raise RecipeError(f"{recipe.where('voices')}: pack {pack.name} ({pack.source}) has no {', '.join(missing)} voice "
                          f"(its voices: {', '.join(f'{f}: {v}' for f, v in pack.voices.items()) or 'none'})")
    if recipe.canaries and (pack.format != "json" or not pack.voices):
        raise RecipeError(f"{recipe.where('canaries')}: canaries go into voice fields; pack {pack.name} ({pack.source}) has none")
    known = set(pack.fields) | set(FACTS)
    for key, _ in recipe.columns:
        if key not in known:
            raise RecipeError(f"{recipe.where('columns.' + key)}: columns: {key!r} is neither a field of pack {pack.name} "
                              f"({', '.join(pack.fields)}) nor a recipe fact")


def check_columns(pairs: list[tuple[Recipe, PromptPack]]) -> None:
    """No two recipes of a run write the same column, and none takes a column of the shards."""
    owner: dict[str, Recipe] = {}
    for recipe, pack in pairs:
        for col in recipe_columns(recipe, pack):
            if col in CORE_COLUMNS:
                raise RecipeError(f"{_where_column(recipe, col)}: column {col!r} is one of the shards' own columns; rename it")
            other = owner.get(col)
            if other is not None and other.name != recipe.name:
                raise RecipeError(f"{_where_column(recipe, col)}: column {col!r} is also written by recipe {other.name} "
                                  f"({_where_column(other, col)}); rename one (columns: or column_prefix:)")
            owner[col] = recipe


def _where_column(recipe: Recipe, col: str) -> str:
    key = next((k for k, v in recipe.columns if v == col), None)
    return recipe.where(f"columns.{key}" if key else "column_prefix" if recipe.column_prefix else "name")


def run_recipes(gen) -> list[Recipe]:
    """The recipes of a run, in `generation.recipes` order (built-in names or files). The
    config's older per-recipe keys still apply to the built-in recipes: `generation.packs`
    overrides a recipe's pack (the reflection recipe's is `generation.prompt_pack`), and
    `annotations.apply_to` the annotations recipe's documents."""
    out = []
    for spec in gen.recipes:
        recipe = load_recipe(spec)
        if recipe.builtin and recipe.name == "reflection":
            recipe = replace(recipe, pack=gen.prompt_pack)
        elif recipe.name in gen.packs:
            recipe = replace(recipe, pack=gen.packs[recipe.name])
        if recipe.builtin and recipe.name == "annotations":
            recipe = replace(recipe, applies_to=gen.annotations.apply_to)
        out.append(replace(recipe, prompt_layout=gen.prompt_layout))
    return out


def placed_fields(recipe: Recipe, pack: PromptPack, *, voices: list[str]) -> list[str]:
    """The reply fields a recipe places in training text (one stream each): the voices the output
    asks for (`output.voices`) of a pack with voices 1p/3p; all voice fields otherwise (the four
    preflection framings); the one field of a text or tags pack. A recipe's own `voices` come
    before the output's."""
    if pack.format != "json":
        return list(pack.fields)
    kinds = set(pack.voices.values())
    if len(kinds) == len(pack.voices):  # one field per voice: 1p / 3p
        chosen = [f for f, v in pack.voices.items() if v in (recipe.voices or voices)]
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
