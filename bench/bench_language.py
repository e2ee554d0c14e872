"""Benchmark: the language stage (`LanguageIdentifier`, fastText lid.176) vs the plain library call
on the same documents, beside the safety scorer's stage, one core each.

    .venv/bin/python bench/bench_language.py [--docs 100000] [--repeat 3] [--batch 1024]

The documents are the shared web corpus, repeated to `--docs`. "Plain" is fastText's own
`model.predict(lines, k=1)` over the whole texts with newlines turned into spaces (what the model
needs, nothing more); the stage reads each text's first 1,000 characters with whitespace
collapsed and builds the two Arrow columns, batch by batch as pass 1 does; a last row runs the
plain call on those same shortened lines (the stage's own overhead). Prints one row per
repetition and the medians: documents/s per core and the ratio to the plain call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from annotator.core.stages import Resources  # noqa: E402
from annotator.score.language import LanguageIdentifier, model_lines, model_path  # noqa: E402
from annotator.score.safety import FastTextSafetyScorer  # noqa: E402

CORPUS = REPO.parent / "shared" / "data" / "corpus"
SCORER = REPO / "classifiers" / "models" / "safety-fasttext-v2.ftz"


def corpus(n: int) -> list[str]:
    texts = [t for f in sorted(CORPUS.glob("*.parquet")) for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    return [texts[i % len(texts)] for i in range(n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core for every contestant
    import fasttext

    texts = corpus(args.docs)
    batches = [pa.table({"text": texts[i:i + args.batch]}) for i in range(0, len(texts), args.batch)]
    plain = fasttext.load_model(str(model_path()))
    stage = LanguageIdentifier()
    stage.setup()
    scorer = FastTextSafetyScorer(model=str(SCORER), version="bench", resources=Resources())
    scorer.setup()
    rows = []
    for rep in range(args.repeat):
        t_plain = timed(lambda: [plain.predict([t.replace("\n", " ") for t in texts[i:i + args.batch]], k=1)
                                 for i in range(0, len(texts), args.batch)])
        t_stage = timed(lambda: [stage.process(b) for b in batches])
        t_scorer = timed(lambda: [scorer.process(b) for b in batches])
        t_same = timed(lambda: [plain.predict(model_lines(texts[i:i + args.batch]), k=1) for i in range(0, len(texts), args.batch)])
        rows.append((args.docs / t_plain, args.docs / t_stage, args.docs / t_scorer, args.docs / t_same))
        print(f"repetition {rep + 1}: plain {rows[-1][0]:,.0f}  language stage {rows[-1][1]:,.0f}  safety stage {rows[-1][2]:,.0f}  "
              f"plain on the stage's lines {rows[-1][3]:,.0f} docs/s/core", flush=True)
    plain_m, stage_m, scorer_m, same_m = (statistics.median(r[i] for r in rows) for i in range(4))
    ratios = [r[1] / r[0] for r in rows]
    print()
    print("| what | docs | cores | docs/s/core (median of %d) | ratio to plain |" % args.repeat)
    print("|---|---:|---:|---:|---:|")
    print(f"| fastText lid.176 plain `predict` (whole text) | {args.docs:,} | 1 | {plain_m:,.0f} | 1.00 |")
    print(f"| language stage (`LanguageIdentifier`) | {args.docs:,} | 1 | {stage_m:,.0f} | {statistics.median(ratios):.2f} "
          f"({' / '.join(f'{r:.2f}' for r in ratios)}) |")
    print(f"| plain `predict` on the stage's lines (first 1,000 characters) | {args.docs:,} | 1 | {same_m:,.0f} | "
          f"{statistics.median(r[3] / r[0] for r in rows):.2f} |")
    print(f"| safety stage (`FastTextSafetyScorer`, same documents) | {args.docs:,} | 1 | {scorer_m:,.0f} | |")


if __name__ == "__main__":
    main()
