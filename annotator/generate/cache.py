"""The generation cache: which documents of a unit need the engine, cut into engine batches that
depend on the unit alone; the generation task that runs a planned batch on a replica and saves it;
saving a generated batch. Finalizing reads the saved batches back (`output.finalize`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from annotator.config import GenerationConfig, RunConfig, SelectionConfig
from annotator.core import storage
from annotator.core.checkpoint import OPERATIONAL_FIELDS, content_fingerprint, digest, write_table
from annotator.score.store import read_unit_scored
from annotator.core.layout import generated_batch_path, generated_dir
from annotator.core.stages import TIMING_PREFIX, Resources, UnitStage, timed
from annotator.core.units import Unit
from annotator.engine.replica import ReplicaStage, ReplicaTask
from annotator.engine.resources import PLANNING_TASK_CPUS
from annotator.generate.generator import FAILED_REPLY, REQUEST_COLUMN, Generator
from annotator.method.recipes import Recipe, run_recipes
from annotator.score.selection import SelectForReflection
from annotator.core.statuses import NOT_REQUESTED, NOT_SELECTED, is_failed


def needs_generation(selected: pa.ChunkedArray | pa.Array, gen: GenerationConfig) -> pa.Array:
    """Rows the engine has to see: selected ones, and every row when a recipe applies to all."""
    if any(r.applies_to == "all" for r in run_recipes(gen)):
        return pa.array([True] * len(selected))
    return pc.fill_null(selected, False)


def drop_duplicates(table: pa.Table, rows: list[int]) -> tuple[pa.Table, pa.Table]:
    """(kept, duplicates) by input row number."""
    if not rows or not table.num_rows:
        return table, table.slice(0, 0)
    dup = pc.is_in(table.column("source_row"), value_set=pa.array(rows, pa.int64()))
    return table.filter(pc.invert(dup)), table.filter(dup)


class EngineDocuments(UnitStage):
    """Base of the stages that need, per unit, the documents the engine has to see."""

    def __init__(self, *, out_dir: str, selection: SelectionConfig, probability: float, generation: GenerationConfig,
                 duplicates: dict[str, list[int]]):
        self.out_dir = out_dir
        self.select = SelectForReflection(selection, probability=probability)
        self.generation = generation
        self.duplicates = duplicates

    def engine_documents(self, unit: Unit, columns: list[str] | None = None) -> pa.Table:
        """The unit's documents that need the engine (duplicates dropped, selected), in input order."""
        table, _ = drop_duplicates(read_unit_scored(storage.location(self.out_dir), unit, columns=columns), self.duplicates.get(unit.key, []))
        if not table.num_rows:
            return table
        table = self.select.process(table)
        return table.filter(needs_generation(table.column("selected"), self.generation))


class PlanGeneration(EngineDocuments):
    """Per unit: the documents that need the engine, in input order, cut into engine batches of
    `generation.batch_size`; emits one row per batch that has no saved result yet.

    The batches are a function of the unit alone, never of how Ray streamed the rows or where an
    earlier run stopped: vLLM's numerics depend on what shares a batch, so only identical batches
    give identical reflections in a resumed run."""

    name = "plan_generation"
    adds = ("_unit", "batch_index", "doc_ids", "texts", "selected_flags", "bad_flags", "languages")
    output_schema = pa.schema([("_unit", pa.string()), ("batch_index", pa.int64()), ("doc_ids", pa.list_(pa.string())),
                               ("texts", pa.list_(pa.string())), ("selected_flags", pa.list_(pa.bool_())),
                               ("bad_flags", pa.list_(pa.bool_())), ("languages", pa.list_(pa.string()))])
    resources = Resources(num_cpus=PLANNING_TASK_CPUS, batch_size=1)
    pass_name: str | None = None  # None: the run's own generation; a recipe name: `--add-recipe`

    def process_unit(self, unit: Unit, row: dict) -> list[dict]:
        return plan_batches(self.engine_documents(unit), unit=unit.key, out_dir=storage.location(self.out_dir),
                            batch_size=self.generation.batch_size, pass_name=self.pass_name)


def plan_batches(table: pa.Table, *, unit: str, out_dir: Path, batch_size: int, pass_name: str | None) -> list[dict]:
    """A unit's documents that need the engine, in input order, cut into engine batches; the
    batches already saved (by an earlier attempt) are left out."""
    plans = []
    for index, start in enumerate(range(0, table.num_rows, batch_size)):
        if generated_batch_path(out_dir, unit, index=index, pass_name=pass_name).exists():
            continue  # saved by an earlier run
        piece = table.slice(start, batch_size)
        plans.append({"_unit": unit, "batch_index": index, "doc_ids": piece.column("doc_id").to_pylist(),
                      "texts": piece.column("text").to_pylist(), "selected_flags": piece.column("selected").to_pylist(),
                      "bad_flags": piece.column("is_bad").to_pylist(),
                      "languages": piece.column("language").to_pylist() if "language" in piece.column_names else [None] * piece.num_rows})
    return plans


def save_generations(batch: pa.Table, *, path: Path, generation_key: str, columns: list[str]) -> None:
    """Saves one generated engine batch: its generation columns, failed replies, timings and key."""
    extra = [c for c in batch.column_names if c.startswith(TIMING_PREFIX) or c == REQUEST_COLUMN]
    saved = batch.select(["doc_id", *columns, FAILED_REPLY, *extra]).append_column(
        "generation_key", pa.array([generation_key] * batch.num_rows, pa.string()))
    write_table(path, saved)


def generation_counts(batch: pa.Table, *, main_status: str) -> dict[str, int]:
    """A generated batch's counts for progress, by the main recipe's status column."""
    status = batch.column(main_status).to_pylist()
    return {"documents": batch.num_rows, "selected": sum(s not in (NOT_SELECTED, NOT_REQUESTED) for s in status),
            "generated_tokens": int(pc.sum(batch.column("gen_output_tokens")).as_py() or 0),
            "prompt_tokens": int(pc.sum(batch.column("gen_prompt_tokens")).as_py() or 0),
            "cached_prompt_tokens": int(pc.sum(batch.column("gen_cached_prompt_tokens")).as_py() or 0),
            "failures": sum(is_failed(s) for s in status)}


class GenerationTask(ReplicaTask):
    """Generation as a replica task: one planned engine batch of a unit (`PlanGeneration`) through
    every recipe of the run (or of `--add-recipe`), saved under the layout's batch name."""

    name = "generate"
    reads = PlanGeneration.adds
    keys = {"unit": pa.string()}
    counts = ("documents", "selected", "generated_tokens", "prompt_tokens", "cached_prompt_tokens", "failures")

    def __init__(self, cfg: RunConfig, *, out_dir: str, generation_key: str, num_cpus: float | None = None,
                 recipes: list[Recipe] | None = None, pass_name: str | None = None):
        self.generator = generator_stage(cfg, num_cpus=num_cpus, recipes=recipes)
        self.out_dir = out_dir
        self.generation_key = generation_key
        self.pass_name = pass_name

    def echo(self, plan: dict) -> dict:
        return {"unit": plan["_unit"]}

    @property
    def loaded(self) -> bool:
        return self.generator.loaded

    def load(self, *, num_cpus: float) -> int:
        self.generator.load_engine()  # outside the timing: stage seconds are engine busy time, not its start
        return 1

    def needs_engine(self, plan: dict) -> bool:
        return bool(plan["doc_ids"])

    def batch_path(self, plan: dict) -> Path:
        return generated_batch_path(storage.location(self.out_dir), plan["_unit"], index=plan["batch_index"], pass_name=self.pass_name)

    def run(self, plan: dict) -> pa.Table:
        docs = pa.table({"doc_id": pa.array(plan["doc_ids"], pa.string()), "text": pa.array(plan["texts"], pa.string()),
                         "selected": pa.array(plan["selected_flags"], pa.bool_()), "is_bad": pa.array(plan["bad_flags"], pa.bool_()),
                         "language": pa.array(plan["languages"], pa.string())})
        return timed(self.generator, docs)

    def save(self, table: pa.Table, path: Path) -> None:
        save_generations(table, path=path, generation_key=self.generation_key, columns=list(self.generator.columns))

    def count(self, table: pa.Table) -> dict[str, int]:
        return generation_counts(table, main_status=self.generator.runs[0].recipe.column("status"))


def generation_stage(cfg: RunConfig, *, out_dir: str, generation_key: str, num_cpus: float | None = None,
                     recipes: list[Recipe] | None = None, pass_name: str | None = None) -> ReplicaStage:
    """Pass 2a's replicas (and `--add-recipe`'s): the generation task on the engine's actor pool."""
    task = GenerationTask(cfg, out_dir=out_dir, generation_key=generation_key, num_cpus=num_cpus, recipes=recipes, pass_name=pass_name)
    return ReplicaStage(task, resources=replace(task.generator.resources, batch_size=1))


def generator_stage(cfg: RunConfig, *, num_cpus: float | None = None, recipes: list[Recipe] | None = None) -> Generator:
    return Generator(cfg.generation, tokenizer=cfg.output.tokenizer, content_tokens=cfg.content_tokens,
                     replace_tokens=cfg.output.seq_length, num_cpus=num_cpus, recipes=recipes)


def generation_key(cfg: RunConfig) -> str:
    """What a cached generation depends on besides the document: the prompt pack's content, the
    sampling settings, the target tokenizer and the content a window keeps (pause points)."""
    g = cfg.generation.model_dump(mode="json")
    for name in OPERATIONAL_FIELDS["generation"] | {"enabled"}:
        g.pop(name, None)
    return digest(content_fingerprint(cfg), g, cfg.output.tokenizer, cfg.content_tokens)


def cached_generations(out_dir: Path, unit_key: str, *, key: str, pass_name: str | None = None) -> pa.Table | None:
    """The generation results already saved for a unit under generation key `key`."""
    parts = [storage.read_table(p) for p in sorted((generated_dir(out_dir, pass_name) / unit_key).glob("*.parquet"), key=str)]
    if not parts:
        return None
    table = pa.concat_tables(parts, promote_options="permissive")
    return table.filter(pc.equal(table.column("generation_key"), key))
