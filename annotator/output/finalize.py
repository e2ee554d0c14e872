"""Pass 2 stages around the generation cache: which documents still need the engine, saving what
it produced, and finalizing a unit (select, attach generations, splice, write shards, manifest).

Generation results are saved per batch, so a crash loses at most the batches in flight; a unit's
shards are written from its whole scored set, so their names and contents do not depend on how
Ray happened to batch the rows or on where an earlier run stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from annotator.core import layout
from annotator.core.checkpoint import cached_generations, read_unit_scored, rejected_count, write_json, write_table
from annotator.core.layout import DONE, REJECTED_DOCUMENTS, REJECTED_DUPLICATES, REJECTED_GENERATIONS, generated_batch_path
from annotator.config import GenerationConfig, RunConfig, SelectionConfig
from annotator.generate.generator import (
    FAILED_REPLY, NOT_REQUESTED, NOT_SELECTED, REQUEST_COLUMN, SHARED_COLUMNS, Generator, NoGeneration, column_defaults,
)
from annotator.method.prompt_packs import section_order
from annotator.method.recipes import Recipe, run_recipes
from annotator.score.selection import SelectForReflection
from annotator.core.stages import TIMING_PREFIX, Resources, Stage, UnitStage, timed
from annotator.core.units import Unit
from annotator.engine.resources import PLANNING_TASK_CPUS
from annotator.output.writer import ShardWriter, TrainingText, placed_streams


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
        table, _ = drop_duplicates(read_unit_scored(Path(self.out_dir), unit, columns=columns), self.duplicates.get(unit.key, []))
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
    adds = ("_unit", "batch_index", "doc_ids", "texts", "selected_flags", "bad_flags")
    output_schema = pa.schema([("_unit", pa.string()), ("batch_index", pa.int64()), ("doc_ids", pa.list_(pa.string())),
                               ("texts", pa.list_(pa.string())), ("selected_flags", pa.list_(pa.bool_())),
                               ("bad_flags", pa.list_(pa.bool_()))])
    resources = Resources(num_cpus=PLANNING_TASK_CPUS, batch_size=1)
    pass_name: str | None = None  # None: the run's own generation; a recipe name: `--add-recipe`

    def process_unit(self, unit: Unit, row: dict) -> list[dict]:
        return plan_batches(self.engine_documents(unit), unit=unit.key, out_dir=Path(self.out_dir),
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
                      "bad_flags": piece.column("is_bad").to_pylist()})
    return plans


def save_generations(batch: pa.Table, *, path: Path, generation_key: str, columns: list[str], main_status: str) -> dict:
    """Saves one generated engine batch; returns its counts for progress."""
    extra = [c for c in batch.column_names if c.startswith(TIMING_PREFIX) or c == REQUEST_COLUMN]
    saved = batch.select(["doc_id", *columns, FAILED_REPLY, *extra]).append_column(
        "generation_key", pa.array([generation_key] * batch.num_rows, pa.string()))
    write_table(path, saved)
    status = batch.column(main_status).to_pylist()
    return {"documents": batch.num_rows, "selected": sum(s not in (NOT_SELECTED, NOT_REQUESTED) for s in status),
            "generated_tokens": int(pc.sum(batch.column("gen_output_tokens")).as_py() or 0),
            "failures": sum(s.startswith("failed") for s in status if s)}


class GenerateAndSave(Stage):
    """A vLLM replica: one planned engine batch per call, saved before the call returns (so it is
    durable at once; Ray Data would otherwise buffer a task's outputs into one block); returns
    only counts, so generated text never travels back through the object store."""

    name = "generate"
    reads = PlanGeneration.adds
    adds = ("unit", "documents", "selected", "generated_tokens", "failures", "engine_loads")
    stateful = True

    def __init__(self, cfg: RunConfig, *, out_dir: str, generation_key: str, num_cpus: float | None = None,
                 recipes: list[Recipe] | None = None, pass_name: str | None = None):
        self.generator = generator_stage(cfg, num_cpus=num_cpus, recipes=recipes)
        self.out_dir = out_dir
        self.generation_key = generation_key
        self.pass_name = pass_name
        # One planned batch per call: the engine batch is exactly the planned one.
        self.resources = replace(self.generator.resources, batch_size=1)

    def setup(self) -> None:
        self.generator.setup()

    def process(self, batch: pa.Table) -> pa.Table:
        rows = []
        for plan in batch.to_pylist():
            loads = 0
            docs = pa.table({"doc_id": pa.array(plan["doc_ids"], pa.string()), "text": pa.array(plan["texts"], pa.string()),
                             "selected": pa.array(plan["selected_flags"], pa.bool_()), "is_bad": pa.array(plan["bad_flags"], pa.bool_())})
            if not self.generator.loaded and docs.num_rows:
                self.generator.load_engine()  # outside the timing: stage seconds are engine busy time, not its start
                loads = 1
            generated = timed(self.generator, docs)
            path = generated_batch_path(Path(self.out_dir), plan["_unit"], index=plan["batch_index"], pass_name=self.pass_name)
            main = self.generator.runs[0].recipe.column("status")
            rows.append({"unit": plan["_unit"], "engine_loads": loads,
                         **save_generations(generated, path=path, generation_key=self.generation_key,
                                            columns=list(self.generator.columns), main_status=main)})
        return pa.Table.from_pylist(rows, schema=pa.schema([("unit", pa.string()), ("documents", pa.int64()), ("selected", pa.int64()),
                                                             ("generated_tokens", pa.int64()), ("failures", pa.int64()),
                                                             ("engine_loads", pa.int64())]))


def attach_generations(table: pa.Table, cache: pa.Table | None, *, cfg: RunConfig, unit: str,
                       recipes: list[Recipe] | None = None, needed=None, shared: bool = True) -> pa.Table:
    """The generation columns of `recipes` (default: the run's) for every row: the saved result
    where the row needed the engine, each recipe's defaults elsewhere. A needed row without a saved
    result is a bug, not a default."""
    gen = cfg.generation
    if not gen.enabled:
        return NoGeneration(gen, recipes=recipes).process(table).append_column(FAILED_REPLY, pa.nulls(table.num_rows, pa.string()))
    stage = generator_stage(cfg, recipes=recipes)
    defaults = column_defaults(stage.runs)
    needed = (needed if needed is not None else needs_generation(table.column("selected"), gen)).to_pylist()
    index: dict[str, int] = {}
    if cache is not None:
        for i, doc_id in enumerate(cache.column("doc_id").to_pylist()):
            index.setdefault(doc_id, i)
    take = []
    for doc_id, need in zip(table.column("doc_id").to_pylist(), needed):
        if need and doc_id not in index:
            raise RuntimeError(f"unit {unit}: document {doc_id!r} needed generation but has no saved result")
        take.append(index[doc_id] if need else None)
    picked = cache.take(pa.array(take, pa.int64())) if cache is not None else None
    columns = stage.columns if shared else {k: t for k, t in stage.columns.items() if k not in SHARED_COLUMNS}
    for key, typ in {**columns, FAILED_REPLY: pa.string()}.items():
        values = picked.column(key) if picked is not None else pa.nulls(table.num_rows, typ)
        default = defaults.get(key)
        if default is not None:
            values = pc.fill_null(values, pa.scalar(default, typ))
        table = table.append_column(key, values.cast(typ))
    if picked is not None and shared:
        # Engine time of the rows generated for (possibly in an earlier run), for the per-stage stats.
        for col in (c for c in picked.column_names if c.startswith(TIMING_PREFIX)):
            table = table.append_column(col, pc.fill_null(picked.column(col), 0.0))
    return table


def generator_stage(cfg: RunConfig, *, num_cpus: float | None = None, recipes: list[Recipe] | None = None) -> Generator:
    return Generator(cfg.generation, tokenizer=cfg.output.tokenizer, content_tokens=cfg.content_tokens,
                     replace_tokens=cfg.output.seq_length, num_cpus=num_cpus, recipes=recipes)


def run_sections(cfg: RunConfig) -> list[str]:
    """The constitution sections of the run's packs, in order (charter tokens are numbered by them)."""
    ids = {s for r in run_recipes(cfg.generation) if (p := r.load_pack()).constitution for s in p.constitution.ids}
    return sorted(ids, key=section_order)


def finalize_stages(cfg: RunConfig, *, out_dir: str) -> tuple[TrainingText, ShardWriter]:
    """The per-unit chain after generation, built once: the pipeline's chain check, its reserved
    columns and `FinalizeUnit` all use it."""
    sections = run_sections(cfg)
    recipes = [(r, r.load_pack()) for r in run_recipes(cfg.generation)]
    streams = placed_streams(recipes, cfg.output.voices)
    block = cfg.generation.annotations.max_block_tokens
    enabled = cfg.generation.enabled
    return (TrainingText(cfg.output, content_tokens=cfg.content_tokens, sections=sections, annotation_tokens=block, streams=streams,
                         generation_enabled=enabled),
            ShardWriter(out_dir=out_dir, output=cfg.output, sections=sections, annotation_tokens=block, streams=streams,
                        recipes=recipes, generation_enabled=enabled))


def failed_generations(table: pa.Table, recipes: list[Recipe]) -> pa.Table:
    """rejects/generations rows: one per (document, recipe) whose requests all failed, with the
    recipe's status and the model's last reply."""
    by_name = {r.name: r for r in recipes}
    statuses = [r.column("status") for r in recipes]
    rows = []
    for r in table.select(["doc_id", "source_file", "source_row", FAILED_REPLY, *statuses]).to_pylist():
        for recipe, reply in sorted(json.loads(r[FAILED_REPLY] or "{}").items()):
            status = r.get(by_name[recipe].column("status"))
            rows.append({"doc_id": r["doc_id"], "source_file": r["source_file"], "source_row": r["source_row"],
                         "recipe": recipe, "reason": status, "reply": reply})
    return pa.Table.from_pylist(rows, schema=pa.schema([("doc_id", pa.string()), ("source_file", pa.string()), ("source_row", pa.int64()),
                                                        ("recipe", pa.string()), ("reason", pa.string()), ("reply", pa.string())]))


class FinalizeUnit(UnitStage):
    """One unit from its scored documents and saved generations to shards and a manifest."""

    name = "finalize"
    adds = ("unit", "manifest")
    output_schema = pa.schema([("unit", pa.string()), ("manifest", pa.string())])

    def __init__(self, cfg: RunConfig, *, out_dir: str, probability: float, generation_key: str, duplicates: dict[str, list[int]]):
        self.out_dir = out_dir
        self.cfg = cfg
        self.select = SelectForReflection(cfg.selection, probability=probability)
        self.generation = cfg.generation
        self.generation_key = generation_key
        self.duplicates = duplicates
        self.splice, self.writer = finalize_stages(cfg, out_dir=out_dir)
        # A whole CPU each: a task holds a whole unit, so fewer at once keeps memory down.
        self.resources = Resources(num_cpus=1, batch_size=1)

    def setup(self) -> None:
        self.writer.setup()

    def process_unit(self, unit: Unit, row: dict) -> list[dict]:
        return [{"unit": unit.key, "manifest": json.dumps(self.finalize(unit))}]

    def finalize(self, unit: Unit) -> dict:
        out = Path(self.out_dir)
        scored = read_unit_scored(out, unit)
        rejected = rejected_count(out, unit)
        if scored.num_rows + rejected != unit.rows:
            raise RuntimeError(f"unit {unit.key}: {scored.num_rows} scored + {rejected} rejected != {unit.rows} rows")
        for stale in layout.unit_outputs(out, unit.key):
            stale.unlink()  # a finalize that died midway; rewritten below under the same names
        kept, dups = drop_duplicates(scored, self.duplicates.get(unit.key, []))
        if dups.num_rows:
            write_table(out / REJECTED_DUPLICATES / f"{unit.key}.parquet", pa.table({
                "doc_id": dups.column("doc_id"), "source_file": dups.column("source_file"),
                "source_row": dups.column("source_row"), "reason": pa.array(["duplicate_id"] * dups.num_rows, pa.string()),
                "text_preview": pc.utf8_slice_codeunits(dups.column("text"), 0, 1000)}))
        failed_rows = 0
        if kept.num_rows:
            table = self.select.process(kept)
            cache = cached_generations(out, unit.key, key=self.generation_key) if self.generation.enabled else None
            table = attach_generations(table, cache, cfg=self.cfg, unit=unit.key)
            failed = failed_generations(table, run_recipes(self.generation)) if self.generation.enabled else None
            if failed is not None and failed.num_rows:
                failed_rows = failed.num_rows
                write_table(out / REJECTED_GENERATIONS / f"{unit.key}.parquet", failed)
            table = self.splice.process(table)
            if "_unit" not in table.column_names:
                table = table.append_column("_unit", pa.array([unit.key] * table.num_rows, pa.string()))
            result = self.writer.process(table)
            shards = json.loads(result.column("shard")[0].as_py())
            stats = json.loads(result.column("stats_json")[0].as_py())
        else:  # every row was rejected or a duplicate: no shard, no stream
            shards, stats = [], {"blocks": 1, "documents_in": 0, "documents_out": 0, "streams": {}}
        stats["documents_rejected"] = _reasons(out, unit)
        if dups.num_rows:
            stats["documents_rejected"]["duplicate_id"] = dups.num_rows
        stats["generation_rejects"] = failed_rows
        stats["finished_at"] = stats.get("finished_at", time.time())
        manifest = {"unit": unit.key, "rows": unit.rows, "shards": shards, "recipes": list(self.generation.recipes), "stats": stats}
        write_json(out / DONE / f"{unit.key}.json", manifest)
        return manifest


def _reasons(out: Path, unit: Unit) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in sorted((out / REJECTED_DOCUMENTS).glob(f"{unit.key}-*.parquet")):
        for reason in pq.read_table(p, columns=["reason"]).column("reason").to_pylist():
            key = reason.split(":", 1)[0]
            counts[key] = counts.get(key, 0) + 1
    return counts
