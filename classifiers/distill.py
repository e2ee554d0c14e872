"""Distil a transformers safety classifier (e.g. SafeLM's) into a 6-way fastText CPU scorer.

    python classifiers/distill.py --teacher locuslab/safety-classifier_gte-large-en-v1.5 \
        --corpus 'corpus/*.parquet' --sample 200000 --out classifiers/models/safety-fasttext-distilled.ftz

Scores a seeded sample of the corpus with the teacher, trains fastText on the teacher's 0-5 scores
(labels __label__score0..5) on 80% of it, and reports agreement on the other 20%: exact score,
bad/not-bad precision and recall against the teacher, and the confusion matrix.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator.score.safety import FastTextSafetyScorer, TransformersSafetyScorer  # noqa: E402
from annotator.score.safety_eval import agreement, format_confusion, score_texts  # noqa: E402
from annotator.core.stages import Resources  # noqa: E402
from classifiers.fasttext_training import train_fasttext  # noqa: E402


def sample_corpus(patterns: list[str], *, text_column: str, n: int, seed: int) -> list[str]:
    files = sorted(f for p in patterns for f in (glob.glob(p) if any(c in p for c in "*?[") else [p]))
    if not files:
        raise SystemExit(f"error: --corpus {patterns} matches no file")
    texts = pa.concat_arrays([pq.read_table(f, columns=[text_column]).column(0).combine_chunks() for f in files]).to_pylist()
    texts = [t for t in texts if t and t.strip()]
    rng = np.random.default_rng(seed)
    return [texts[i] for i in rng.permutation(len(texts))[:n]]


def distill(*, teacher: str, corpus: list[str], out: Path, sample: int, seed: int = 0, text_column: str = "text",
            max_length: int = 2048, num_gpus: float = 0, epoch: int = 10) -> dict:
    started = time.time()
    texts = sample_corpus(corpus, text_column=text_column, n=sample, seed=seed)
    scorer = TransformersSafetyScorer(model=teacher, version=teacher, resources=Resources(num_gpus=num_gpus), max_length=max_length)
    scorer.setup()
    teacher_scores, _ = score_texts(scorer, texts, batch_size=256)
    scored_at = time.time()
    cut = int(len(texts) * 0.8)
    train_fasttext(texts[:cut], [f"score{s}" for s in teacher_scores[:cut]], out=out, params={"epoch": epoch, "seed": seed})
    student = FastTextSafetyScorer(model=str(out), version=out.stem, resources=Resources())
    student.setup()
    student_scores, _ = score_texts(student, texts[cut:])
    report = {
        "teacher": teacher,
        "student": str(out),
        "sample": len(texts),
        "train_rows": cut,
        "teacher_score_histogram": {str(s): int((teacher_scores == s).sum()) for s in range(6)},
        "holdout": agreement(teacher_scores[cut:], student_scores),
        "teacher_docs_per_second": round(len(texts) / max(1e-9, scored_at - started), 1),
        "seconds": round(time.time() - started, 1),
    }
    out.with_suffix(".distill.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="transformers 6-label classifier: directory or Hub id")
    ap.add_argument("--corpus", required=True, nargs="+", help="Parquet files or globs")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--sample", type=int, default=100_000)
    ap.add_argument("--out", required=True, help="output .ftz path")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--num-gpus", type=float, default=0)
    ap.add_argument("--epoch", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    report = distill(teacher=args.teacher, corpus=args.corpus, out=Path(args.out), sample=args.sample, seed=args.seed,
                     text_column=args.text_column, max_length=args.max_length, num_gpus=args.num_gpus, epoch=args.epoch)
    hold = report["holdout"]
    print(f"teacher {report['teacher']} -> student {report['student']} on {report['sample']} documents "
          f"({report['train_rows']} train, {hold['n']} holdout)")
    print(f"exact score agreement {hold['exact_agreement']:.4f}; bad vs teacher: precision {hold['bad_vs_teacher']['precision']:.4f} "
          f"recall {hold['bad_vs_teacher']['recall']:.4f} F1 {hold['bad_vs_teacher']['f1']:.4f}")
    print(format_confusion(hold["confusion_matrix_teacher_rows_student_cols"]))
    return report


if __name__ == "__main__":
    main()
