"""Recipes on real documents with the built-in model: six tracks in one run from one engine load,
each on the right documents with its text where its placement says (checked in every stream by
Megatron-LM's reader); then `--add-recipe preflection` on that finished run: nothing rescored or
regenerated, the first run's files untouched, and the add itself SIGKILLed once and run again, reusing
the batch it had saved, to the output of an uninterrupted add, byte for byte (that one made on object
storage, on a copy of the run uploaded to a loopback S3 server)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.streams_check import check_streams
from tests.support import REPO, require_shared_data, run_pipeline
from tests.behaviour.test_resume import content_stats, kill_when, run_to_end, shard_contents

FIRST = ["reflection", "reflection_end", "refusal_reflection", "summary", "rephrase", "annotations"]
# A recipe written only as files (README, "Writing a recipe"): a one-voice note at the pause point
# with its own constitution and guidelines, for bad documents only, beside the built-in ones...
EXAMPLE = REPO / "examples" / "recipes" / "normative_note.yaml"
# ...and a copy of it under another name, added to the finished run with preflection.
LATE = "normative_late"
ADDED = ["preflection", LATE]
REAL, HARMFUL = 8, 2


LATE_FILE = Path(__file__).resolve().parent / "data" / f"{LATE}.yaml"
ADD = ["--add-recipe", "preflection", "--add-recipe", str(LATE_FILE)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Real web pages and a few harmful texts (so some documents are bad), two units."""
    require_shared_data()
    web = pq.read_table(sorted(require_shared_data().glob("*.parquet"))[0], columns=["id", "text"]).slice(0, 200).to_pylist()
    web = [r for r in web if 400 <= len(r["text"]) <= 2500][:REAL]  # short pages: CPU decoding over six recipes is the cost
    harm = pq.read_table(REPO.parent / "shared" / "data" / "safety-v2" / "dev.parquet").to_pylist()
    harmful = sorted((r["text"] for r in harm if r["label"] == 1 and r["source"] == "aart" and len(r["text"]) > 300))[:HARMFUL]
    ids = [r["id"] for r in web] + [f"harm-{i}" for i in range(len(harmful))]
    texts = [r["text"] for r in web] + harmful
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha1(ids[i].encode()).hexdigest())  # harmful ones spread over units
    out = tmp_path_factory.mktemp("recipes-corpus")
    pq.write_table(pa.table({"id": [ids[i] for i in order], "text": [texts[i] for i in order]}), out / "mixed.parquet", row_group_size=4)
    return out


def args(corpus: Path) -> list[str]:
    return ["--config", "configs/demo.yaml", "--set", f"input.paths=['{corpus}/*.parquet']", "--set", "input.limit=null",
            "--set", "input.rows_per_unit=4", "--set", "selection.matched_token_ratio=2", "--set", "generation.batch_size=4",
            "--set", "generation.max_output_tokens=200", "--set", "generation.max_retries=0",
            "--set", "generation.rephrase_max_tokens=160", "--set", "generation.max_model_len=8192",
            # The built-in recipes in the shared layout (a document's recipes share its prefill); the
            # files-only recipe's pack has no shared form, so it (and the added copy) stay published.
            "--set", "generation.prompt_layout=shared",
            "--set", "output.overwrite=false", "--set", f"generation.recipes={json.dumps([*FIRST, str(EXAMPLE)])}",
            "--set", "generation.reproducible=true"]  # a killed add is compared with an uninterrupted one, byte for byte


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recipes") / "base"
    run_to_end(args(corpus), out, out.parent / "base.log")
    return out


def file_digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.is_file() and not str(p.relative_to(out)).startswith("_work")}


@pytest.mark.slow
def test_six_recipes_from_one_engine_load_each_where_it_belongs(base_run):
    out = base_run
    stats = json.loads((out / "stats.json").read_text())
    assert stats["this_run"]["engine_loads"] == 1  # one replica, one load, every recipe's requests in its calls
    rows = pq.read_table(out / "shards").to_pylist()
    bad = [r for r in rows if r["is_bad"]]
    chosen = [r for r in rows if r["selected"]]
    assert bad and len(chosen) > len(bad)
    for r in rows:
        if not r["selected"]:
            for status in ("reflection_status", "reflection_end_status", "refusal_reflection_status", "summary_status", "rephrase_status"):
                assert r[status] == "not_selected"
            assert r["annotation_status"] == "not_requested"
            continue
        for status in ("reflection_status", "reflection_end_status", "refusal_reflection_status", "summary_status", "annotation_status"):
            assert r[status] == "ok" or r[status].startswith("failed:"), (status, r[status])
        # Rephrasing is for bad documents only; the others keep their text in that track.
        assert (r["rephrase_status"] == "not_applicable") == (not r["is_bad"])
        if r["rephrase_status"] == "ok":
            assert r["rephrase_style"] in ("podcast", "textbook", "teacher_script", "ted_talk", "parent_child", "friends", "youtube_kids")
        # refusal_reflection pauses where reflection does (the same seeded point).
        assert r["refusal_reflection_token_index"] == r["reflection_token_index"]
        assert r["reflection_end_token_index"] == r["token_length"]  # at the end of the kept content
    counts = check_streams(out)  # every stream: windows, lengths, the text placed where its recipe says
    meta = json.loads((out / "tokenized" / "metadata.json").read_text())
    assert set(meta["streams"]) == {"reflection-1p", "reflection_end-1p", "refusal_reflection-1p", "summary", "rephrase", "annotations",
                                    "normative_note-1p", "compact"}
    assert counts["windows"] == 7 * len(chosen) and counts["placed"] >= len(chosen)
    per = stats["recipes"]
    assert set(per) == {*FIRST, "normative_note"}
    # The files-only recipe: bad documents only, at the reflection's pause point, its own columns
    # (one renamed in its file), its own stream and stats.
    for r in rows:
        expected = "not_selected" if not r["selected"] else "not_applicable" if not r["is_bad"] else None
        assert r["normative_note_status"] == expected or expected is None and (r["normative_note_status"] == "ok" or
                                                                               r["normative_note_status"].startswith("failed:"))
        if r["is_bad"] and r["selected"]:
            assert r["normative_note_token_index"] == r["reflection_token_index"]
            assert r["normative_note_prompt_version"].startswith("normative-note-v1@")
            assert (r["normative_note_1p"] is not None) == (r["normative_note_status"] == "ok")
            assert r["language"] and 0 < r["language_score"] <= 1
    assert "normative_note_reasoning" in rows[0] and "normative_note_analysis" not in rows[0] and "normative_note_3p" not in rows[0]
    assert per["normative_note"]["reply_checks"]["requests"] >= len(bad) and per["normative_note"]["prompt_tokens"] > 0
    assert stats["prompts"]["recipes"]["normative_note"].startswith("normative-note-v1@")
    for name in FIRST:
        assert per[name]["reply_checks"]["requests"] >= (len(bad) if name == "rephrase" else len(chosen)) or name == "annotations"
        assert per[name]["prompt_tokens"] > 0 and per[name]["generated_tokens_per_engine_second"] > 0
    layouts = {name: per[name]["prompt_layout"] for name in per}
    assert layouts == {**{n: "shared" for n in FIRST}, "rephrase": "published", "normative_note": "published"}
    for name in ("reflection", "reflection_end", "refusal_reflection", "summary", "annotations"):
        # The shared system block (~3,600 tokens) stays in the prefix cache beside the published packs'.
        assert per[name]["prefix_cache_hit_rate"] > 0.8, (name, per[name])
    # One prefill per document: `reflection` (first) computes the document up to the pause point,
    # `reflection_end` the rest of the kept content; the other shared recipes find both in the cache
    # and compute only their task turn (plus the last, partly shared block of 32 tokens).
    computed = {name: per[name]["computed_prompt_tokens_per_document"] for name in per}
    print(f"\ncomputed prompt tokens per document: {computed}; run: {stats['generation_throughput']}")
    for name in ("refusal_reflection", "summary", "annotations"):
        assert computed[name] <= 100, computed
    assert computed["reflection"] > 2 * computed["refusal_reflection"]
    assert per["summary"]["reply_checks"]["checks"].keys() == {"voices_present", "no_key_leak", "third_person", "no_charter_mention",
                                                                  "no_cutoff_mention", "no_prompt_echo"}


@dataclass(frozen=True)
class Added:
    out: Path
    saved: dict[str, list[dict]]    # batches saved when the first attempt was killed: path -> rows
    manifests_at_kill: list[dict]   # the unit manifests the killed attempt left
    log: str                        # the second attempt's output


@pytest.fixture(scope="module")
def added(base_run, tmp_path_factory) -> Added:
    """`--add-recipe preflection` on a copy of the base run, SIGKILLed once its first batch is saved,
    then the same command again: the added run the tests below read."""
    out = tmp_path_factory.mktemp("added") / "run"
    shutil.copytree(base_run, out)
    work = out / "_work" / f"generated-preflection+{LATE}"
    kill_when(ADD, out, out.parent / "1-add.log", lambda o: any(work.glob("*/*.parquet")))
    saved = {str(p.relative_to(out)): pq.read_table(p).to_pylist() for p in sorted(work.glob("*/*.parquet"))}
    manifests = [json.loads(m.read_text()) for m in (out / "_work" / "done").glob("*.json")]
    return Added(out=out, saved=saved, manifests_at_kill=manifests, log=run_to_end(ADD, out, out.parent / "2-add.log"))


@pytest.mark.slow
def test_added_recipe_reuses_the_run_and_changes_no_file_of_it(base_run, added):
    out = added.out
    stats = json.loads((out / "stats.json").read_text())
    windows = stats["selected_documents"]
    this_run = stats["this_run"]
    assert this_run["added_recipes"] == ADDED and this_run["documents_scored"] == 0
    assert this_run["generations_made"] + this_run["generations_reused"] == windows and this_run["engine_loads"] == 1
    before, after = file_digests(base_run), file_digests(out)
    rewritten = {k for k in before if after.get(k) != before[k]}
    assert rewritten <= {"stats.json", "report.html", "run.json", "tokenized/metadata.json"} | {k for k in before if "/sidecar/" in k}
    assert all(after[k] == before[k] for k in before if k.startswith(("shards/", "tokenized/reflection", "tokenized/compact",
                                                                        "tokenized/summary", "tokenized/rephrase")))
    for side in sorted((base_run / "tokenized" / "sidecar").glob("*.parquet")):
        old, new = pq.read_table(side), pq.read_table(out / "tokenized" / "sidecar" / side.name)
        assert all(old.column(c).equals(new.column(c)) for c in old.column_names)
        assert {"preflection_neutral", "preflection_status", "window_tokens_preflection-neutral", f"{LATE}_1p", f"{LATE}_status",
                f"window_tokens_{LATE}-1p"} <= set(new.column_names)
    check_streams(out)
    assert set(stats["recipes"]) == {*FIRST, "normative_note", *ADDED}
    assert json.loads((out / "run.json").read_text())["config"]["generation"]["recipes"] == [*FIRST, str(EXAMPLE), "preflection",
                                                                                             str(LATE_FILE)]
    assert stats["recipes"][LATE]["reply_checks"]["requests"] >= 1  # the harmful documents
    assert not (out / "_work" / f"generated-preflection+{LATE}").exists()


@pytest.fixture(scope="module")
def uninterrupted_add(base_run, tmp_path_factory) -> Path:
    """The same add, never interrupted, on another copy of the base run that lives on object
    storage (moto's S3 on loopback, `tests/s3_server.py`): the add reads the run's sidecars and
    manifests there and writes its streams there; its objects, downloaded, are what the killed add
    on disk must equal, byte for byte."""
    from tests.s3_server import start_s3_server

    root = tmp_path_factory.mktemp("uninterrupted")
    server = start_s3_server(log_path=root / "moto.log")
    try:
        client = server.client()
        client.create_bucket(Bucket="runs")
        for f in sorted(p for p in base_run.rglob("*") if p.is_file()):
            client.upload_file(str(f), "runs", f"base/{f.relative_to(base_run)}")
        proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "spp_reflections.py"), "--output", "s3://runs/base", *ADD],
                              cwd=REPO, env=server.env(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"adding ['preflection', '{LATE}']" in proc.stdout
        out = root / "run"
        for key in server.objects("runs", "base/"):
            (out / key.removeprefix("base/")).parent.mkdir(parents=True, exist_ok=True)
            (out / key.removeprefix("base/")).write_bytes(server.read("runs", key))
    finally:
        server.stop()
    return out


@pytest.mark.slow
def test_a_killed_add_resumes_to_the_uninterrupted_add(added, uninterrupted_add):
    """The add above was SIGKILLed once a batch was saved: the second attempt reused that batch as
    it was (its replies are the ones written), generated only the rest, each document once, and wrote
    what an uninterrupted add writes (that one on object storage: the same bytes as on disk). One
    added recipe is in each prompt layout: preflection shared, the files-only note published."""
    layouts = {name: r["prompt_layout"] for name, r in json.loads((added.out / "stats.json").read_text())["recipes"].items()}
    assert (layouts["preflection"], layouts[LATE]) == ("shared", "published")
    assert shard_contents(added.out) == shard_contents(uninterrupted_add)
    assert content_stats(added.out) == content_stats(uninterrupted_add)
    assert added.saved
    assert not all(LATE in m["recipes"] for m in added.manifests_at_kill)  # killed before every unit was written
    assert f"adding ['preflection', '{LATE}']" in added.log
    stats = json.loads((added.out / "stats.json").read_text())
    saved_rows = [r for rows in added.saved.values() for r in rows]
    assert stats["this_run"]["resumed"] is True and stats["this_run"]["generations_reused"] == len(saved_rows) >= 1
    written = {r["doc_id"]: r for r in pq.read_table(added.out / "tokenized" / "sidecar").to_pylist()}
    assert len(written) == stats["selected_documents"]
    for row in saved_rows:
        assert row["preflection_status"] == written[row["doc_id"]]["preflection_status"]
        for field in ("analysis", "charter_summary", "neutral", "judgemental", "idealisation"):
            assert row[f"preflection_{field}"] == written[row["doc_id"]][f"preflection_{field}"]


@pytest.mark.slow
def test_adding_is_refused_when_the_run_or_config_does_not_fit(base_run, corpus, tmp_path):
    again = run_pipeline("--output", str(base_run), "--add-recipe", "reflection_end", timeout=300)
    assert again.returncode == 2 and "['reflection_end'] already in the run's recipes" in again.stderr
    changed = run_pipeline(*args(corpus), "--output", str(base_run), "--set", "selection.seed=9", "--add-recipe", "preflection", timeout=300)
    assert changed.returncode == 2 and "selection.seed: 0 -> 9" in changed.stderr
    missing = run_pipeline("--output", str(tmp_path / "nothing"), "--add-recipe", "preflection", timeout=300)
    assert missing.returncode == 2 and "holds no run of this tool" in missing.stderr
