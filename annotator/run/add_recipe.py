"""Adding recipes to a finished run (`--add-recipe`): a new track over the same corpus, without
rescoring or regenerating anything.

A finished run already holds everything a new recipe needs: its windows' documents, in window
order, with their text, scores and selection are the sidecar (`tokenized/sidecar/<unit>.parquet`),
and run.json records the config. The add pass plans engine batches from the sidecars, generates
only the new recipes (saved per batch under `_work/generated-<recipes>/`), then per unit writes
the new recipes' streams over the same windows, rewrites the sidecar with their columns added, and
records them in the unit's manifest last; a rerun of the same command resumes, as every run does.
Text shards, the other streams and their files stay byte for byte as they were.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from annotator.core import layout, storage
from annotator.core.checkpoint import (OPERATIONAL_FIELDS, config_differences, content_fingerprint, digest, output_settings, write_json,
                                      write_table)
from annotator.generate.cache import cached_generations
from annotator.core.layout import DONE, REJECTED_GENERATIONS, RUN_FILE, SELECTION, generated_dir
from annotator.config import RunConfig
from annotator.generate.cache import generation_stage, plan_batches
from annotator.output.finalize import attach_generations, failed_generations
from annotator.generate.generator import FAILED_REPLY, SHARED_COLUMNS, generator_columns
from annotator.method.prompt_packs import PackError
from annotator.method.recipes import Recipe, load_recipe, recipe_spec, run_recipes
from annotator.core.ray_adapter import cluster_resources, run_stages
from annotator.core.stages import Resources, UnitStage
from annotator.output.stats import recipe_stats
from annotator.output.tokenized import training_tokenizer
from annotator.core.units import InputPlan, RejectedFile, Unit, units_from_json
from annotator.output.writer import StreamWriter
from annotator.method.resolved import ResolvedRun, resolve_run
from annotator.run.shared_output import check_nodes_see_output

# What a new recipe must share with the run it is added to: a difference here is refused.
SHARED_SECTIONS = ("input", "classifier", "selection", "output")
SHARED_GENERATION = ("max_reflection_tokens", "seed", "pause", "canaries", "annotations")


class AddRecipeError(ValueError):
    """A recipe that cannot be added to this output as asked."""


def recorded_config(out_dir: Path) -> tuple[dict, RunConfig, InputPlan]:
    path = out_dir / RUN_FILE
    if not path.exists():
        raise AddRecipeError(f"{out_dir} holds no run of this tool (no {RUN_FILE})")
    record = json.loads(path.read_text())
    if "config" not in record:
        raise AddRecipeError(f"{path} predates recorded configs; rerun the original command with the recipe in generation.recipes")
    plan = InputPlan(units=units_from_json(record["plan"]),
                     rejected_files=[RejectedFile(**r) for r in record["plan"].get("rejected_files", [])])
    return record, RunConfig.model_validate(record["config"]), plan


def comparable(cfg: RunConfig) -> dict:
    tree = cfg.model_dump(mode="json")
    out = {s: tree[s] for s in SHARED_SECTIONS}
    for name in OPERATIONAL_FIELDS["output"]:
        out["output"].pop(name, None)
    out["generation"] = {k: tree["generation"][k] for k in SHARED_GENERATION}
    return out


def plan_added(out_dir: Path, names: list[str], *, given: RunConfig | None) -> tuple[RunConfig, InputPlan, list[Recipe]]:
    """The run's config with `names` added (refused, naming why, when that cannot be done)."""
    record, cfg, plan = recorded_config(out_dir)
    recorded = record.get("output_settings", {}).get("files", {})
    changed = config_differences(recorded, {k: v for k, v in output_settings(cfg)["files"].items() if k in recorded}, prefix="files.")
    if changed:
        raise AddRecipeError(f"the files of the run's method in {out_dir} changed since it was written ({'; '.join(changed[:8])}); "
                             "restore them, or rerun with --overwrite")
    if given is not None:
        diff = config_differences(comparable(cfg), comparable(given))
        if diff:
            raise AddRecipeError(f"the config differs from the run in {out_dir} where a new recipe must match it: {'; '.join(diff[:8])}")
    if cfg.output.layout != "windows":
        raise AddRecipeError(f"--add-recipe adds streams over the windows of a run; {out_dir} was written with output.layout={cfg.output.layout}")
    if not cfg.generation.enabled:
        raise AddRecipeError(f"{out_dir} is a score-and-select run (generation.enabled=false): it has no windows to add a recipe to")
    specs = [recipe_spec(n) for n in names]
    try:
        added_names = [load_recipe(s).name for s in specs]
    except PackError as err:
        raise AddRecipeError(str(err)) from None
    run_names = [r.name for r in run_recipes(cfg.generation)]
    present = [n for n in added_names if n in run_names]
    if present:
        raise AddRecipeError(f"{present} already in the run's recipes {run_names}")
    # The given config's generation settings (the engine, sampling, new recipes' packs), with the
    # run's own recipes and packs kept as they were written.
    tree = (given or cfg).model_dump(mode="json")
    tree["output"]["path"] = str(out_dir)
    gen = tree["generation"]
    gen["recipes"] = [*cfg.generation.recipes, *specs]
    gen["prompt_pack"] = cfg.generation.prompt_pack
    gen["packs"] = {**{n: p for n, p in gen["packs"].items() if n in added_names}, **cfg.generation.packs}
    new_cfg = RunConfig.model_validate(tree)
    recipes = [r for r in run_recipes(new_cfg.generation) if r.name in added_names]
    wide = [r.name for r in recipes if r.applies_to == "all"]
    if wide:
        raise AddRecipeError(f"{wide} would annotate documents outside the windows; add it with annotations.apply_to=selected, or rerun")
    unfinished = [p for p in plan.units if not (out_dir / DONE / f"{p.key}.json").exists()]
    if unfinished:
        raise AddRecipeError(f"the run in {out_dir} is not finished ({len(unfinished)} units without a manifest): rerun its command first")
    return new_cfg, plan, recipes


def sidecar_table(out_dir: Path, unit: str) -> pa.Table | None:
    path = layout.sidecar_path(out_dir, unit)
    return storage.read_table(path) if path.exists() else None


class PlanAddedGeneration(UnitStage):
    """Per unit: the windows' documents the added recipes apply to, in input order, cut into engine
    batches (those already saved are left out)."""

    name = "plan_generation"
    adds = ("_unit", "batch_index", "doc_ids", "texts", "selected_flags", "bad_flags", "languages")
    resources = Resources(num_cpus=0.25, batch_size=1)

    def __init__(self, *, out_dir: str, batch_size: int, pass_name: str):
        from annotator.generate.cache import PlanGeneration

        self.output_schema = PlanGeneration.output_schema
        self.out_dir = out_dir
        self.batch_size = batch_size
        self.pass_name = pass_name

    def process_unit(self, unit: Unit, row: dict) -> list[dict]:
        side = sidecar_table(storage.location(self.out_dir), unit.key)
        if side is None or not side.num_rows:
            return []
        docs = side.select([c for c in ("doc_id", "text", "is_bad", "source_row", "language") if c in side.column_names]).sort_by("source_row")
        docs = docs.append_column("selected", pa.array([True] * docs.num_rows))
        return plan_batches(docs, unit=unit.key, out_dir=storage.location(self.out_dir), batch_size=self.batch_size, pass_name=self.pass_name)


class AddRecipeUnit(UnitStage):
    """Per unit: the added recipes' streams over its windows, its sidecar with their columns, and
    its manifest (last) listing them."""

    name = "add_recipe"
    adds = ("unit", "manifest")
    output_schema = pa.schema([("unit", pa.string()), ("manifest", pa.string())])

    def __init__(self, cfg: RunConfig, *, out_dir: str, resolved: ResolvedRun, added: ResolvedRun, generation_key: str, pass_name: str):
        self.cfg = cfg
        self.out_dir = out_dir
        self.recipes = list(added.recipes)
        self.generation_key = generation_key
        self.pass_name = pass_name
        self.sections = list(resolved.sections)
        self.packs = added.pairs
        self.streams = list(added.streams)
        self.resources = Resources(num_cpus=1, batch_size=1)

    def process_unit(self, unit: Unit, row: dict) -> list[dict]:
        out = storage.location(self.out_dir)
        manifest_path = out / DONE / f"{unit.key}.json"
        manifest = json.loads(manifest_path.read_text())
        names = [r.name for r in self.recipes]
        if all(n in manifest.get("recipes", []) for n in names):
            return [{"unit": unit.key, "manifest": json.dumps(manifest)}]  # added by an earlier attempt
        side = sidecar_table(out, unit.key)
        stats = manifest["stats"]
        if side is not None and side.num_rows:
            side = self._without_added(side)
            cache = cached_generations(out, unit.key, key=self.generation_key, pass_name=self.pass_name)
            table = attach_generations(side.drop_columns(["window"]), cache, cfg=self.cfg, unit=unit.key, recipes=self.recipes,
                                       needed=pa.array([True] * side.num_rows), shared=False)
            failed = failed_generations(table, self.recipes)
            if failed.num_rows:
                write_table(out / REJECTED_GENERATIONS / f"{unit.key}.{self.pass_name}.parquet", failed)
            table = table.drop_columns([FAILED_REPLY])
            writer = StreamWriter(out_dir=self.out_dir, output=self.cfg.output, sections=self.sections,
                                  annotation_tokens=self.cfg.generation.annotations.max_block_tokens, streams=self.streams)
            sizes = writer.write_added(table, unit.key, compression=self.cfg.output.compression)
            tok = training_tokenizer(self.cfg.output, self.sections)
            for recipe, pack in self.packs:
                placed = [s.field for s in self.streams if s.recipe.name == recipe.name]
                stats.setdefault("recipes", {})[recipe.name] = recipe_stats(table, recipe=recipe, pack=pack, placed=placed, tokenizer=tok)
            stats.setdefault("streams", {}).update(sizes)
            usage = stats.setdefault("generation_tokens", {})
            for key, column in (("prompt", "prompt_tokens"), ("cached_prompt", "cached_prompt_tokens"), ("output", "generated_tokens")):
                usage[key] = usage.get(key, 0) + sum(int(pc.sum(table.column(r.column(column))).as_py() or 0) for r in self.recipes)
            stats["generation_rejects"] = stats.get("generation_rejects", 0) + failed.num_rows
        manifest["recipes"] = [*manifest.get("recipes", []), *[n for n in names if n not in manifest.get("recipes", [])]]
        write_json(manifest_path, manifest)
        return [{"unit": unit.key, "manifest": json.dumps(manifest)}]

    def _without_added(self, side: pa.Table) -> pa.Table:
        """The sidecar as the run wrote it: columns of these recipes from an interrupted attempt dropped."""
        added = set(generator_columns(self.cfg.generation, self.recipes)) - set(SHARED_COLUMNS)
        added |= {f"window_tokens_{s.stream}" for s in self.streams}
        return side.drop_columns([c for c in side.column_names if c in added])


def add_recipes(out_dir: Path, names: list[str], *, given: RunConfig | None = None, lock=None, log=print) -> dict:
    """Adds `names` (built-in recipes or recipe files) to the finished run in `out_dir`; returns the updated stats. `lock`: the
    folder's `OutputLock` held by the caller, checked before anything is finalized."""
    from annotator.engine.resources import replica_cpus
    from annotator.run.pipeline import count_generated, finish_run, progress_for, saved_generations
    from annotator.score.reader import units_dataset

    out_dir = storage.location(out_dir)
    cfg, plan, recipes = plan_added(out_dir, names, given=given)
    check_nodes_see_output(out_dir, log=log)
    resolved = resolve_run(cfg.generation, voices=cfg.output.voices)
    added = resolve_run(cfg.generation, voices=cfg.output.voices, recipes=recipes)
    added_names = [r.name for r in recipes]
    pass_name = "+".join(added_names)
    # Keyed on the added packs' and recipe files' content and the canaries file too: an edit between
    # a crash and the resume makes a new key, so nothing generated with the old text is reused.
    gen_key = digest("add", pass_name, cfg.generation.model_dump(mode="json"), cfg.output.tokenizer, cfg.content_tokens,
                     {r.name: p.version for r, p in added.pairs}, content_fingerprint(cfg)["canary_file"],
                     *([{r.name: r.version for r in recipes if not r.builtin}] if any(not r.builtin for r in recipes) else []))
    started = time.time()
    pending = [u for u in plan.units if not all(n in json.loads((out_dir / DONE / f"{u.key}.json").read_text()).get("recipes", [])
                                                for n in added_names)]
    log(f"[spp] adding {added_names} to {out_dir}: {len(pending)} of {len(plan.units)} units to do")
    reused = saved_generations(out_dir, pending, pass_name=pass_name)
    # An earlier attempt of this add that was stopped: its written units or saved batches are kept.
    work = {"resumed": bool(reused) or len(pending) < len(plan.units), "added_recipes": added_names, "units": len(plan.units),
            "units_done_before": len(plan.units) - len(pending), "documents_scored": 0, "generations_reused": reused,
            "generations_made": 0, "engine_loads": 0, "batches_retried": 0, "units_finalized": len(pending)}
    timings = {"scoring_pass": 0.0, "generation_pass": 0.0, "finalize_pass": 0.0}
    if pending:
        t0 = time.time()
        cpus = replica_cpus(cfg, cluster_resources())
        stages = [PlanAddedGeneration(out_dir=str(out_dir), batch_size=cfg.generation.batch_size, pass_name=pass_name),
                  generation_stage(cfg, out_dir=str(out_dir), generation_key=gen_key, num_cpus=cpus, recipes=recipes, pass_name=pass_name)]
        with progress_for(cfg, None, label="pass 2a", stage="add-generate", log=log) as progress:
            for row in run_stages(units_dataset(pending), stages):
                count_generated(row, progress=progress, work=work)
        timings["generation_pass"] = time.time() - t0
        if lock is not None:
            lock.check()
        t0 = time.time()
        add = AddRecipeUnit(cfg, out_dir=str(out_dir), resolved=resolved, added=added, generation_key=gen_key, pass_name=pass_name)
        with progress_for(cfg, sum(u.rows for u in pending), label="pass 2b", stage="add-finalize", log=log) as progress:
            for row in run_stages(units_dataset(pending), [add]):
                progress.update(documents=json.loads(row["manifest"])["rows"])
        timings["finalize_pass"] = time.time() - t0
    if lock is not None:
        lock.check()
    record = json.loads((out_dir / RUN_FILE).read_text())
    record["output_settings"] = json.loads(json.dumps(output_settings(cfg)))
    record["config"] = cfg.model_dump(mode="json")
    write_json(out_dir / RUN_FILE, record)
    stats = finish_run(cfg, out_dir, plan=plan, state=json.loads((out_dir / SELECTION).read_text())
                       if (out_dir / SELECTION).exists() else {"probability": None},
                       timings=timings, started=started, work=work, log=log, resolved=resolved)
    if not cfg.output.keep_work:
        storage.remove_tree(generated_dir(out_dir, pass_name))
    return stats
