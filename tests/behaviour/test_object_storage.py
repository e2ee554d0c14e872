"""Object storage in and out, end to end, on a real S3 API on loopback (`tests/s3_server.py`,
configured only through the standard AWS variables): the demo config reads its corpus from
`s3://corpus/web/*.parquet` (row groups as units, a broken file among them) and writes to
`s3://runs/...`. A full run, with its live metrics scraped from the node's Prometheus endpoint while
it runs; a run SIGKILLed mid-generation and resumed, whose objects equal the uninterrupted run's
byte for byte; a publish dry run and the lock on object storage; and wrong credentials, refused at
start with nothing written. `--add-recipe` on object storage is the uninterrupted twin of
`tests/run/test_add_recipe.py` (its objects equal a killed and resumed add on disk, byte for byte)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.behaviour.test_resume import _RUN_SPECIFIC, kill_process_when
from tests.s3_server import start_s3_server
from tests.support import REPO, demo_args, demo_corpus

pytestmark = pytest.mark.slow

DOCS = 30          # three units of ten: the demo's row groups, read from S3
BROKEN = b"PAR1 this is not a parquet file"
# Files whose content says when and how long the run ran, not what it wrote.
TIMED = ("run.json", "stats.json", "report.html")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3")
    server = start_s3_server(log_path=root / "moto.log")
    client = server.client()
    for bucket in ("corpus", "runs"):
        client.create_bucket(Bucket=bucket)
    corpus = demo_corpus(root / "corpus")
    client.upload_file(str(corpus / "web.parquet"), "corpus", "web/web.parquet")
    client.put_object(Bucket="corpus", Key="web/broken.parquet", Body=BROKEN)
    yield server
    server.stop()


def s3_args() -> list[str]:
    args = demo_args(Path("/corpus"))
    return [a.replace("/corpus/*.parquet", "s3://corpus/web/*.parquet") for a in args] + ["--set", f"input.limit={DOCS}"]


def start(server, *args: str, log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "pipelines" / "spp_reflections.py"), *args], cwd=REPO,
                            env={**server.env(**env), "PYTHONUNBUFFERED": "1"}, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def run_to_end(server, *args: str, log: Path) -> str:
    proc = start(server, *args, log=log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-5000:]
    return log.read_text()


def contents(server, prefix: str) -> dict[str, bytes]:
    """Every object of a run, by its key under the run's prefix, with its bytes."""
    return {key[len(prefix) + 1:]: server.read("runs", key) for key in server.objects("runs", prefix + "/")}


METRIC = re.compile(r'^ray_(spp_\w+)\{(.*)\} (\S+)$')


def scrape(url: str) -> dict[tuple[str, str], float]:
    """(metric, stage) -> value of the run's metrics on a Prometheus endpoint."""
    import urllib.request

    out = {}
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        m = METRIC.match(line)
        if m:
            tags = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out[(m.group(1), tags.get("stage"))] = float(m.group(3))
    return out


@pytest.fixture(scope="module")
def whole(s3, tmp_path_factory):
    """The uninterrupted run on object storage: wall time, its objects, and the live metrics
    scraped from the node's Prometheus endpoint while it ran (Ray exports them every second
    here, every 10 s by default)."""
    log = tmp_path_factory.mktemp("whole") / "run.log"
    t0 = time.time()
    proc = start(s3, *s3_args(), "--output", "s3://runs/whole", log=log, RAY_metrics_report_interval_ms="1000")
    url, seen, replicas = None, {}, set()
    while proc.poll() is None and time.time() - t0 < 900:
        url = url or next(iter(re.findall(r"live metrics \(ray_spp_\*\): (http://\S+/metrics)", log.read_text())), None)
        if url:
            try:
                now = scrape(url)
            except OSError:
                now = {}
            seen.update(now)
            replicas.update(v for (name, stage), v in now.items() if name == "spp_replicas_alive")
        time.sleep(0.25)
    assert proc.wait(timeout=60) == 0, log.read_text()[-5000:]
    return {"wall": time.time() - t0, "log": log.read_text(), "objects": contents(s3, "whole"), "metrics": seen, "url": url,
            "replicas": replicas}


def test_a_run_reads_and_writes_object_storage(s3, whole):
    objects = whole["objects"]
    stats = json.loads(objects["stats.json"])
    print(f"\nrun on S3: {len(objects)} objects, {sum(map(len, objects.values())):,} bytes, {whole['wall']:.1f}s wall")
    assert stats["documents_in"] == DOCS == stats["documents_out"] + stats["documents_rejected_total"] + stats["documents_dropped_bad"]
    assert stats["files_rejected"][0]["path"] == "s3://corpus/web/broken.parquet" and len(stats["files_rejected"]) == 1
    rejected_files = [json.loads(line) for line in objects["rejects/files.jsonl"].decode().splitlines()]
    assert [r["path"] for r in rejected_files] == ["s3://corpus/web/broken.parquet"] and rejected_files[0]["reason"]
    # The corpus's row groups are the units: three of ten documents, each with its manifest.
    manifests = sorted(k for k in objects if k.startswith("_work/done/"))
    assert len(manifests) == 3 and all(json.loads(objects[m])["rows"] == 10 for m in manifests)
    shards = [pq.read_table(pa.BufferReader(objects[k])) for k in sorted(objects) if k.startswith("shards/")]
    rows = pa.concat_tables(shards)
    assert rows.num_rows == stats["documents_out"] and len(set(rows.column("doc_id").to_pylist())) == rows.num_rows
    assert set(rows.column("source_file").to_pylist()) == {"s3://corpus/web/web.parquet"}
    assert stats["reflection_status"].get("ok", 0) >= 1
    meta = json.loads(objects["tokenized/metadata.json"])
    assert meta["streams"]["reflection-1p"]["sequences"] == stats["reflection_status"]["ok"]
    for prefix in meta["streams"]["compact"]["prefixes"]:
        assert objects[f"{prefix}.idx"].startswith(b"MMIDIDX") and objects[f"{prefix}.bin"]
    assert "tokenizer/tokenizer.json" in objects and b"<html" in objects["report.html"][:200].lower()
    # Nothing left behind: no lock, no work files of a finished run, no temporary objects.
    assert ".spp-lock.json" not in objects
    assert not [k for k in objects if k.startswith(("_work/scored/", "_work/generated/")) or ".tmp-" in k]
    # The run's own statement of where it wrote, and no credential in any object.
    assert "s3://runs/whole/shards" in whole["log"]
    secret = s3.keys["SecretAccessKey"].encode()
    assert not [k for k, v in objects.items() if secret in v or s3.keys["AccessKeyId"].encode() in v]


def content_stats(stats: dict) -> dict:
    """stats.json without what measures the clock (as `test_resume.content_stats`)."""
    for recipe in stats.get("recipes", {}).values():
        recipe.pop("generated_tokens_per_engine_second")
    return {k: v for k, v in stats.items() if k not in _RUN_SPECIFIC}


def test_live_metrics_of_the_run_are_served_with_its_figures(whole):
    """Scraped from the local node's Prometheus endpoint during the run: each pass's counts, as
    the run's own statistics give them at the end."""
    m, stats = whole["metrics"], json.loads(whole["objects"]["stats.json"])
    assert whole["url"], "the run did not say where its metrics are"
    print(f"\nlive metrics at {whole['url']}: {sorted(m.items())}")
    rejected = sum(v for k, v in stats["documents_rejected"].items() if k != "duplicate_id")
    assert m[("spp_documents_total", "score")] == m[("spp_documents_in", "score")] == DOCS
    assert m[("spp_documents_rejected", "score")] == rejected and m[("spp_documents_out", "score")] == DOCS - rejected
    assert m[("spp_eta_seconds", "score")] == 0
    tokens = stats["generation_tokens"]
    assert m[("spp_generated_tokens", "generate")] == tokens["output"] > 0
    assert m[("spp_prompt_tokens", "generate")] == tokens["prompt"] > 0
    assert m[("spp_cached_prompt_tokens", "generate")] == tokens["cached_prompt"]
    assert m[("spp_prefix_cache_hit_rate", "generate")] == pytest.approx(tokens["cached_prompt"] / tokens["prompt"])
    assert m[("spp_documents_in", "generate")] == stats["selected_documents"] and m[("spp_batches_retried", "generate")] == 0
    assert 1.0 in whole["replicas"]   # the one replica, while it generated
    assert m[("spp_documents_total", "finalize")] == DOCS


def generated_batches(server, prefix: str) -> list[str]:
    return [k for k in server.objects("runs", f"{prefix}/_work/generated/") if k.endswith(".parquet")]


def test_killed_mid_generation_and_resumed_gives_the_objects_of_the_uninterrupted_run(s3, whole, tmp_path):
    proc = start(s3, *s3_args(), "--output", "s3://runs/killed", log=tmp_path / "killed.log")
    # SIGKILL once a batch is saved: the driver, then the local Ray cluster it started.
    kill_process_when(proc, "killed", tmp_path / "killed.log", lambda prefix: generated_batches(s3, prefix))
    saved = {k: s3.objects("runs", k)[k]["etag"] for k in generated_batches(s3, "killed")}
    assert saved and not s3.objects("runs", "killed/_work/done/")
    assert ".spp-lock.json" in {k.rsplit("/", 1)[-1] for k in s3.objects("runs", "killed/")}   # the dead run's lock

    log = run_to_end(s3, *s3_args(), "--output", "s3://runs/killed", log=tmp_path / "resumed.log")
    assert "resuming" in log and "taking over the lock" in log
    resumed = contents(s3, "killed")
    stats = json.loads(resumed["stats.json"])
    assert stats["this_run"]["resumed"] is True and stats["this_run"]["generations_reused"] >= 1
    assert stats["this_run"]["documents_scored"] == 0
    assert set(resumed) == set(whole["objects"])
    different = [k for k in resumed if k not in TIMED and not k.startswith("_work/done/") and resumed[k] != whole["objects"][k]]
    assert not different, different
    # Manifests: the same shards and statistics; when and how fast each unit's stages ran aside.
    for key in (k for k in resumed if k.startswith("_work/done/")):
        again, first = json.loads(resumed[key]), json.loads(whole["objects"][key])
        for m in (again, first):
            m["stats"] = {k: v for k, v in m["stats"].items() if k not in ("finished_at", "stage_seconds")}
        assert again == first, key
    assert content_stats(stats) == content_stats(json.loads(whole["objects"]["stats.json"]))


def test_publish_dry_run_from_object_storage(s3, whole, tmp_path):
    stage = tmp_path / "repo"
    result = subprocess.run([sys.executable, str(REPO / "pipelines" / "publish.py"), "--output", "s3://runs/whole", "--dry-run",
                             str(stage), "--include-shards"], cwd=REPO, env=s3.env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sample = pq.read_table(stage / "sample" / "train-00000-of-00001.parquet")
    stats = json.loads(whole["objects"]["stats.json"])
    assert sample.num_rows == stats["documents_out"] and "source_file" not in sample.column_names
    shards = sorted(p.name for p in (stage / "shards").glob("*.parquet"))
    assert shards == sorted(k.split("/")[-1] for k in whole["objects"] if k.startswith("shards/"))
    assert (stage / "shards" / shards[0]).read_bytes() == whole["objects"][f"shards/{shards[0]}"]
    assert (stage / "tokenized" / "metadata.json").read_bytes() == whole["objects"]["tokenized/metadata.json"]
    assert json.loads((stage / "stats.json").read_text()) == stats and "whole" in (stage / "README.md").read_text()
    assert ".spp-lock.json" not in {k.rsplit("/", 1)[-1] for k in s3.objects("runs", "whole/")}   # released


def test_wrong_credentials_are_refused_at_start_and_nothing_is_written(s3, tmp_path):
    before = s3.objects("runs")
    t0 = time.monotonic()
    proc = start(s3, *s3_args(), "--output", "s3://runs/denied", log=tmp_path / "denied.log", AWS_SECRET_ACCESS_KEY="not-the-key")
    assert proc.wait(timeout=120) == 2
    out = (tmp_path / "denied.log").read_text()
    assert "s3://runs/denied: cannot reach it" in out and "AWS_SECRET_ACCESS_KEY" in out and "not-the-key" not in out
    assert time.monotonic() - t0 < 60 and "Started a local Ray instance" not in out   # before Ray starts
    assert s3.objects("runs") == before


def test_the_output_lock_holds_on_object_storage(s3, monkeypatch):
    """The lock is an object made by a conditional PUT: a second holder is refused naming the
    first, a stale one is taken over, and release removes it."""
    from annotator.core.lock import OutputLock, OutputLockedError

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    logs: list[str] = []
    with OutputLock("s3://runs/locked", command="first", heartbeat_s=0.2) as first:
        assert "locked/.spp-lock.json" in s3.objects("runs", "locked/")
        with pytest.raises(OutputLockedError, match=rf"s3://runs/locked is in use by `first` .*pid {os.getpid()}"):
            OutputLock("s3://runs/locked", command="second").acquire()
        with pytest.raises(OutputLockedError):
            OutputLock.check_free("s3://runs/locked")
        time.sleep(0.6)
        record = json.loads(s3.read("runs", "locked/.spp-lock.json"))
        assert record["run_id"] == first.record["run_id"] and record["heartbeat_at"] > record["started_at"]   # heartbeats land
    assert not s3.objects("runs", "locked/")
    stale = {"host": "gone-node", "pid": 1, "run_id": "old", "command": "crashed", "started_at": 0, "heartbeat_at": time.time() - 999}
    s3.client().put_object(Bucket="runs", Key="locked/.spp-lock.json", Body=json.dumps(stale).encode())
    with OutputLock("s3://runs/locked", command="taker", log=logs.append) as taker:
        assert json.loads(s3.read("runs", "locked/.spp-lock.json"))["run_id"] == taker.record["run_id"]
    assert "taking over the lock of s3://runs/locked from `crashed`" in logs[0] and "no heartbeat for" in logs[0]


def test_the_calibration_ledger_audits_a_run_on_object_storage(s3, whole, tmp_path):
    """`pipelines/audit.py` on the run in the bucket (the ledger, with the MiniLM test classifier as
    teacher: no engine): it reads the shards there, writes `audit/ledger.parquet`, and updates the
    run's stats and report there, under the run's lock."""
    from classifiers import build_test_classifier

    teacher = str(build_test_classifier.build(out=build_test_classifier.default_out()))
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "audit.py"), "--output", "s3://runs/whole", "--only", "ledger",
                           "--set", "audit.ledger.teacher=classifier", "--set", f"audit.ledger.teacher_model={teacher}",
                           "--set", "audit.ledger.per_bucket=5"], cwd=REPO, env=s3.env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ledger = pq.read_table(pa.BufferReader(s3.read("runs", "whole/audit/ledger.parquet"))).to_pylist()
    shards = pa.concat_tables([pq.read_table(pa.BufferReader(v)) for k, v in whole["objects"].items() if k.startswith("shards/")]).to_pylist()
    by_id = {r["doc_id"]: r for r in shards}
    # Per bucket: 5 documents, or all of a smaller bucket; each one a real document of that bucket.
    assert Counter(str(r["safety_score"]) for r in ledger) == {b: min(5, n) for b, n in Counter(str(r["safety_score"]) for r in shards).items()}
    assert all(by_id[r["doc_id"]]["safety_score"] == r["safety_score"] for r in ledger)
    stats = json.loads(s3.read("runs", "whole/stats.json"))
    fig = stats["audit"]["ledger"]
    assert fig["teacher"].startswith("classifier:") and sum(v["sampled"] for v in fig["per_bucket"].values()) == len(ledger)
    # The confusion table and the shares, recounted from the ledger.
    confusion = Counter((str(r["safety_score"]), str(r["teacher_score"])) for r in ledger)
    assert {(b, t): n for b, row in fig["confusion"].items() for t, n in row.items() if n} == dict(confusion)
    for b, v in fig["per_bucket"].items():
        rows = [r for r in ledger if str(r["safety_score"]) == b]
        assert v["teacher_bad"] == sum(r["teacher_score"] >= 3 for r in rows)
        assert v["selected_in_run"] == sum(r["selected"] for r in shards if str(r["safety_score"]) == b)
    selected = {b: v["selected_in_run"] for b, v in fig["per_bucket"].items()}
    expected = sum(n * fig["per_bucket"][b]["teacher_bad_share"] for b, n in selected.items()) / sum(selected.values())
    assert fig["estimated_truly_bad_share_of_selected"] == pytest.approx(expected, abs=1e-4)
    assert b"Calibration ledger" in s3.read("runs", "whole/report.html")
    left = s3.objects("runs", "whole/")
    assert "whole/.spp-lock.json" not in left and not [k for k in left if k.startswith("whole/audit/_work/")]
