"""Train the v3 safety scorer: a first fastText stage and a precision stage, both on the v2 data
plus the hard cases (classifiers/hard_cases.py), each with its own calibration; then measure them.

    python classifiers/train_safety_v3.py [--out-dir classifiers/models]

Stage 1 (`safety-fasttext-v3.ftz`, word unigrams as v2) scores every document. Stage 2
(`safety-fasttext-v3-precision.ftz`, word bigrams, which tell "kill a process" from "kill my
neighbour") rescores the documents stage 1 scores >= 2, and its calibration is fitted on exactly
those rows of the calibration split, the population it decides. The hard cases' dev split (held-out
templates, fillers and the harm data's dev prompts) is never trained on; it is measured per family.
Writes both models, their `.calibration.json` and `safety-fasttext-v3.metrics.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator.core.stages import Resources  # noqa: E402
from annotator.score.safety import FastTextSafetyScorer  # noqa: E402
from annotator.score.safety_eval import auroc, score_texts  # noqa: E402
from classifiers.fasttext_training import DEFAULT_PARAMS, train_fasttext  # noqa: E402
from classifiers.hard_cases import FAMILIES, as_rows, build_hard_cases  # noqa: E402
from classifiers.safety_data import QUALITY, Rows, concat_rows, expand, group_weights, in_calibration, training_rows  # noqa: E402
from classifiers.train_safety_v2 import V2_PARAMS, calibration_file, evaluate_model, fit_platt, raw_probability  # noqa: E402

STAGE1_PARAMS = dict(V2_PARAMS)
# Bigrams for the precision stage: the hard cases differ from harm in word pairs ("kill a
# process", "how to protect", "can't help"), which a bag of single words cannot see.
STAGE2_PARAMS = {**DEFAULT_PARAMS, "wordNgrams": 2, "minn": 0, "maxn": 0, "epoch": 5, "lr": 0.2}
PRECISION_THRESHOLD = 2
# The precision stage's calibration weighs the harmful class at this share of the total (v2's and
# stage 1's: 0.5, even odds). Chosen by leave-source-out validation (`--leave-source-out`): on
# sources it never saw, the cascade at even odds kept too little recall for what it took off the
# false-positive rate; see MODEL_CARD.md, "Choosing the operating point".
STAGE2_HARMFUL_SHARE = 0.7
# Leave-source-out folds: train without these harmful and benign sources (and without the hard
# cases built from the left-out harmful prompts), measure on all their rows.
FOLDS = (
    (("strongreject", "simplesafetytests", "do_not_answer"), ("truthfulqa", "safetext")),
    (("harmfulq", "catqa_en", "multijail_en"), ("coconot_pref_prompt", "nq_open")),
    (("ailuminate_demo_en", "harmfulqa"), ("coconot_contrast", "bbq")),
    (("aart", "cyberseceval_interpreter"), ("cyberseceval_mitre_frr", "coconot_eval", "medquad_drug_questions")),
)
# Each hard-case family counts as much as a capped source (GROUP_CAP effective rows at most).
HARD_QUALITY = {(f"hard_{family}", label): 1.0 for family, label in FAMILIES.items()}
WEB_REVIEW_V3 = Path(__file__).resolve().parent / "web_review_v3.json"


def fit_stage(rows: Rows, weights: np.ndarray, fit_idx: np.ndarray, *, out: Path, params: dict, seed: int):
    texts, labels = expand(rows.take(fit_idx), weights[fit_idx], seed=seed)
    return train_fasttext(texts, labels, out=out, params={**params, "seed": seed}), len(texts)


def calibrate_stage(model, rows: Rows, weights: np.ndarray, idx: np.ndarray, *, out: Path, about: str,
                    harmful_share: float = 0.5) -> dict:
    """Platt scaling fitted on rows `idx`, the harmful class weighted to `harmful_share` of the
    total and the benign class to the rest (0.5: q is P(harmful) at even odds)."""
    cal = rows.take(idx)
    w = weights[idx].copy()
    total = w.sum()
    for label, share in ((0, 1 - harmful_share), (1, harmful_share)):
        w[cal.label == label] *= share * total / w[cal.label == label].sum()
    a, b = fit_platt(raw_probability(model, cal.text), cal.label.astype(float), w)
    calibration = calibration_file(a, b, rows=cal, about=about)
    calibration["fitted_on"]["harmful_share_of_weight"] = harmful_share
    out.with_suffix(".calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    return calibration


def hard_case_metrics(scorer, cases) -> dict:
    """Per family of the hard cases' dev split: the share scored >= 3 (recall for harmful_howto,
    false-positive rate for the benign families), and refusals vs compliant answers as an AUROC."""
    scores, probs = score_texts(scorer, [c.text for c in cases])
    bad = probs[:, 3:].sum(axis=1)
    families = np.array([c.family for c in cases])
    out = {family: {"rows": int((families == family).sum()), "label": label, "share_scored_3_plus": round(float((scores[families == family] >= 3).mean()), 4)}
           for family, label in FAMILIES.items()}
    pair = np.isin(families, ["refusals", "harmful_howto"])
    out["refusals_vs_harmful_howto_auroc"] = round(auroc(bad[pair], (families[pair] == "harmful_howto").astype(int)), 4)
    return out


def web_review_metrics(scorer) -> dict:
    """Of the reviewed web pages (every page stage 1 scores >= 2), the flagged ones and their verdicts."""
    import pyarrow.parquet as pq

    from classifiers.safety_data import CORPUS_DIR

    pages = json.loads(WEB_REVIEW_V3.read_text())["pages"]
    texts = {}
    for name in sorted({p["file"] for p in pages}):
        table = pq.read_table(CORPUS_DIR / name, columns=["id", "text"])
        texts.update(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))
    scores, _ = score_texts(scorer, [texts[p["id"]] for p in pages])
    flagged = [dict(p, score=int(s)) for p, s in zip(pages, scores) if s >= 3]
    verdicts = {v: sum(p["verdict"] == v for p in flagged) for v in ("harmful", "borderline", "benign")}
    return {"reviewed": len(pages), "flagged": len(flagged), "verdicts": verdicts,
            "share_harmful_or_borderline": round((verdicts["harmful"] + verdicts["borderline"]) / max(1, len(flagged)), 4),
            "pages": [{k: p[k] for k in ("id", "file", "score", "verdict", "what")} for p in flagged]}


def fit_v3(rows: Rows, weights: np.ndarray, *, out_dir: Path, seed: int = 0, threads: int = 1,
           stage2_share: float = STAGE2_HARMFUL_SHARE) -> dict:
    """Both stages and their calibrations, written to `out_dir`; returns what was fitted on what."""
    calib = np.array([in_calibration(t) for t in rows.text])
    fit_idx, cal_idx = np.flatnonzero(~calib), np.flatnonzero(calib)
    stage1_path, stage2_path = out_dir / "safety-fasttext-v3.ftz", out_dir / "safety-fasttext-v3-precision.ftz"
    stage1, lines1 = fit_stage(rows, weights, fit_idx, out=stage1_path, params={**STAGE1_PARAMS, "thread": threads}, seed=seed)
    cal1 = calibrate_stage(stage1, rows, weights, cal_idx, out=stage1_path, about="15% of the training rows by a hash of the normalised text, never trained on")
    stage2, lines2 = fit_stage(rows, weights, fit_idx, out=stage2_path, params={**STAGE2_PARAMS, "thread": threads}, seed=seed)
    first = FastTextSafetyScorer(model=str(stage1_path), version="stage1", resources=Resources())
    first.setup()
    gated_scores, _ = score_texts(first, [rows.text[i] for i in cal_idx])
    gated = cal_idx[gated_scores >= PRECISION_THRESHOLD]
    cal2 = calibrate_stage(stage2, rows, weights, gated, out=stage2_path, harmful_share=stage2_share,
                           about=f"the calibration rows stage 1 scores >= {PRECISION_THRESHOLD}: the documents the precision stage decides")
    return {"stage1": stage1_path, "stage2": stage2_path, "first": first, "stage2_model": stage2, "gated": gated, "fit_rows": len(fit_idx),
            "calibration_rows": len(cal_idx), "lines_after_weighting": [lines1, lines2], "calibration": {"stage1": cal1, "stage2": cal2}}


def leave_source_out(work: Path, *, shares=(0.5, 0.6, 0.7, 0.8), seed: int = 0) -> dict:
    """Per fold (`FOLDS`): train both stages without the fold's sources, then measure on all their
    rows: stage 1 alone, and the cascade with the precision stage calibrated at each harmful share."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from classifiers.safety_data import HARM_DIR

    cases = [c for c in build_hard_cases() if not c.dev]
    base = training_rows()
    harm = pa.concat_tables([pq.read_table(HARM_DIR / f"{split}.parquet", columns=["text", "label", "source"]) for split in ("train", "dev")])
    folds = []
    for k, (harmful, benign) in enumerate(FOLDS):
        left_out = set(harmful) | set(benign)
        kept = base.take([i for i, src in enumerate(base.source) if src not in left_out])
        rows = concat_rows(kept, as_rows([c for c in cases if c.source not in harmful]))
        weights = group_weights(rows, quality={**QUALITY, **HARD_QUALITY})
        out_dir = work / f"fold{k}"
        out_dir.mkdir(parents=True, exist_ok=True)
        fitted = fit_v3(rows, weights, out_dir=out_dir, seed=seed, threads=2)
        test = harm.filter(pa.compute.is_in(harm.column("source"), pa.array(sorted(left_out))))
        texts, y = test.column("text").to_pylist(), np.array(test.column("label").to_pylist())
        s1, _ = score_texts(fitted["first"], texts)
        fold = {"harmful_sources": list(harmful), "benign_sources": list(benign), "harmful": int(y.sum()), "benign": int((y == 0).sum()),
                "stage1_alone": _recall_fpr(s1 >= 3, y)}
        for share in shares:
            calibrate_stage(fitted["stage2_model"], rows, weights, fitted["gated"], out=fitted["stage2"], about="", harmful_share=share)
            scorer = FastTextSafetyScorer(model=str(fitted["stage1"]), version="v3", resources=Resources(), precision=str(fitted["stage2"]))
            scorer.setup()
            fold[f"cascade_harmful_share_{share}"] = _recall_fpr(score_texts(scorer, texts)[0] >= 3, y)
        folds.append(fold)
        print(json.dumps(fold), flush=True)
    keys = [k for k in folds[0] if k == "stage1_alone" or k.startswith("cascade")]
    mean = {k: {m: round(float(np.mean([f[k][m] for f in folds])), 4) for m in ("recall", "fpr")} for k in keys}
    return {"folds": folds, "mean": mean}


def _recall_fpr(flagged: np.ndarray, y: np.ndarray) -> dict:
    return {"recall": round(float(flagged[y == 1].mean()), 4), "fpr": round(float(flagged[y == 0].mean()), 4)}


def train(out_dir: Path, *, seed: int = 0) -> dict:
    started = time.time()
    cases = build_hard_cases()
    rows = concat_rows(training_rows(), as_rows([c for c in cases if not c.dev]))
    weights = group_weights(rows, quality={**QUALITY, **HARD_QUALITY})
    fitted = fit_v3(rows, weights, out_dir=out_dir, seed=seed)
    stage1_path, stage2_path, first = fitted["stage1"], fitted["stage2"], fitted["first"]

    scorer = FastTextSafetyScorer(model=str(stage1_path), version="v3", resources=Resources(), precision=str(stage2_path),
                                  precision_threshold=PRECISION_THRESHOLD)
    scorer.setup()
    dev_cases = [c for c in cases if c.dev]
    groups, counts = np.unique(rows.group, return_counts=True)
    report = {
        "model": stage1_path.name, "precision_model": stage2_path.name, "precision_threshold": PRECISION_THRESHOLD,
        "training": {
            "rows": len(rows), "fit_rows": fitted["fit_rows"], "calibration_rows": fitted["calibration_rows"],
            "lines_after_weighting": fitted["lines_after_weighting"],
            "hard_cases": {"train": len(cases) - len(dev_cases), "dev": len(dev_cases)},
            "groups": {g: {"rows": int(n), "effective_rows": round(float(weights[np.asarray(rows.group) == g].sum()), 1)} for g, n in zip(groups, counts)},
        },
        "params": {"stage1": {**STAGE1_PARAMS, "seed": seed}, "stage2": {**STAGE2_PARAMS, "seed": seed}},
        "calibration": fitted["calibration"],
        "v3": {**evaluate_model(stage1_path, precision=stage2_path), "hard_cases_dev": hard_case_metrics(scorer, dev_cases),
               "web_review": web_review_metrics(scorer)},
        "stage1_alone": {**evaluate_model(stage1_path), "hard_cases_dev": hard_case_metrics(first, dev_cases), "web_review": web_review_metrics(first)},
        "train_seconds": round(time.time() - started, 1),
        "size_bytes": {p.name: os.path.getsize(p) for p in (stage1_path, stage2_path)},
    }
    v2 = FastTextSafetyScorer(model=str(Path(__file__).resolve().parent / "models" / "safety-fasttext-v2.ftz"), version="v2", resources=Resources())
    if Path(v2.model).is_file():
        v2.setup()
        report["v2_on_the_same"] = {"hard_cases_dev": hard_case_metrics(v2, dev_cases), "web_review": web_review_metrics(v2)}
    stage1_path.with_suffix(".metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--leave-source-out", type=Path, default=None, metavar="WORK_DIR",
                    help="instead of training: the leave-source-out table (4 folds, ~6 minutes), written to <out-dir>/safety-fasttext-v3.lso.json")
    args = ap.parse_args()
    if args.leave_source_out:
        result = leave_source_out(args.leave_source_out, seed=args.seed)
        (args.out_dir / "safety-fasttext-v3.lso.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["mean"], indent=1))
        return
    report = train(args.out_dir, seed=args.seed)
    for name in ("v3", "stage1_alone", "v2_on_the_same"):
        part = report.get(name, {})
        for split, m in part.get("dev", {}).items():
            print(f"{name} {split} dev: precision {m['precision']:.4f} recall {m['recall']:.4f} FPR {m['fpr']:.4f} AUROC {m['auroc']:.4f}")
        if "hard_cases_dev" in part:
            print(f"{name} hard cases dev: {json.dumps(part['hard_cases_dev'])}")
            w = part["web_review"]
            print(f"{name} web review: {w['flagged']} flagged of {w['reviewed']}, {w['verdicts']}")
        if "web_heldout" in part:
            print(f"{name} web held-out: {part['web_heldout']['flagged']} flagged; histogram {part['web_heldout']['score_histogram']}")
    print(f"{report['train_seconds']}s")


if __name__ == "__main__":
    main()
