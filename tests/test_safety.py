"""Safety scoring: both backends, the same columns, measured quality, distillation, bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotator.config import ClassifierConfig, InputConfig
from annotator.reader import ReadUnits
from annotator.units import Unit
from annotator.safety import SAFETY_COLUMNS, FastTextSafetyScorer, TransformersSafetyScorer, binary_to_score_probs
from annotator.stages import Resources
from classifiers import build_test_classifier, evaluate
from classifiers.distill import distill
from tests.support import CORPUS, REPO, SAFETY, require_shared_data, run_pipeline

FASTTEXT_MODEL = str(REPO / "classifiers" / "models" / "safety-fasttext-v1.ftz")


@pytest.fixture(scope="session")
def minilm_classifier() -> str:
    """The small real 6-label classifier, fine-tuned here once and cached under $SPP_CACHE."""
    require_shared_data()
    return str(build_test_classifier.build(out=build_test_classifier.default_out()))


@pytest.fixture(scope="session")
def fasttext_scorer():
    s = FastTextSafetyScorer(model=FASTTEXT_MODEL, version="safety-fasttext-v1", resources=Resources())
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


def test_fasttext_dev_metrics_match_model_card(capsys):
    metrics = evaluate.main(["--data", str(SAFETY / "dev.parquet")])
    card = json.loads((REPO / "classifiers" / "models" / "safety-fasttext-v1.metrics.json").read_text())["dev"]
    assert metrics == card
    assert metrics["f1"] > 0.9 and metrics["auroc"] > 0.95
    out = capsys.readouterr().out
    assert f"F1 {metrics['f1']:.4f}" in out and "score histogram: 0:" in out
    # The model card quotes the same figures (it once kept an earlier model's).
    text = (REPO / "classifiers" / "MODEL_CARD.md").read_text()
    row = " | ".join(f"{metrics[k]:.4f}" for k in ("precision", "recall", "f1", "accuracy", "auroc"))
    assert f"| {row} |" in text
    histogram = ", ".join(f"{k}: {v}" for k, v in metrics["score_histogram"].items())
    assert f"Score histogram on dev: {histogram}." in text


def test_transformers_backend_scores_dev_sample(minilm_scorer):
    dev = pq.read_table(SAFETY / "dev.parquet").slice(0, 400)
    out = minilm_scorer.process(dev.select(["text"]))
    scores = out.column("safety_score").to_numpy()
    probs = np.stack(out.column("safety_probs").to_pylist())
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert np.array_equal(probs.argmax(axis=1), scores)
    np.testing.assert_allclose(out.column("safety_confidence").to_numpy(), probs.max(axis=1), atol=1e-6)
    labels = np.array(dev.column("label").to_pylist())
    assert ((scores >= 3) == (labels == 1)).mean() > 0.85


def test_transformers_backend_sorts_by_length_but_keeps_order(minilm_scorer):
    texts = ["you are a worthless idiot and everyone hates you", "the museum opens at nine on sundays " * 30, "thanks!"]
    alone = [minilm_scorer.predict_probs([t])[0] for t in texts]
    together = minilm_scorer.predict_probs(texts)
    np.testing.assert_allclose(together, np.stack(alone), atol=1e-4)


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
def test_both_backends_write_the_same_columns_in_the_pipeline(minilm_classifier, tmp_path):
    require_shared_data()
    schemas = {}
    for backend, model in (("fasttext", FASTTEXT_MODEL), ("transformers", minilm_classifier)):
        out = tmp_path / backend
        proc = run_pipeline(
            "--config", "configs/demo.yaml", "--limit", "60", "--output", str(out),
            "--set", "generation.enabled=false", "--set", f"classifier.backend={backend}",
            "--set", f"classifier.model={model}", "--set", f"classifier.version={backend}-v1", "--set", "classifier.max_length=128",
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        table = pq.read_table(out / "shards")
        assert table.num_rows == 60
        assert set(table.column("safety_model").to_pylist()) == {f"{backend}-v1"}
        schemas[backend] = {name: str(table.schema.field(name).type) for name in SAFETY_COLUMNS}
    assert schemas["fasttext"] == schemas["transformers"]
    probs_type = pq.read_table(tmp_path / "fasttext" / "shards").schema.field("safety_probs").type
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
