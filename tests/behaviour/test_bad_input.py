"""Bad input, one test each: every case gets a clear error at start or a quarantine row in
`rejects/` with its reason, the run goes on, and documents read = written + rejected (+ dropped)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotator.core.checkpoint import write_table
from annotator.score.store import WriteScored
from annotator.config import InputConfig, RunConfig
from annotator.method.resolved import resolve_run
from annotator.output.finalize import FinalizeUnit
from annotator.generate.generator import FAILED_REPLY, generator_columns
from annotator.core.layout import GENERATED, SCORED
from annotator.score.reader import ReadUnits
from annotator.core.units import Unit
from tests.behaviour.test_resume import generated_batches, kill_replicas_once, manifests, start
from tests.support import SAFETY, require_shared_data, run_pipeline

SECRET = "hf_FAKE_secret_token_must_not_leak_0123456789"
REAL_DOCS = 20


def _bad_harmful_text() -> str:
    """A long document the shipped classifier scores as bad, so it is selected and its
    prompt has to be cut to the engine's context (30k characters, ~7k tokens > 4,096)."""
    table = pq.read_table(SAFETY / "dev.parquet")
    harmful = [t for t, y in zip(table.column("text").to_pylist(), table.column("label").to_pylist()) if y == 1 and len(t) > 200]
    text = "\n\n".join(harmful[:400])
    return text[:30_000]


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> Path:
    src = sorted(require_shared_data().glob("*.parquet"))[0]
    real = pq.read_table(src, columns=["id", "text", "url"]).slice(0, REAL_DOCS).to_pylist()
    d = tmp_path_factory.mktemp("bad-input")
    rows = real + [
        {"id": real[3]["id"], "text": "A second document under an id used earlier in this file.", "url": "u"},
        {"id": "null-text", "text": None, "url": "u"},
        {"id": "empty-text", "text": "", "url": "u"},
        {"id": "whitespace-text", "text": " \n\t  \n", "url": "u"},
        {"id": "control-chars", "text": "Looks like text\x00\x01\x02 but carries binary junk.", "url": "u"},
        {"id": "five-mb", "text": "lorem ipsum " * 440_000, "url": "u"},
        {"id": "long-bad", "text": _bad_harmful_text(), "url": "u"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), d / "00-good.parquet", row_group_size=10)
    pq.write_table(pa.table({"id": ["utf8-ok", "utf8-bad", real[5]["id"]],
                             "text": pa.array(["caf\u00e9 ok".encode(), b"bad \xff\xfe bytes", b"same id as a document in 00-good"], pa.binary()),
                             "url": ["u", "u", "u"]}), d / "01-binary.parquet")
    whole = (d / "00-good.parquet").read_bytes()
    (d / "02-truncated.parquet").write_bytes(whole[: len(whole) // 2])
    pq.write_table(pa.table({"id": ["x"], "body": ["no text column here"]}), d / "03-no-text.parquet")
    pq.write_table(pa.table({"id": ["y"], "text": [42]}), d / "04-int-text.parquet")
    # String columns holding bytes that are not UTF-8 (a writer that does not check, as pyarrow's
    # reader does not), in a file whose name is a glob pattern.
    strings = {"str-ok": b"A short note about raised garden beds.", "str-latin1": b"caf\xe9 au lait", "str-surrogate": b"half \xed\xa0\x80 pair",
               "str-url": b"A valid text whose url is not UTF-8."}
    pq.write_table(pa.table({"id": list(strings), "text": pa.array(list(strings.values()), pa.binary()).view(pa.string()),
                             "url": pa.array([b"u", b"u", b"u", b"http://x/\xfe"], pa.binary()).view(pa.string())}),
                   d / "05-strings[1].parquet")
    return d


@dataclass(frozen=True)
class BadRun:
    out: Path
    log: str           # the driver's output
    stats: dict
    killed: dict       # `kill_replicas_once`: replicas killed and replaced, the batches saved at the kill


@pytest.fixture(scope="module")
def bad_run(bad_corpus, tmp_path_factory) -> BadRun:
    """The demo config (the default, fast mode) on the bad corpus, in batches of one document, with
    a Hub token in its environment; its generation replicas are SIGKILLed once a batch is saved, and
    the run goes on. What a long run meets: bad input and a lost replica, in one run."""
    out = tmp_path_factory.mktemp("bad-run") / "out"
    log = out.parent / "run.log"
    args = ["--config", "configs/demo.yaml", "--set", f"input.paths=['{bad_corpus}']", "--set", "input.limit=null",
            "--set", "input.rows_per_unit=10", "--set", "selection.matched_token_ratio=0.2", "--set", "generation.batch_size=1",
            "--set", "output.keep_work=true"]
    os.environ["HF_TOKEN"] = SECRET  # the run's environment carries a Hub token; it must not reach any output
    try:
        proc = start(args, out, log)
    finally:
        del os.environ["HF_TOKEN"]
    killed = kill_replicas_once(proc, out, log)
    return BadRun(out=out, log=log.read_text(), stats=json.loads((out / "stats.json").read_text()), killed=killed)


def rejected_rows(out: Path, kind: str = "documents") -> dict[str, str]:
    table = pq.read_table(out / "rejects" / kind) if (out / "rejects" / kind).exists() else None
    return dict(zip(table.column("doc_id").to_pylist(), table.column("reason").to_pylist())) if table else {}


def written_ids(out: Path) -> list[str]:
    return pq.read_table(out / "shards", columns=["doc_id"]).column("doc_id").to_pylist()


def rejected_files(out: Path) -> dict[str, str]:
    lines = (out / "rejects" / "files.jsonl").read_text().splitlines()
    return {Path(r["path"]).name: r["reason"] for r in map(json.loads, lines)}


@pytest.mark.slow
def test_every_document_is_written_or_rejected(bad_run):
    out, stats = bad_run.out, bad_run.stats
    written = written_ids(out)
    assert stats["documents_read"] == REAL_DOCS + 7 + 3 + 4
    assert stats["documents_read"] == len(written) + stats["documents_rejected_total"] + stats["documents_dropped_bad"]
    assert len(written) == stats["documents_out"] == REAL_DOCS + 1 + 1 + 1  # real docs, long-bad, utf8-ok, str-ok
    assert stats["documents_rejected_total"] == 11 == len(pq.read_table(out / "rejects" / "documents")) + len(pq.read_table(out / "rejects" / "duplicates"))
    assert len(set(written)) == len(written) and not set(written) & set(rejected_rows(out))


@pytest.mark.slow
def test_truncated_parquet_file_is_quarantined(bad_run):
    out, stats = bad_run.out, bad_run.stats
    assert rejected_files(out)["02-truncated.parquet"].startswith("unreadable_parquet")
    assert "02-truncated.parquet" in bad_run.log and any(f["path"].endswith("02-truncated.parquet") for f in stats["files_rejected"])


@pytest.mark.slow
def test_missing_or_mistyped_text_column_is_quarantined(bad_run):
    out = bad_run.out
    files = rejected_files(out)
    assert files["03-no-text.parquet"].startswith("missing_text_column")
    assert files["04-int-text.parquet"].startswith("text_column_type") and "int64" in files["04-int-text.parquet"]


@pytest.mark.slow
def test_null_empty_and_whitespace_text_are_quarantined(bad_run):
    rejected = rejected_rows(bad_run.out)
    assert rejected["null-text"] == "null_text"
    assert rejected["empty-text"] == rejected["whitespace-text"] == "empty_text"


@pytest.mark.slow
def test_five_megabyte_document_is_quarantined_as_too_long(bad_run):
    rejected = rejected_rows(bad_run.out)
    assert rejected["five-mb"] == f"too_long:{len('lorem ipsum ' * 440_000)}_chars"
    preview = pq.read_table(bad_run.out / "rejects" / "documents").to_pylist()
    assert [r["text_preview"] for r in preview if r["doc_id"] == "five-mb"] == [("lorem ipsum " * 100)[:1000]]


@pytest.mark.slow
def test_invalid_utf8_and_control_characters_are_quarantined(bad_run):
    out = bad_run.out
    rejected = rejected_rows(out)
    assert rejected["utf8-bad"] == "invalid_utf8" and rejected["control-chars"] == "control_characters"
    ok = [r for r in pq.read_table(out / "shards").to_pylist() if r["doc_id"] == "utf8-ok"]
    assert ok and ok[0]["text"] == "caf\u00e9 ok"
    # The same in string columns (not checked by pyarrow on read), in a file named `05-strings[1].parquet`.
    assert rejected["str-latin1"] == rejected["str-surrogate"] == "invalid_utf8" and rejected["str-url"] == "invalid_utf8:url"
    previews = {r["doc_id"]: r["text_preview"] for r in pq.read_table(out / "rejects" / "documents").to_pylist()}
    assert previews["str-latin1"] == "caf\ufffd au lait" and previews["str-surrogate"] == "half \ufffd\ufffd\ufffd pair"
    kept = [r for r in pq.read_table(out / "shards").to_pylist() if r["doc_id"] == "str-ok"]
    assert kept and Path(kept[0]["source_file"]).name == "05-strings[1].parquet"


@pytest.mark.slow
def test_duplicate_ids_keep_the_first_and_quarantine_the_rest(bad_run, bad_corpus):
    out = bad_run.out
    dups = pq.read_table(out / "rejects" / "duplicates").to_pylist()
    real = pq.read_table(bad_corpus / "00-good.parquet", columns=["id", "text"]).to_pylist()
    assert sorted((r["doc_id"], Path(r["source_file"]).name, r["source_row"]) for r in dups) == sorted([
        (real[3]["id"], "00-good.parquet", REAL_DOCS),   # later row of the same file
        (real[5]["id"], "01-binary.parquet", 2),         # a later file
    ])
    rows = {r["doc_id"]: r for r in pq.read_table(out / "shards").to_pylist()}
    assert rows[real[3]["id"]]["text"] == real[3]["text"] and rows[real[5]["id"]]["text"] == real[5]["text"]


@pytest.mark.slow
def test_document_longer_than_the_model_context_gets_a_reflection(bad_run):
    out = bad_run.out
    row = [r for r in pq.read_table(out / "shards").to_pylist() if r["doc_id"] == "long-bad"][0]
    assert row["source_token_length"] > 6144 and row["selected_reason"] == "bad"
    assert row["token_length"] <= 1920 and row["clipped_tokens"] == row["source_token_length"] - row["token_length"]
    assert row["reflection_status"] == "ok", row["reflection_status"]
    before, rest = row["training_text"].split("<assistant>")
    pos = row["reflection_position"]
    assert before == row["text"][:pos] and rest.split("</assistant>")[1] == row["text"][pos:]


@pytest.mark.slow
def test_hub_token_in_the_environment_is_written_nowhere(bad_run):
    out = bad_run.out
    assert SECRET not in bad_run.log
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_replicas_killed_mid_generation_leave_every_document_written_once(bad_run, bad_corpus, demo_run):
    """The fast mode (`generation.reproducible: false`) runs many batches in a replica's engine at
    once, so a batch generated again after a crash may differ in its text. What holds after the
    replicas of the run above were killed: batches saved before the kill are reused as they are,
    every document comes out exactly once with a status, the columns are the reproducible run's.
    (Resuming after the driver's own death is the same batch cache in both modes: the reproducible
    resume test, `tests/behaviour/test_resume.py`.)"""
    out, stats, seen = bad_run.out, bad_run.stats, bad_run.killed
    assert "continuous batching, up to 64 batches in flight per replica" in bad_run.log  # batch size 1, 256 sequences
    assert seen["killed_replicas"] >= 1 and seen["replaced"], "no replica was killed and replaced"
    saved = seen["saved"]
    assert saved and manifests(out) == stats["this_run"]["units"]  # every unit written (keep_work keeps the records)
    # Saved batches were reused as they were (same bytes, and what the shards hold), the rest generated.
    after = {name: (out / name).read_bytes() for name in generated_batches(out)}
    assert {k: after[k] for k in saved} == saved and len(after) > len(saved)
    rows = pq.read_table(out / "shards").to_pylist()
    by_id = {r["doc_id"]: r for r in rows}
    for data in saved.values():
        for g in pq.read_table(pa.BufferReader(data)).to_pylist():
            assert by_id[g["doc_id"]]["reflection_status"] == g["reflection_status"]
            assert by_id[g["doc_id"]]["reflection_1p"] == g["reflection_1p"]
    # Every document exactly once, each with an outcome; the columns of the reproducible run.
    assert len(rows) == len(by_id) == stats["documents_out"]
    for r in rows:
        assert r["reflection_status"] in ("ok", "not_selected") or r["reflection_status"].startswith("failed:"), r["reflection_status"]
        assert (r["reflection_status"] != "not_selected") == r["selected"]
    assert sum(v for k, v in stats["reflection_status"].items() if k != "not_selected") == stats["selected_documents"] > len(saved)
    assert own_columns(out, bad_corpus / "00-good.parquet") == own_columns(demo_run.out, sorted(require_shared_data().glob("*.parquet"))[0])


def own_columns(out: Path, corpus_file: Path) -> pa.Schema:
    """The schema of a run's shards without the columns its corpus carried besides id and text
    (kept as they were read: the demo corpus has more of them)."""
    carried = set(pq.read_schema(corpus_file).names) - {"id", "text"}
    schema = pq.read_schema(sorted((out / "shards").glob("*.parquet"))[0]).remove_metadata()
    return pa.schema([f for f in schema if f.name not in carried])


@pytest.mark.slow
def test_all_input_unusable_is_a_clear_error_at_start(bad_corpus, tmp_path):
    proc = run_pipeline("--config", "configs/demo.yaml", "--output", str(tmp_path / "out"),
                        "--set", f"input.paths=['{bad_corpus}/0[234]-*.parquet']", timeout=300)
    assert proc.returncode == 2
    assert "no usable input file" in proc.stderr and "02-truncated.parquet: unreadable_parquet" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_output_inside_the_input_directory_is_refused(bad_corpus):
    proc = run_pipeline("--config", "configs/demo.yaml", "--output", str(bad_corpus / "out"),
                        "--set", f"input.paths=['{bad_corpus}']", timeout=300)
    assert proc.returncode == 2 and "refusing to write into the input" in proc.stderr
    assert not (bad_corpus / "out").exists()


def test_model_output_that_does_not_parse_is_quarantined_and_the_document_kept(tmp_path):
    """Finalizing a unit whose saved generation failed to parse: the document is written without a
    reflection and `rejects/generations/` keeps the reply and the reason."""
    unit = Unit(key="web-0000-000000000", path="web.parquet", row_groups=(0,), row_start=0, rows=2)
    read = ReadUnits(InputConfig(paths=["x"]), extra_columns={})
    docs = read.normalize(pa.table({"id": ["d0", "d1"], "text": ["A first document.", "A second one."]}), unit)
    scored = docs.append_column("token_length", pa.array([4, 3], pa.int32()))
    for name, values in (("safety_score", [4, 0]), ("safety_confidence", [0.9, 0.9]),
                         ("safety_probs", [[0, 0, 0, 0.1, 0.9, 0], [0.9, 0.1, 0, 0, 0, 0]])):
        scored = scored.append_column(name, pa.array(values))
    WriteScored(out_dir=str(tmp_path)).process(scored)
    cfg = RunConfig.model_validate({"input": {"paths": ["x"]}, "output": {"path": str(tmp_path), "tokenized": False}})
    columns = generator_columns(cfg.generation)
    cols = {k: pa.nulls(1, t) for k, t in columns.items()}
    cols.update(reflection_status=pa.array(["failed:unparseable_json"]),
                reflection_attempts=pa.array([3], pa.int8()), gen_prompt_tokens=pa.array([10], pa.int32()),
                gen_cached_prompt_tokens=pa.array([0], pa.int32()), gen_output_tokens=pa.array([8], pa.int32()))
    saved = pa.table({"doc_id": ["d0"], **{k: v.cast(columns[k]) for k, v in cols.items()},
                      FAILED_REPLY: [json.dumps({"reflection": '{"analysis": "cut'})], "generation_key": ["k"]})
    write_table(tmp_path / GENERATED / unit.key / "batch.parquet", saved)
    finalize = FinalizeUnit(cfg, out_dir=str(tmp_path), probability=0.0, generation_key="k", duplicates={},
                            resolved=resolve_run(cfg.generation, voices=cfg.output.voices))
    manifest = finalize.finalize(unit)
    rows = {r["doc_id"]: r for r in pq.read_table(tmp_path / "shards").to_pylist()}
    assert rows["d0"]["text"] == "A first document." and rows["d0"]["reflection_status"] == "failed:unparseable_json"
    assert rows["d0"]["selected"] and rows["d0"]["training_text"] == rows["d0"]["text"]
    quarantined = pq.read_table(tmp_path / "rejects" / "generations").to_pylist()
    assert quarantined == [{"doc_id": "d0", "source_file": "web.parquet", "source_row": 0, "recipe": "reflection",
                            "reason": "failed:unparseable_json", "reply": '{"analysis": "cut'}]
    assert manifest["stats"]["documents_out"] == 2 and manifest["stats"]["generation_rejects"] == 1
    assert (tmp_path / SCORED / unit.key).is_dir()
