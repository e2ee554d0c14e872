"""Benchmark: the safety-scoring stage inside the Ray pipeline vs a plain loop over the same
model's own predict, on the same documents (the shared web corpus replicated with new ids).

    .venv/bin/python bench/bench_scoring.py [--docs 100000] [--cores 2] [--repeat 3] [--plain-processes]
                                            [--model classifiers/models/safety-fasttext-v3.ftz] [--precision FILE|none] [--transformers-docs 2000]

With a precision stage (the default model's, on by default) the pipeline runs the whole scorer
(first stage, precision stage on what it scores >= 2) and the plain loop stays plain fastText: the
first model's predict alone, so the ratio says what the whole scorer costs against plain fastText.
Prints a table with documents/s and documents/s per core for both, and their ratio: the median
over `--repeat` repetitions, each the plain loop followed by the Ray pipeline on a fresh local
Ray instance (the machine's speed drifts over minutes, so each ratio compares neighbours).
Also printed: where the cores' time went during each Ray run (task workers, Ray's own
processes and Ray Data's actors, the hypervisor), and the seconds spent inside the stages.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from annotator.config import ClassifierConfig, InputConfig  # noqa: E402
from annotator.score.reader import ReadUnits, units_dataset  # noqa: E402
from annotator.core.units import plan_input  # noqa: E402
from annotator.score.safety import FastTextSafetyScorer, TransformersSafetyScorer, SafetyScorer, build_scorer  # noqa: E402
from annotator.core.ray_adapter import apply_stages, configure_backpressure  # noqa: E402
from annotator.core.stages import TIMING_PREFIX, InProcess, Resources  # noqa: E402

CORPUS = REPO.parent / "shared" / "data" / "corpus"


def replicated_corpus(n_docs: int, out_dir: Path, *, docs_per_file: int = 10_000) -> list[str]:
    """The sample corpus repeated to `n_docs` rows with fresh ids, as Parquet files."""
    base = pa.concat_tables([pq.read_table(f, columns=["id", "text"]) for f in sorted(CORPUS.glob("*.parquet"))])
    texts = base.column("text").to_pylist()
    rows = [texts[i % len(texts)] for i in range(n_docs)]
    paths = []
    for part, start in enumerate(range(0, n_docs, docs_per_file)):
        chunk = rows[start : start + docs_per_file]
        path = out_dir / f"part-{part:05d}.parquet"
        pq.write_table(pa.table({"id": [f"rep-{start + i}" for i in range(len(chunk))], "text": chunk}), path)
        paths.append(str(path))
    return paths


def plain_loop(scorer: SafetyScorer, paths: list[str], *, batch_size: int) -> tuple[int, float]:
    """The model's own predict over the same texts, one process, no Ray."""
    n = 0
    started = time.perf_counter()
    for path in paths:
        texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
        for start in range(0, len(texts), batch_size):
            scorer.predict_probs(texts[start : start + batch_size])
            n += len(texts[start : start + batch_size])
    return n, time.perf_counter() - started


def _plain_worker(model: str, paths: list[str], batch_size: int, barrier) -> tuple[int, float, float]:
    scorer = FastTextSafetyScorer(model=model, version=Path(model).stem, resources=Resources())
    scorer.setup()
    barrier.wait()  # every process starts its loop at the same moment, model loaded
    started = time.time()
    n, _ = plain_loop(scorer, paths, batch_size=batch_size)
    return n, started, time.time()


def plain_loop_processes(model: str, paths: list[str], *, processes: int, batch_size: int) -> tuple[int, float]:
    """The plain loop in `processes` processes at once, each over every `processes`-th file: the
    same loop with all cores busy, as they are in the Ray run (cores share caches and memory
    bandwidth, and the machine's other work then runs on a busy core)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")  # the parent runs Ray's threads: no fork
    with ctx.Manager() as manager, ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        barrier = manager.Barrier(processes)
        parts = [pool.submit(_plain_worker, model, paths[i::processes], batch_size, barrier) for i in range(processes)]
        done = [part.result() for part in parts]
    return sum(n for n, _, _ in done), max(end for _, _, end in done) - min(start for _, start, _ in done)


def ray_stage(scorer: SafetyScorer, paths: list[str], *, layout: str = "in-process", stats: bool = False) -> tuple[int, float]:
    """Whole pipeline wall time, start-up (workers, model loads) included. `in-process` is how the
    pipeline runs a CPU scorer (one task per unit reads and scores it); `separate` runs reader
    tasks and scorer tasks as two Ray Data operators, the documents passing through the object store."""

    started = time.perf_counter()
    cfg = InputConfig(paths=paths, rows_per_unit=10_000)
    reader = ReadUnits(cfg, extra_columns={})
    if layout == "in-process":
        stages = [InProcess([reader, scorer], resources=Resources(num_cpus=scorer.resources.num_cpus, batch_size=1))]
    else:
        reader.resources = Resources(num_cpus=0.5, batch_size=1)  # as the pipeline's reader was before commit 92eae63
        stages = [reader, scorer]
    ds = apply_stages(units_dataset(plan_input(paths, cfg).units), stages)
    # Each stage's own time per document (the pipeline's timing columns), summed: the time spent
    # inside the stages, apart from Ray's part of a task.
    timing = [TIMING_PREFIX + stage.name for stage in (reader, scorer)]
    scores = ds.select_columns(["safety_score", *timing])
    n, in_stages = 0, dict.fromkeys(timing, 0.0)
    for batch in scores.iter_batches(batch_size=None, batch_format="pyarrow"):
        n += batch.num_rows
        for col in timing:
            in_stages[col] += pc.sum(batch.column(col)).as_py()
    seconds = time.perf_counter() - started
    print("seconds inside the stages (all workers): " + ", ".join(f"{k[len(TIMING_PREFIX):]} {v:.1f}" for k, v in in_stages.items()), flush=True)
    if stats:
        print(scores.stats(), flush=True)  # Ray Data's per-operator task, wall and CPU times
    return n, seconds


def cpu_seconds_by_process() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of this process and of every process under it (the
    local Ray cluster that ray.init started), by pid, with what the process is."""
    from bench_e2e import _describe

    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            kind = _describe(proc, me.pid)
        except psutil.NoSuchProcess:
            continue
        # A task worker is renamed after what it runs (ray::IDLE between tasks): one group.
        if kind == "ray::IDLE" or kind.startswith("ray::MapBatches"):
            kind = "ray task workers"
        out[proc.pid] = (kind, times.user + times.system)
    return out


def machine_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine spent busy so far (all cores, /proc/stat), and the seconds
    the hypervisor gave its cores to other machines (steal)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq, t.steal


def cpu_report(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], busy: float, steal: float, wall: float, cores: int) -> str:
    used: dict[str, float] = {}
    for pid, (kind, sec) in after.items():
        used[kind] = used.get(kind, 0.0) + sec - before.get(pid, ("", 0.0))[1]
    lines = [f"CPU seconds during the Ray run ({wall:.1f} s wall, {cores} cores = {wall * cores:.1f} core-s; "
             f"machine busy {busy:.1f} core-s = {busy / (wall * cores):.0%}, stolen by the hypervisor {steal:.1f} core-s):"]
    for kind, sec in sorted(used.items(), key=lambda kv: -kv[1]):
        if sec >= 0.05:
            lines.append(f"  {kind:<40} {sec:8.1f} s  {sec / (wall * cores):6.1%}")
    return "\n".join(lines)


def row(name: str, n: int, seconds: float, cores: int) -> dict:
    return {"name": name, "docs": n, "seconds": seconds, "cores": cores, "docs_s": n / seconds, "per_core": n / seconds / cores}


def start_ray(cores: int) -> None:
    import ray.data

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    configure_backpressure()  # as the pipeline does (matters for --layout separate)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--model", default=ClassifierConfig().model, help="fastText model (default: the config's, v3)")
    ap.add_argument("--precision", default="default",
                    help="precision stage model, `none`, or `default` (v3's beside the model when --model is v3, else none)")
    ap.add_argument("--batch-size", type=int, default=4096, help="documents per scoring batch in both runs")
    ap.add_argument("--layout", default="in-process", choices=["in-process", "separate"],
                    help="fastText: one task per unit reads and scores it (the pipeline's way), or reader and scorer "
                         "tasks as two operators")
    ap.add_argument("--repeat", type=int, default=3,
                    help="repetitions of the fastText comparison (plain loop, then Ray on a fresh local instance); "
                         "the ratio printed is the median")
    ap.add_argument("--plain-again", action="store_true",
                    help="run the plain loop a second time after the Ray run; the ratio is then against the faster of the two")
    ap.add_argument("--plain-processes", action="store_true",
                    help="also run the plain loop in --cores processes at once (all cores busy, as in the Ray run)")
    ap.add_argument("--stats", action="store_true", help="print Ray Data's per-operator statistics of the fastText run")
    ap.add_argument("--transformers-docs", type=int, default=2000, help="0 skips the transformers backend")
    ap.add_argument("--transformers-model", default=None, help="default: the MiniLM test classifier in $SPP_CACHE")
    args = ap.parse_args()
    import ray

    results, reps = [], []  # every row in the order measured; the fastText rows of each repetition

    def record(r: dict) -> dict:
        results.append(r)
        return r

    with tempfile.TemporaryDirectory() as tmp:
        paths = replicated_corpus(args.docs, Path(tmp))
        model = str(REPO / args.model)
        plain = FastTextSafetyScorer(model=model, version=Path(model).stem, resources=Resources())
        plain.setup()
        cfg = ClassifierConfig(model=model, version=Path(model).stem, precision={"model": None if args.precision == "none" else args.precision})
        precision = cfg.precision.model
        # One CPU per task, as the pipeline's default `classifier.num_cpus`.
        staged = build_scorer(cfg, resources=Resources(num_cpus=1, batch_size=args.batch_size))
        whole = build_scorer(cfg, resources=Resources())
        whole.setup()
        label = "whole scorer" if precision else "fasttext"
        # The machine's speed drifts by 10-20% over minutes (shared host): each repetition runs the
        # plain loop(s) right before the Ray run, and the ratio is taken within a repetition.
        for rep in range(1, args.repeat + 1):
            tag = f" #{rep}" if args.repeat > 1 else ""
            this = {"plain": [record(row(f"fasttext plain loop (predict){tag}", *plain_loop(plain, paths, batch_size=args.batch_size), cores=1))]}
            if precision:
                before = whole.rescored
                this["whole"] = record(row(f"whole scorer plain loop{tag}", *plain_loop(whole, paths, batch_size=args.batch_size), cores=1))
                this["rescored"] = (whole.rescored - before) / max(1, this["whole"]["docs"])
            if args.plain_processes:
                this["parallel"] = record(row(f"fasttext plain loop, {args.cores} processes{tag}", *plain_loop_processes(
                    model, paths, processes=args.cores, batch_size=args.batch_size), cores=args.cores))
            # A fresh local Ray instance for every run, as a pipeline job starts with its own
            # workers: their start-up, imports and model loads are in every run's wall time.
            start_ray(args.cores)
            cpu_before, machine_before = cpu_seconds_by_process(), machine_seconds()
            n, seconds = ray_stage(staged, paths, layout=args.layout, stats=args.stats)
            # Where the cores' time went: the scoring workers, and what Ray itself (raylet, GCS,
            # Ray Data's actors, the driver) and the rest of the machine took from the same cores.
            busy, steal = (after - before for after, before in zip(machine_seconds(), machine_before))
            print(f"\nrun{tag}: " + cpu_report(cpu_before, cpu_seconds_by_process(), busy, steal, seconds, args.cores), flush=True)
            this["ray"] = record(row(f"{label} Ray pipeline (wall){tag}", n, seconds, cores=args.cores))
            ray.shutdown()
            if args.plain_again:
                # The plain loop after the Ray run too; the ratio is then against the faster of the two.
                this["plain"].append(record(row(f"fasttext plain loop, again{tag}", *plain_loop(plain, paths, batch_size=args.batch_size), cores=1)))
            reps.append(this)

        if args.transformers_docs:
            from classifiers.build_test_classifier import build, default_out

            start_ray(args.cores)
            tmodel = args.transformers_model or str(build(out=default_out()))
            (Path(tmp) / "t").mkdir()
            small = replicated_corpus(args.transformers_docs, Path(tmp) / "t", docs_per_file=500)
            t_plain = TransformersSafetyScorer(model=tmodel, version="t", resources=Resources(), max_length=512)
            t_plain.setup()
            # torch runs one intra-op thread per core in both cases, so both count all cores.
            results.append(row("transformers plain loop (forward)", *plain_loop(t_plain, small, batch_size=256), cores=args.cores))
            t_staged = TransformersSafetyScorer(model=tmodel, version="t", resources=Resources(num_cpus=1, concurrency=1, batch_size=256), max_length=512)
            # The actor reserves 1 CPU, so Ray gives torch one thread (OMP_NUM_THREADS=1): one core.
            results.append(row("transformers Ray pipeline (wall)", *ray_stage(t_staged, small, layout="separate"), cores=1))

    print(f"\n{'what':<40} {'docs':>8} {'cores':>5} {'seconds':>8} {'docs/s':>9} {'docs/s/core':>12}")
    for r in results:
        print(f"{r['name']:<40} {r['docs']:>8} {r['cores']:>5} {r['seconds']:>8.1f} {r['docs_s']:>9.0f} {r['per_core']:>12.0f}")
    ratios = [rep["ray"]["per_core"] / max(r["per_core"] for r in rep["plain"]) for rep in reps]
    per_core = [rep["ray"]["per_core"] for rep in reps]
    each = f" (median of {len(ratios)}: {', '.join(f'{x:.2f}' for x in ratios)})" if len(ratios) > 1 else ""
    print(f"\n{label}: Ray pipeline / plain fastText loop{' (the faster run)' if args.plain_again else ''}, per core = "
          f"{statistics.median(ratios):.2f}{each}; Ray pipeline per core "
          f"{statistics.median(per_core):.0f} docs/s (target >= {1500 if precision else 2000})")
    if precision:
        whole_ratio = [rep["whole"]["per_core"] / rep["plain"][0]["per_core"] for rep in reps]
        print(f"whole scorer plain loop / plain fastText loop = {statistics.median(whole_ratio):.2f}; precision stage rescored "
              f"{statistics.median(rep['rescored'] for rep in reps):.2%} of the documents")
    parallel = [rep["ray"]["per_core"] / rep["parallel"]["per_core"] for rep in reps if "parallel" in rep]
    if parallel:
        each = f" (median of {len(parallel)}: {', '.join(f'{x:.2f}' for x in parallel)})" if len(parallel) > 1 else ""
        print(f"fastText: Ray pipeline / plain loop in {args.cores} processes, per core = {statistics.median(parallel):.2f}{each}")
    transformers = [r for r in results if r["name"].startswith("transformers")]
    if transformers:
        print(f"transformers: Ray stage / plain loop, per core = {transformers[1]['per_core'] / transformers[0]['per_core']:.2f}")


if __name__ == "__main__":
    main()
