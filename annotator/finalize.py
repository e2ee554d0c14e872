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

from annotator.checkpoint import (
    DONE, GENERATED, REJECTED_DOCUMENTS, REJECTED_DUPLICATES, REJECTED_GENERATIONS, cached_generations,
    read_unit_scored, rejected_count, write_json, write_table,
)
from annotator import layout
from annotator.config import GenerationConfig, RunConfig, SelectionConfig
from annotator.generation import DEFAULTS, FAILED_REPLY, REFLECTION_COLUMNS, REQUEST_COLUMN, NoReflections, ReflectionGenerator
from annotator.prompt_packs import load_pack
from annotator.selection import SelectForReflection
from annotator.stages import TIMING_PREFIX, Resources, Stage, UnitStage, timed
from annotator.units import Unit
from annotator.writer import ShardWriter, SpliceReflections

def needs_generation(selected: pa.ChunkedArray | pa.Array, gen: GenerationConfig) -> pa.Array:
    """Rows the engine has to see: selected ones, and every row when all are annotated."""
    ann = gen.annotations
    if ann.enabled and ann.apply_to == "all":
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
        table, _ = drop_duplicates(read_unit_scored(Path(self.out_dir), unit, columns), self.duplicates.get(unit.key, []))
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
    adds = ("_unit", "batch_index", "doc_ids", "texts", "selected_flags")
    output_schema = pa.schema([("_unit", pa.string()), ("batch_index", pa.int64()), ("doc_ids", pa.list_(pa.string())),
                               ("texts", pa.list_(pa.string())), ("selected_flags", pa.list_(pa.bool_()))])
    resources = Resources(num_cpus=0.25, batch_size=1)

    def process_unit(self, unit: Unit, row: dict) -> list[dict]:
        table = self.engine_documents(unit)
        size = self.generation.batch_size
        plans = []
        for index, start in enumerate(range(0, table.num_rows, size)):
            if generated_batch_path(Path(self.out_dir), unit.key, index).exists():
                continue  # saved by an earlier run
            piece = table.slice(start, size)
            plans.append({"_unit": unit.key, "batch_index": index, "doc_ids": piece.column("doc_id").to_pylist(),
                          "texts": piece.column("text").to_pylist(), "selected_flags": piece.column("selected").to_pylist()})
        return plans


def generated_batch_path(out_dir: Path, unit: str, index: int) -> Path:
    return out_dir / GENERATED / unit / f"{index:06d}.parquet"


def save_generations(batch: pa.Table, *, path: Path, generation_key: str) -> dict:
    """Saves one generated engine batch; returns its counts for progress."""
    extra = [c for c in batch.column_names if c.startswith(TIMING_PREFIX) or c == REQUEST_COLUMN]
    saved = batch.select(["doc_id", *REFLECTION_COLUMNS, FAILED_REPLY, *extra]).append_column(
        "generation_key", pa.array([generation_key] * batch.num_rows, pa.string()))
    write_table(path, saved)
    status = batch.column("reflection_status").to_pylist()
    return {"documents": batch.num_rows, "selected": sum(s != "not_selected" for s in status),
            "generated_tokens": int(pc.sum(batch.column("gen_output_tokens")).as_py() or 0),
            "failures": sum(s.startswith("failed") for s in status if s)}


class GenerateAndSave(Stage):
    """A vLLM replica: one planned engine batch per call, saved before the call returns (so it is
    durable at once; Ray Data would otherwise buffer a task's outputs into one block); returns
    only counts, so generated text never travels back through the object store."""

    name = "generate"
    reads = PlanGeneration.adds
    adds = ("unit", "documents", "selected", "generated_tokens", "failures")
    stateful = True

    def __init__(self, cfg: RunConfig, *, out_dir: str, generation_key: str, num_cpus: float | None = None):
        self.generator = generator_stage(cfg, num_cpus=num_cpus)
        self.out_dir = out_dir
        self.generation_key = generation_key
        # One planned batch per call: the engine batch is exactly the planned one.
        self.resources = replace(self.generator.resources, batch_size=1)

    def setup(self) -> None:
        self.generator.setup()

    def process(self, batch: pa.Table) -> pa.Table:
        rows = []
        for plan in batch.to_pylist():
            docs = pa.table({"doc_id": pa.array(plan["doc_ids"], pa.string()), "text": pa.array(plan["texts"], pa.string()),
                             "selected": pa.array(plan["selected_flags"], pa.bool_())})
            if not self.generator.loaded and docs.num_rows:
                self.generator.load_engine()  # outside the timing: stage seconds are engine busy time, not its start
            generated = timed(self.generator, docs)
            path = generated_batch_path(Path(self.out_dir), plan["_unit"], plan["batch_index"])
            rows.append({"unit": plan["_unit"], **save_generations(generated, path=path, generation_key=self.generation_key)})
        return pa.Table.from_pylist(rows, schema=pa.schema([("unit", pa.string()), ("documents", pa.int64()), ("selected", pa.int64()),
                                                             ("generated_tokens", pa.int64()), ("failures", pa.int64())]))


def attach_generations(table: pa.Table, cache: pa.Table | None, *, gen: GenerationConfig, unit: str) -> pa.Table:
    """The generation columns for every row: the saved result where the row needed the engine,
    the not-selected defaults elsewhere. A needed row without a saved result is a bug, not a default."""
    if not gen.enabled:
        return NoReflections().process(table).append_column(FAILED_REPLY, pa.nulls(table.num_rows, pa.string()))
    needed = needs_generation(table.column("selected"), gen).to_pylist()
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
    for key, typ in {**REFLECTION_COLUMNS, FAILED_REPLY: pa.string()}.items():
        values = picked.column(key) if picked is not None else pa.nulls(table.num_rows, typ)
        default = DEFAULTS.get(key)
        if default is not None:
            values = pc.fill_null(values, pa.scalar(default, typ))
        table = table.append_column(key, values.cast(typ))
    if picked is not None:
        # Engine time of the rows generated for (possibly in an earlier run), for the per-stage stats.
        for col in (c for c in picked.column_names if c.startswith(TIMING_PREFIX)):
            table = table.append_column(col, pc.fill_null(picked.column(col), 0.0))
    return table


def generator_stage(cfg: RunConfig, *, num_cpus: float | None = None) -> ReflectionGenerator:
    return ReflectionGenerator(cfg.generation, tokenizer=cfg.output.tokenizer, content_tokens=cfg.content_tokens, num_cpus=num_cpus)


def run_sections(cfg: RunConfig) -> list[str]:
    """The constitution sections of the run's pack, in order (charter tokens are numbered by it)."""
    pack = load_pack(cfg.generation.prompt_pack)
    return pack.constitution.ordered_ids() if pack.constitution else []


def finalize_stages(cfg: RunConfig, *, out_dir: str) -> tuple[SpliceReflections, ShardWriter]:
    """The per-unit chain after generation, built once: the pipeline's chain check, its reserved
    columns and `FinalizeUnit` all use it."""
    sections = run_sections(cfg)
    block = cfg.generation.annotations.max_block_tokens
    return (SpliceReflections(cfg.output, content_tokens=cfg.content_tokens, sections=sections, annotation_tokens=block),
            ShardWriter(out_dir=out_dir, output=cfg.output, sections=sections, annotation_tokens=block))


class FinalizeUnit(UnitStage):
    """One unit from its scored documents and saved generations to shards and a manifest."""

    name = "finalize"
    adds = ("unit", "manifest")
    output_schema = pa.schema([("unit", pa.string()), ("manifest", pa.string())])

    def __init__(self, cfg: RunConfig, *, out_dir: str, probability: float, generation_key: str, duplicates: dict[str, list[int]]):
        self.out_dir = out_dir
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
            table = attach_generations(table, cached_generations(out, unit.key, self.generation_key) if self.generation.enabled else None,
                                       gen=self.generation, unit=unit.key)
            failed = table.filter(pc.starts_with(pc.fill_null(table.column("reflection_status"), ""), "failed"))
            failed_rows = failed.num_rows
            if failed.num_rows:
                write_table(out / REJECTED_GENERATIONS / f"{unit.key}.parquet", pa.table({
                    "doc_id": failed.column("doc_id"), "source_file": failed.column("source_file"),
                    "source_row": failed.column("source_row"), "reason": failed.column("reflection_status"),
                    "reply": failed.column(FAILED_REPLY)}))
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
        manifest = {"unit": unit.key, "rows": unit.rows, "shards": shards, "stats": stats}
        write_json(out / DONE / f"{unit.key}.json", manifest)
        return manifest


def _reasons(out: Path, unit: Unit) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in sorted((out / REJECTED_DOCUMENTS).glob(f"{unit.key}-*.parquet")):
        for reason in pq.read_table(p, columns=["reason"]).column("reason").to_pylist():
            key = reason.split(":", 1)[0]
            counts[key] = counts.get(key, 0) + 1
    return counts
