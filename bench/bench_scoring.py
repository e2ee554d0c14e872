"""Benchmark: the safety-scoring stage inside the Ray pipeline vs a plain loop over the same
model's own predict, on the same documents (the shared web corpus replicated with new ids).

    .venv/bin/python bench/bench_scoring.py [--docs 100000] [--cores 2] [--transformers-docs 2000]

Prints a table with documents/s and documents/s per core for both, and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from annotator.config import InputConfig  # noqa: E402
from annotator.reader import ReadUnits, units_dataset  # noqa: E402
from annotator.units import plan_input  # noqa: E402
from annotator.safety import FastTextSafetyScorer, TransformersSafetyScorer, SafetyScorer  # noqa: E402
from annotator.stages import InProcess, Resources, apply_stages, configure_backpressure  # noqa: E402

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


def ray_stage(scorer: SafetyScorer, paths: list[str], *, layout: str = "in-process", stats: bool = False) -> tuple[int, float]:
    """Whole pipeline wall time, start-up (workers, model loads) included. `in-process` is how the
    pipeline runs a CPU scorer (one task per unit reads and scores it); `separate` runs reader
    tasks and scorer tasks as two Ray Data operators, the documents passing through the object store."""
    import ray.data

    started = time.perf_counter()
    cfg = InputConfig(paths=paths, rows_per_unit=10_000)
    reader = ReadUnits(cfg, extra_columns={})
    if layout == "in-process":
        stages = [InProcess([reader, scorer], resources=Resources(num_cpus=scorer.resources.num_cpus, batch_size=1))]
    else:
        reader.resources = Resources(num_cpus=0.5, batch_size=1)  # as the pipeline's reader was before commit 92eae63
        stages = [reader, scorer]
    ds = apply_stages(units_dataset(plan_input(paths, cfg).units), stages)
    scores = ds.select_columns(["safety_score"])
    n = sum(b.num_rows for b in scores.iter_batches(batch_size=None, batch_format="pyarrow"))
    seconds = time.perf_counter() - started
    if stats:
        print(scores.stats(), flush=True)  # Ray Data's per-operator task, wall and CPU times
    return n, seconds


def row(name: str, n: int, seconds: float, cores: int) -> dict:
    return {"name": name, "docs": n, "seconds": seconds, "cores": cores, "docs_s": n / seconds, "per_core": n / seconds / cores}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4096, help="documents per scoring batch in both runs")
    ap.add_argument("--layout", default="in-process", choices=["in-process", "separate"],
                    help="fastText: one task per unit reads and scores it (the pipeline's way), or reader and scorer "
                         "tasks as two operators")
    ap.add_argument("--plain-again", action="store_true",
                    help="run the plain loop a second time after the Ray run; the ratio is then against the faster of the two")
    ap.add_argument("--stats", action="store_true", help="print Ray Data's per-operator statistics of the fastText run")
    ap.add_argument("--transformers-docs", type=int, default=2000, help="0 skips the transformers backend")
    ap.add_argument("--transformers-model", default=None, help="default: the MiniLM test classifier in $SPP_CACHE")
    args = ap.parse_args()

    import ray

    ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    configure_backpressure()  # as the pipeline does (matters for --layout separate)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = replicated_corpus(args.docs, Path(tmp))
        model = str(REPO / "classifiers" / "models" / "safety-fasttext-v1.ftz")
        plain = FastTextSafetyScorer(model=model, version="v1", resources=Resources())
        plain.setup()
        results.append(row("fasttext plain loop (predict)", *plain_loop(plain, paths, batch_size=args.batch_size), cores=1))
        # One CPU per task, as the pipeline's default `classifier.num_cpus`.
        staged = FastTextSafetyScorer(model=model, version="v1", resources=Resources(num_cpus=1, batch_size=args.batch_size))
        results.append(row("fasttext Ray pipeline (wall)", *ray_stage(staged, paths, layout=args.layout, stats=args.stats), cores=args.cores))
        if args.plain_again:
            # The plain loop's speed drifts with the machine by a few percent over minutes: a second
            # run after the Ray one, and the comparison against the faster, keeps the ratio honest.
            results.append(row("fasttext plain loop, again", *plain_loop(plain, paths, batch_size=args.batch_size), cores=1))

        if args.transformers_docs:
            from classifiers.build_test_classifier import build, default_out

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

    print(f"\n{'what':<36} {'docs':>8} {'cores':>5} {'seconds':>8} {'docs/s':>9} {'docs/s/core':>12}")
    for r in results:
        print(f"{r['name']:<36} {r['docs']:>8} {r['cores']:>5} {r['seconds']:>8.1f} {r['docs_s']:>9.0f} {r['per_core']:>12.0f}")
    fasttext = [r for r in results if r["name"].startswith("fasttext")]
    plain_best = max(r["per_core"] for r in fasttext if "plain" in r["name"])
    ft = fasttext[1]["per_core"] / plain_best
    print(f"\nfastText: Ray pipeline / plain loop{' (the faster run)' if args.plain_again else ''}, per core = {ft:.2f} "
          f"(target >= 0.8); Ray pipeline per core {fasttext[1]['per_core']:.0f} docs/s (target >= 2000)")
    transformers = [r for r in results if r["name"].startswith("transformers")]
    if transformers:
        print(f"transformers: Ray stage / plain loop, per core = {transformers[1]['per_core'] / transformers[0]['per_core']:.2f}")


if __name__ == "__main__":
    main()
