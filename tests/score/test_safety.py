"""Safety scoring: both backends, the same columns, measured quality, distillation, bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotator.config import ClassifierConfig, InputConfig
from annotator.score.reader import ReadUnits
from annotator.core.units import Unit
from annotator.score.safety import (
    SAFETY_COLUMNS, FastTextSafetyScorer, TransformersSafetyScorer, binary_to_score_probs, calibrate, load_calibration,
    normalize_for_fasttext,
)
from annotator.core.stages import Resources
from classifiers import build_test_classifier, evaluate
from classifiers.categories import row_categories
from classifiers.distill import distill
from tests.support import CORPUS, REPO, SAFETY, require_shared_data, run_pipeline

MODELS = REPO / "classifiers" / "models"
HARM = SAFETY.parent / "safety-v2"
FASTTEXT_MODEL = str(REPO / ClassifierConfig().model)  # the default: v3's first stage
PRECISION_MODEL = str(REPO / ClassifierConfig().precision.model)  # and its precision stage
V1_MODEL = str(MODELS / "safety-fasttext-v1.ftz")
V2_MODEL = str(MODELS / "safety-fasttext-v2.ftz")
DEFAULT_VERSION = "safety-fasttext-v3+precision@2"


@pytest.fixture(scope="session")
def minilm_classifier() -> str:
    """The small real 6-label classifier, fine-tuned here once and cached under $SPP_CACHE."""
    require_shared_data()
    return str(build_test_classifier.build(out=build_test_classifier.default_out()))


@pytest.fixture(scope="session")
def fasttext_scorer():
    """The default scorer as a run builds it: v3's first stage and its precision stage."""
    from annotator.score.safety import build_scorer

    s = build_scorer(ClassifierConfig(model=FASTTEXT_MODEL, precision={"model": PRECISION_MODEL}), resources=Resources())
    s.setup()
    return s


@pytest.fixture(scope="session")
def first_stage():
    s = FastTextSafetyScorer(model=FASTTEXT_MODEL, version="stage1", resources=Resources())
    s.setup()
    return s


@pytest.fixture(scope="session")
def minilm_scorer(minilm_classifier):
    s = TransformersSafetyScorer(model=minilm_classifier, version="minilm-6way", resources=Resources(), max_length=128)
    s.setup()
    return s


def test_binary_probability_to_score_keeps_the_decision_boundary():
    p = np.linspace(0, 1, 1001)
    probs = binary_to_score_probs(p)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    scores = probs.argmax(axis=1)
    assert np.array_equal(scores >= 3, p > 0.5) or np.array_equal(scores >= 3, p >= 0.5)
    assert scores[0] == 0 and scores[-1] == 5
    assert np.all(np.diff(scores) >= 0)


def test_v3_with_its_precision_stage_is_the_default_and_v1_v2_stay_loadable(fasttext_scorer):
    cfg = ClassifierConfig()
    assert cfg.model == "classifiers/models/safety-fasttext-v3.ftz" and cfg.version == "safety-fasttext-v3"
    assert cfg.precision.model == "classifiers/models/safety-fasttext-v3-precision.ftz" and cfg.precision.threshold == 2
    assert fasttext_scorer.version == DEFAULT_VERSION and fasttext_scorer.precision is not None
    # `default` means v3's precision stage beside v3, and none after any other model or backend
    assert ClassifierConfig(model="/m/safety-fasttext-v3.ftz").precision.model == "/m/safety-fasttext-v3-precision.ftz"
    assert ClassifierConfig(model=V2_MODEL).precision.model is None
    assert ClassifierConfig(model=V2_MODEL, precision={"model": PRECISION_MODEL}).precision.model == PRECISION_MODEL
    assert ClassifierConfig(backend="transformers", model="m").precision.model is None
    v2 = FastTextSafetyScorer(model=V2_MODEL, version="safety-fasttext-v2", resources=Resources())
    v2.setup()
    assert v2._calibration is not None and v2.precision is None
    v1 = FastTextSafetyScorer(model=V1_MODEL, version="safety-fasttext-v1", resources=Resources())
    v1.setup()
    assert v1._calibration is None and not v1._six_way  # v1 keeps its uncalibrated Binomial(5, p) mapping
    texts = pq.read_table(SAFETY / "dev.parquet", columns=["text"]).column("text").to_pylist()[:200]
    p = _raw_probability(V1_MODEL, texts)
    scores = v1.process(pa.table({"text": texts})).column("safety_score").to_numpy()
    np.testing.assert_array_equal(scores, np.minimum(np.floor(6 * p), 5).astype(int))


def _raw_probability(model: str, texts: list[str]) -> np.ndarray:
    import fasttext

    labels, probs = fasttext.load_model(model).predict([normalize_for_fasttext(t) for t in texts], k=2)
    return np.array([dict(zip(ls, ps)).get("__label__1", 0.0) for ls, ps in zip(labels, probs)])


@pytest.mark.parametrize("model", [FASTTEXT_MODEL, PRECISION_MODEL, V2_MODEL], ids=["v3-stage1", "v3-precision", "v2"])
def test_scores_are_the_calibrated_probability_in_sixths(model):
    """score = floor(6q), q = the Platt-calibrated P(harmful), so bad (>= 3) is q >= 0.5; and the raw
    thresholds the calibration file states are the ones the scorer applies."""
    scorer = FastTextSafetyScorer(model=model, version="x", resources=Resources())
    scorer.setup()
    cal = load_calibration(model)
    assert cal is not None and cal == scorer._calibration
    texts = pq.read_table(HARM / "dev.parquet", columns=["text"]).column("text").to_pylist()[:300]
    p = _raw_probability(model, texts)
    q = calibrate(p, a=cal["a"], b=cal["b"])
    scores = scorer.process(pa.table({"text": texts})).column("safety_score").to_numpy()
    np.testing.assert_array_equal(scores, np.minimum(np.floor(6 * q), 5).astype(int))
    assert len(set(scores)) >= 4  # the scale is used, not just 0 and 5
    for k, threshold in cal["raw_p_threshold_per_score"].items():
        away = np.abs(p - threshold) > 1e-3  # clear of rounding in the file
        np.testing.assert_array_equal((scores >= int(k))[away], (p >= threshold)[away])


DEV_METRICS = [  # (model, metrics file key, dev split)
    ("safety-fasttext-v3", "harm", HARM / "dev.parquet"),
    ("safety-fasttext-v3", "toxicity", SAFETY / "dev.parquet"),
    ("safety-fasttext-v2", "harm", HARM / "dev.parquet"),
    ("safety-fasttext-v2", "toxicity", SAFETY / "dev.parquet"),
    ("safety-fasttext-v1", None, SAFETY / "dev.parquet"),
]


@pytest.mark.parametrize("model,split,data", DEV_METRICS, ids=["v3-harm", "v3-toxicity", "v2-harm", "v2-toxicity", "v1-toxicity"])
def test_fasttext_dev_metrics_match_model_card(model, split, data, capsys):
    default = model == "safety-fasttext-v3"  # the default model, with its precision stage
    args = ["--data", str(data)] + ([] if default else ["--model", str(MODELS / f"{model}.ftz")])
    metrics = evaluate.main(args + (["--by-category"] if split else []))
    saved = json.loads((MODELS / f"{model}.metrics.json").read_text())
    saved = saved["v3"]["dev"] if default else saved["dev"]
    share = metrics.pop("precision_share_rescored", None)
    assert (share is not None) == default and (not default or 0 < share < 1)
    assert metrics == (saved[split] if split else saved)
    out = capsys.readouterr().out
    assert f"F1 {metrics['f1']:.4f}" in out and "score histogram: 0:" in out
    # The model card quotes the same figures (it once kept an earlier model's).
    text = (REPO / "classifiers" / "MODEL_CARD.md").read_text()
    row = " | ".join(f"{metrics[k]:.4f}" for k in ("precision", "recall", "f1", "fpr", "accuracy", "auroc"))
    assert f"| {model} | {data.parent.name}/dev | {row} |" in text
    histogram = ", ".join(f"{k}: {v}" for k, v in metrics["score_histogram"].items())
    assert f"Score histogram of {model} on {data.parent.name}/dev: {histogram}." in text
    if split:
        assert metrics["auroc"] > 0.9 and metrics["recall"] > 0.7
    if split and default:
        for cat, m in metrics["by_category"].items():
            cells = " | ".join("-" if m[k] is None else f"{m[k]:.3f}" for k in ("recall", "fpr", "precision"))
            assert f"| {cat} | {m['harmful']} | {m['benign']} | {cells} |" in text, (split, cat)


def test_precision_stage_decides_only_what_the_first_stage_scores_2_or_more(fasttext_scorer, first_stage):
    """Documents the first stage scores < 2 keep its probabilities; the others get the precision
    model's own calibrated probabilities, and the count of rescored documents is kept."""
    second = FastTextSafetyScorer(model=PRECISION_MODEL, version="p", resources=Resources())
    second.setup()
    table = pq.read_table(HARM / "dev.parquet")
    texts = table.take(list(range(0, table.num_rows, 9))).column("text").to_pylist() + [
        "How do I kill a Python process that won't stop?", "I can't help with making a weapon. If anyone is in danger, call emergency services."]
    before = fasttext_scorer.rescored
    probs = np.stack(fasttext_scorer.process(pa.table({"text": texts})).column("safety_probs").to_pylist())
    first = np.stack(first_stage.process(pa.table({"text": texts})).column("safety_probs").to_pylist())
    own = second.predict_probs(texts)
    gated = first.argmax(axis=1) >= 2
    assert 0 < gated.sum() < len(texts) and fasttext_scorer.rescored - before == gated.sum()
    np.testing.assert_allclose(probs[~gated], first[~gated], atol=1e-6)
    np.testing.assert_allclose(probs[gated], own[gated], atol=1e-6)
    from annotator.score.safety import build_scorer

    off = build_scorer(ClassifierConfig(precision={"model": None}), resources=Resources())
    assert off.precision is None and off.version == "safety-fasttext-v3"
    six_way = MODELS / "not-a-model.ftz"
    with pytest.raises(FileNotFoundError, match="no fastText model"):
        FastTextSafetyScorer(model=FASTTEXT_MODEL, version="x", resources=Resources(), precision=str(six_way)).setup()
    with pytest.raises(ValueError, match="precision.threshold"):
        ClassifierConfig(precision={"threshold": 0})


def test_per_category_evaluation_on_a_small_slice(tmp_path, fasttext_scorer, capsys):
    """The evaluation command's per-category table on ~120 rows, recounted from the scorer's own scores."""
    table = pq.read_table(HARM / "dev.parquet")
    table = table.take(list(range(0, table.num_rows, 14)))  # every 14th row: the file is ordered by source
    pq.write_table(table, tmp_path / "slice.parquet")
    metrics = evaluate.main(["--data", str(tmp_path / "slice.parquet"), "--by-category"])
    printed = capsys.readouterr().out
    scores = fasttext_scorer.process(table.select(["text"])).column("safety_score").to_numpy()
    labels = np.array(table.column("label").to_pylist())
    cats = np.array(row_categories(table))
    assert set(metrics["by_category"]) == set(cats) and len(set(cats)) >= 8
    for cat, m in metrics["by_category"].items():
        rows = cats == cat
        harmful, benign = rows & (labels == 1), rows & (labels == 0)
        assert (m["harmful"], m["benign"]) == (harmful.sum(), benign.sum())
        assert m["recall"] == (round((scores[harmful] >= 3).mean(), 4) if harmful.any() else None)
        assert m["fpr"] == (round((scores[benign] >= 3).mean(), 4) if benign.any() else None)
        line = next(l for l in printed.splitlines() if l.split()[:1] == [cat])
        assert line.split()[1:3] == [str(m["harmful"]), str(m["benign"])]
    flagged = scores >= 3
    assert metrics["recall"] == round((flagged & (labels == 1)).sum() / (labels == 1).sum(), 4)
    assert metrics["fpr"] == round((flagged & (labels == 0)).sum() / (labels == 0).sum(), 4)


def test_transformers_backend_scores_dev_sample(minilm_scorer):
    dev = pq.read_table(SAFETY / "dev.parquet").slice(0, 400)
    out = minilm_scorer.process(dev.select(["text"]))
    scores = out.column("safety_score").to_numpy()
    probs = np.stack(out.column("safety_probs").to_pylist())
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert np.array_equal(probs.argmax(axis=1), scores)
    np.testing.assert_allclose(out.column("safety_confidence").to_numpy(), probs.max(axis=1), atol=1e-6)
    labels = np.array(dev.column("label").to_pylist())
    # Only the head is trained (on frozen [CLS] vectors, to build in seconds): 0.825 measured here.
    assert ((scores >= 3) == (labels == 1)).mean() > 0.8
    harm = pq.read_table(HARM / "dev.parquet").slice(0, 200)
    harm_scores = minilm_scorer.process(harm.select(["text"])).column("safety_score").to_numpy()
    assert ((harm_scores >= 3) == (np.array(harm.column("label").to_pylist()) == 1)).mean() > 0.8


def test_transformers_backend_sorts_by_length_but_keeps_order(minilm_scorer):
    texts = ["you are a worthless idiot and everyone hates you", "the museum opens at nine on sundays " * 30, "thanks!"]
    alone = [minilm_scorer.predict_probs([t])[0] for t in texts]
    together = minilm_scorer.predict_probs(texts)
    np.testing.assert_allclose(together, np.stack(alone), atol=1e-4)


def test_cascade_rescores_only_documents_above_the_threshold(fasttext_scorer, minilm_scorer, minilm_classifier):
    from annotator.score.safety import CascadeSafetyScorer, build_scorer

    cfg = ClassifierConfig(cascade={"model": minilm_classifier, "threshold": 2, "version": "minilm"}, max_length=128)
    cascade = build_scorer(cfg, resources=Resources())
    assert isinstance(cascade, CascadeSafetyScorer) and cascade.stateful and cascade.adds == SAFETY_COLUMNS
    cascade.setup()
    table = pq.read_table(HARM / "dev.parquet")
    texts = table.take(list(range(0, table.num_rows, 17))).column("text").to_pylist()  # ~100 rows of every source
    out = cascade.process(pa.table({"text": texts}))
    fast = np.stack(fasttext_scorer.process(pa.table({"text": texts})).column("safety_probs").to_pylist())
    slow = minilm_scorer.predict_probs(texts)
    rescored = fast.argmax(axis=1) >= 2
    assert 0 < rescored.sum() < len(texts) and cascade.rescored == rescored.sum()
    probs = np.stack(out.column("safety_probs").to_pylist())
    np.testing.assert_allclose(probs[~rescored], fast[~rescored], atol=1e-6)
    np.testing.assert_allclose(probs[rescored], slow[rescored], atol=1e-4)
    assert set(out.column("safety_model").to_pylist()) == {DEFAULT_VERSION + "+minilm@2"}
    with pytest.raises(ValueError, match="cascade.model: a cascade starts with the fastText scorer"):
        ClassifierConfig(backend="transformers", cascade={"model": minilm_classifier})
    with pytest.raises(ValueError, match="cascade.threshold"):
        ClassifierConfig(cascade={"model": minilm_classifier, "threshold": 0})


BAD_INPUTS = {
    "null": None,
    "empty": "",
    "whitespace": " \n\t  \n",
    "control": "hello\x00world\x07 you \x1b[31m idiot",
    "huge": "lorem ipsum dolor sit amet " * 200_000,  # 5.4 MB
}


@pytest.mark.parametrize("backend", ["fasttext", "transformers"])
def test_bad_input_is_scored_or_noted(backend, fasttext_scorer, minilm_scorer):
    scorer = fasttext_scorer if backend == "fasttext" else minilm_scorer
    out = scorer.process(pa.table({"text": pa.array(list(BAD_INPUTS.values()), pa.string())})).to_pylist()
    by_name = dict(zip(BAD_INPUTS, out))
    for row in out:
        assert 0 <= row["safety_score"] <= 5 and len(row["safety_probs"]) == 6
    for name in ("null", "empty", "whitespace"):
        assert by_name[name]["safety_score"] == 0 and by_name[name]["safety_confidence"] == 1.0
    assert by_name["null"]["safety_note"] == "null_text"
    assert by_name["empty"]["safety_note"] == by_name["whitespace"]["safety_note"] == "empty_text"
    assert by_name["control"]["safety_note"] == "control_characters_removed"
    assert by_name["huge"]["safety_note"].startswith("truncated_to_")


def test_unusable_text_is_marked_for_quarantine_at_read():
    stage = ReadUnits(InputConfig(paths=["x"], id_column=None, max_document_chars=50), extra_columns={})
    unit = Unit(key="f-0-000000000", path="f.parquet", row_groups=(0,), row_start=0, rows=6)
    texts = [b"caf\xc3\xa9", b"bad \xff\xfe bytes", None, b" \n\t", b"nul\x00byte", b"x" * 51]
    out = stage.normalize(pa.table({"text": pa.array(texts, pa.binary())}), unit).to_pydict()
    assert out["reject_reason"] == [None, "invalid_utf8", "null_text", "empty_text", "control_characters", "too_long:51_chars"]
    assert out["text"] == ["caf\u00e9", "", "", "", "", ""]  # later stages spend nothing on rejected rows
    assert out["text_preview"][1] == "bad \ufffd\ufffd bytes" and out["text_preview"][0] is None
    assert out["source_row"] == list(range(6)) and len(set(out["doc_id"])) == 6


@pytest.mark.slow
def test_both_backends_write_the_same_columns_in_the_pipeline(minilm_classifier, demo_run, tmp_path):
    require_shared_data()
    schemas = {}
    # fastText with the config's defaults (v3 and its precision stage, calibrated): the suite's demo run (the first 120
    # documents of the sample); the transformers backend named in full and the cascade on its first 60.
    runs = {"transformers": ("transformers-v1", ["--set", "classifier.backend=transformers", "--set", f"classifier.model={minilm_classifier}",
                                                 "--set", "classifier.version=transformers-v1", "--set", "classifier.max_length=128"]),
            "cascade": (DEFAULT_VERSION + "+minilm@2", ["--set", f"classifier.cascade.model={minilm_classifier}",
                                                        "--set", "classifier.cascade.version=minilm", "--set", "classifier.max_length=128"])}
    shards = {"fasttext": demo_run.out / "shards"}
    for backend, (version, args) in runs.items():
        out = tmp_path / backend
        proc = run_pipeline("--config", "configs/demo.yaml", "--limit", "60", "--output", str(out), "--set", "generation.enabled=false", *args)
        assert proc.returncode == 0, proc.stderr[-4000:]
        table = pq.read_table(out / "shards")
        assert table.num_rows == 60
        assert set(table.column("safety_model").to_pylist()) == {version}
        shards[backend] = out / "shards"
    assert set(pq.read_table(shards["fasttext"], columns=["safety_model"]).column(0).to_pylist()) == {DEFAULT_VERSION}
    for backend, path in shards.items():
        table = pq.read_table(path)
        schemas[backend] = {name: str(table.schema.field(name).type) for name in SAFETY_COLUMNS}
    # The pipeline scores as the scorer does on its own; the cascade keeps fastText's low scores.
    rows = pq.read_table(shards["fasttext"], columns=["doc_id", "text", "safety_score"]).to_pydict()
    from annotator.score.safety import build_scorer

    direct = build_scorer(ClassifierConfig(model=FASTTEXT_MODEL, precision={"model": PRECISION_MODEL}), resources=Resources())
    direct.setup()
    assert direct.process(pa.table({"text": rows["text"]})).column("safety_score").to_pylist() == rows["safety_score"]
    scored = pq.read_table(shards["cascade"], columns=["doc_id", "safety_score"]).to_pydict()
    cascade = dict(zip(scored["doc_id"], scored["safety_score"]))
    low = [(d, s) for d, s in zip(rows["doc_id"], rows["safety_score"]) if s < 2 and d in cascade]
    assert len(low) > 30 and all(cascade[d] == s for d, s in low)
    assert schemas["fasttext"] == schemas["transformers"] == schemas["cascade"]
    probs_type = pq.read_table(shards["fasttext"]).schema.field("safety_probs").type
    assert pa.types.is_fixed_size_list(probs_type) and probs_type.list_size == 6 and probs_type.value_type == pa.float32()


def test_distillation_on_a_small_sample(minilm_classifier, tmp_path):
    require_shared_data()
    report = distill(teacher=minilm_classifier, corpus=[str(CORPUS / "web-sample-00000.parquet")],
                     out=tmp_path / "distilled.ftz", sample=500, max_length=128, epoch=5)
    hold = report["holdout"]
    assert report["sample"] == 500 and report["train_rows"] == 400 and hold["n"] == 100
    assert np.array(hold["confusion_matrix_teacher_rows_student_cols"]).sum() == 100
    assert np.trace(np.array(hold["confusion_matrix_teacher_rows_student_cols"])) == round(hold["exact_agreement"] * 100)
    assert hold["exact_agreement"] >= 0.5
    student = FastTextSafetyScorer(model=str(tmp_path / "distilled.ftz"), version="d", resources=Resources())
    student.setup()
    assert student._six_way
    assert json.loads((tmp_path / "distilled.distill.json").read_text())["holdout"] == hold


def test_classifier_config_keeps_remote_code_off_by_default():
    assert ClassifierConfig().trust_remote_code is False
