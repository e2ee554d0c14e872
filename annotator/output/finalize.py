"""Pass 2b: finalizing a unit (select, attach the saved generations, splice, write shards and
the unit's safety annotations, manifest). Which documents need the engine, and saving what it
produced, is `generate.cache`.

Generation results are saved per batch, so a crash loses at most the batches in flight; a unit's
shards are written from its whole scored set, so their names and contents do not depend on how
Ray happened to batch the rows or on where an earlier run stopped.
"""

from __future__ import annotations

import glob
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from annotator.core import layout, storage
from annotator.core.checkpoint import write_json, write_table
from annotator.generate.cache import cached_generations
from annotator.score.store import read_unit_scored, rejected_count
from annotator.core.layout import DONE, REJECTED_DOCUMENTS, REJECTED_DUPLICATES, REJECTED_GENERATIONS
from annotator.config import RunConfig
from annotator.generate.cache import drop_duplicates, generator_stage, needs_generation
from annotator.generate.generator import FAILED_REPLY, SHARED_COLUMNS, NoGeneration, column_defaults
from annotator.method.resolved import ResolvedRun
from annotator.method.recipes import Recipe
from annotator.score.selection import SelectForReflection
from annotator.core.stages import TIMING_PREFIX, Resources, UnitStage
from annotator.core.units import Unit
from annotator.output.writer import ShardWriter, TrainingText


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


def finalize_stages(cfg: RunConfig, *, out_dir: str, resolved: ResolvedRun) -> tuple[TrainingText, ShardWriter]:
    """The per-unit chain after generation, built once: the pipeline's chain check, its reserved
    columns and `FinalizeUnit` all use it."""
    sections, recipes, streams = list(resolved.sections), resolved.pairs, list(resolved.streams)
    block = cfg.generation.annotations.max_block_tokens
    enabled = cfg.generation.enabled
    return (TrainingText(cfg.output, content_tokens=cfg.content_tokens, sections=sections, annotation_tokens=block, streams=streams,
                         generation_enabled=enabled),
            ShardWriter(out_dir=out_dir, output=cfg.output, sections=sections, annotation_tokens=block, streams=streams,
                        recipes=recipes, generation_enabled=enabled))


# The safety annotations of a run, as the SPP method publishes them: one row per scored document,
# in input order; written per unit because a filtered baseline's shards lack the dropped documents.
SAFETY_ANNOTATIONS_SCHEMA = pa.schema([("id", pa.string()), ("safety_score", pa.int8()), ("safety_probs", pa.list_(pa.float32()))])


def safety_annotations(scored: pa.Table) -> pa.Table:
    """`id`, `safety_score`, `safety_probs` of `scored` (a unit's documents, duplicates dropped)."""
    columns = [scored.column(c) for c in ("doc_id", "safety_score", "safety_probs")]
    return pa.Table.from_arrays([c.cast(t) for c, t in zip(columns, SAFETY_ANNOTATIONS_SCHEMA.types)], schema=SAFETY_ANNOTATIONS_SCHEMA)


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
    """One unit from its scored documents and saved generations to shards, its safety annotations
    and a manifest."""

    name = "finalize"
    adds = ("unit", "manifest")
    output_schema = pa.schema([("unit", pa.string()), ("manifest", pa.string())])

    def __init__(self, cfg: RunConfig, *, out_dir: str, probability: float, generation_key: str, duplicates: dict[str, list[int]],
                 resolved: ResolvedRun):
        self.out_dir = out_dir
        self.cfg = cfg
        self.select = SelectForReflection(cfg.selection, probability=probability)
        self.generation = cfg.generation
        self.generation_key = generation_key
        self.duplicates = duplicates
        self.recipes = list(resolved.recipes)
        self.splice, self.writer = finalize_stages(cfg, out_dir=out_dir, resolved=resolved)
        # A whole CPU each: a task holds a whole unit, so fewer at once keeps memory down.
        self.resources = Resources(num_cpus=1, batch_size=1)

    def setup(self) -> None:
        self.writer.setup()

    def process_unit(self, unit: Unit, row: dict) -> list[dict]:
        return [{"unit": unit.key, "manifest": json.dumps(self.finalize(unit))}]

    def finalize(self, unit: Unit) -> dict:
        out = storage.location(self.out_dir)
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
            write_table(layout.safety_annotations_path(out, unit.key), safety_annotations(kept))
            table = self.select.process(kept)
            cache = cached_generations(out, unit.key, key=self.generation_key) if self.generation.enabled else None
            table = attach_generations(table, cache, cfg=self.cfg, unit=unit.key)
            failed = failed_generations(table, self.recipes) if self.generation.enabled else None
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
    for p in sorted((out / REJECTED_DOCUMENTS).glob(f"{glob.escape(unit.key)}-*.parquet"), key=str):
        for reason in storage.read_table(p, columns=["reason"]).column("reason").to_pylist():
            key = reason.split(":", 1)[0]
            counts[key] = counts.get(key, 0) + 1
    return counts
