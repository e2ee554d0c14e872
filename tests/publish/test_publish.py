"""Publishing: the stratified sample, the dry-run repository folder (loads with datasets, card
metadata validates), and the upload path against FakeHubServer, with no token leaking anywhere."""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from annotator.publish.hub import (
    PublishError, allocate_sample, check_no_secret, choose_sample, read_rows, shard_files, size_category,
    stratified_sample,
)
from annotator.core.layout import STAGING_MARKER
from annotator.core.seeding import unit_hash
from tests.fake_hub import FakeHubServer
from tests.support import REPO
from tests.output.test_stats import build_run_output

SAMPLE_ROWS = 120
DATASETS_RESOURCES = Path(__import__("datasets").__file__).parent / "utils" / "resources"


def run_publish(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """pipelines/publish.py as a user runs it; huggingface_hub reads HF_ENDPOINT/HF_TOKEN at import."""
    return subprocess.run([sys.executable, str(REPO / "pipelines" / "publish.py"), *args], cwd=REPO,
                          env=env or os.environ.copy(), capture_output=True, text=True, timeout=300)


def hub_env(tmp: Path, *, endpoint: str, token: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    if token:
        env["HF_TOKEN"] = token
    return env


@pytest.fixture(scope="module")
def run_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("publish") / "out"
    build_run_output(out)
    return out


@pytest.fixture(scope="module")
def dry_run(run_output, tmp_path_factory):
    dest = tmp_path_factory.mktemp("dry") / "repo"
    proc = run_publish("--output", str(run_output), "--dry-run", str(dest), "--sample-rows", str(SAMPLE_ROWS),
                       "--repo-id", "me/spp-test", "--seed", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dest, proc


def test_allocation_is_balanced_capped_and_complete():
    strata = {"0|not_selected": 5000, "0|token_matched_sample": 40, "3|bad": 7, "4|bad": 2, "1|not_selected": 300}
    alloc = allocate_sample(strata, 200)
    assert sum(alloc.values()) == 200
    assert alloc["3|bad"] == 7 and alloc["4|bad"] == 2  # small strata give all their rows
    assert alloc["0|token_matched_sample"] == 40
    # The two large strata share the rest equally (one row apart at most).
    assert alloc["0|not_selected"] + alloc["1|not_selected"] == 151
    assert abs(alloc["0|not_selected"] - alloc["1|not_selected"]) <= 1
    assert allocate_sample(strata, 10**9) == strata  # more rows asked than exist: everything
    assert allocate_sample({"a|x": 3, "b|y": 0}, 2) == {"a|x": 2, "b|y": 0}


def test_sample_is_the_smallest_hashes_per_stratum(run_output):
    files = shard_files(run_output)
    rows = [(f, i, r) for f in files for i, r in enumerate(pq.read_table(f, columns=["doc_id", "safety_score", "selected_reason"]).to_pylist())]
    strata = Counter(f"{r['safety_score']}|{r['selected_reason']}" for _, _, r in rows)
    alloc = allocate_sample(dict(strata), 50)
    picks = choose_sample(files, allocation=alloc, seed=7)
    expected = set()
    for key, k in alloc.items():
        members = sorted((unit_hash("publish-sample", 7, r["doc_id"]), f, i) for f, i, r in rows
                         if f"{r['safety_score']}|{r['selected_reason']}" == key)
        expected |= {(f, i) for _, f, i in members[:k]}
    assert {(f, i) for _, f, i in picks} == expected and len(picks) == 50
    assert [h for h, _, _ in picks] == sorted(h for h, _, _ in picks)
    other = {(f, i) for _, f, i in choose_sample(files, allocation=alloc, seed=8)}
    assert other != expected


def test_sample_rows_are_the_shard_rows(run_output):
    stats = json.loads((run_output / "stats.json").read_text())
    sample, strata = stratified_sample(run_output, stats, rows=60, seed=0)
    shards = pq.read_table(run_output / "shards")
    assert sample.schema == shards.schema
    by_id = {r["doc_id"]: r for r in shards.to_pylist()}
    assert all(by_id[r["doc_id"]] == r for r in sample.to_pylist())
    counts = Counter(f"{r['safety_score']}|{r['selected_reason']}" for r in sample.to_pylist())
    assert dict(counts) == {k: v["rows_in_sample"] for k, v in strata.items() if v["rows_in_sample"]}
    assert {k: v["rows_in_run"] for k, v in strata.items()} == stats["strata"]


def test_dry_run_folder_loads_with_datasets(run_output, dry_run, tmp_path):
    from datasets import load_dataset

    dest, proc = dry_run
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file() and p.name != STAGING_MARKER)
    assert json.loads((dest / STAGING_MARKER).read_text())["tool"] == "spp-annotator"   # the staging is marked as ours
    assert files == ["LICENSE.md", "README.md", "images/citations.png", "images/reflection_lengths.png", "images/score_histogram.png",
                     "images/throughput.png", "report.html", "sample/train-00000-of-00001.parquet", "stats.json"]
    assert all(f"  {f}" in proc.stdout for f in files)
    # datasets caches a local folder by its name and file patterns, not its contents: a fresh cache per test.
    ds = load_dataset(str(dest), split="train", cache_dir=str(tmp_path / "cache"))
    sample = pq.read_table(dest / "sample" / "train-00000-of-00001.parquet")
    assert ds.num_rows == sample.num_rows == SAMPLE_ROWS
    assert ds["doc_id"] == sample.column("doc_id").to_pylist()
    shard_columns = pq.read_schema(next((run_output / "shards").glob("*.parquet"))).names
    assert "source_file" in shard_columns and ds.column_names == [c for c in shard_columns if c != "source_file"]   # no local paths
    assert ds[0]["text"] == sample.column("text")[0].as_py()
    assert (dest / "stats.json").read_bytes() == (run_output / "stats.json").read_bytes()


def test_card_parses_and_its_metadata_validates(run_output, dry_run):
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    dest, _ = dry_run
    card = DatasetCard.load(dest / "README.md")
    assert isinstance(card.data, DatasetCardData)
    meta = card.data.to_dict()
    assert meta["license"] == "other" and meta["task_categories"] == ["text-generation"]
    # `other` says which licence and where its terms are; no language is claimed unless given.
    assert meta["license_name"] == "source-licences" and meta["license_link"] == "LICENSE.md"
    assert "language" not in meta and "Not declared: this run did not identify languages" in card.text
    assert "machine-generated" in (dest / "LICENSE.md").read_text()
    assert meta["size_categories"] == ["n<1K"]
    assert set(meta["size_categories"]) <= set(json.loads((DATASETS_RESOURCES / "size_categories.json").read_text()))
    configs = MetadataConfigs.from_dataset_card_data(card.data)
    assert configs.get_default_config_name() == "sample"
    assert configs["sample"]["data_files"] == [{"split": "train", "path": "sample/*.parquet"}]
    stats = json.loads((run_output / "stats.json").read_text())
    text = card.text
    assert stats["prompts"]["prompt_version"].startswith("reflection-v2@") and stats["prompts"]["prompt_version"] in text
    assert stats["prompts"]["constitution"]["sha256"] in text
    assert f"| documents in / out | {stats['documents_in']:,} / {stats['documents_out']:,} |" in text
    # Source tokens beside what the training files hold (this in-process run wrote no token streams,
    # tests/audit/test_audit.py checks the figure on a real run); values readable, not JSON.
    assert "source tokens read / written" in text and "| training tokens (token streams) | no token streams written |" in text
    hist = ", ".join(f"{k}: {v:,}" for k, v in sorted(stats["score_histogram"].items()))
    assert f"| safety score histogram | {hist} |" in text and '{"' not in text.split("## Statistics")[1]
    out = stats["recipes"]["reflection"]["outputs"]
    assert "## Recipes" in text and f"| reflection | {out['kept']:,} / {out['failed']:,} |" in text
    for image in ("score_histogram", "reflection_lengths", "citations", "throughput"):
        assert f"](images/{image}.png)" in text and (dest / "images" / f"{image}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'load_dataset("me/spp-test", "sample", split="train")' in text


def test_dry_run_with_shards_adds_the_full_config(run_output, tmp_path):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    dest = tmp_path / "repo"
    proc = run_publish("--output", str(run_output), "--dry-run", str(dest), "--sample-rows", "30", "--include-shards",
                       "--language", "en", "--language", "fr", "--license", "odc-by")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = sorted(p.name for p in (run_output / "shards").glob("*.parquet"))
    assert sorted(p.name for p in (dest / "shards").iterdir()) == shards
    assert all((dest / "shards" / n).read_bytes() == (run_output / "shards" / n).read_bytes() for n in shards)
    card = DatasetCard.load(dest / "README.md")
    meta = card.data.to_dict()
    assert meta["language"] == ["en", "fr"] and meta["license"] == "odc-by" and "license_name" not in meta
    assert not (dest / "LICENSE.md").exists()
    assert [c["config_name"] for c in card.data.to_dict()["configs"]] == ["sample", "full"]
    full = load_dataset(str(dest), "full", split="train", cache_dir=str(tmp_path / "cache"))
    assert full.num_rows == json.loads((run_output / "stats.json").read_text())["documents_out"] == 300
    assert load_dataset(str(dest), split="train", cache_dir=str(tmp_path / "cache")).num_rows == 30


def test_upload_to_fake_hub_arrives_complete_without_the_token(run_output, dry_run, tmp_path):
    dest, _ = dry_run
    token = "hf_" + secrets.token_hex(16)
    with FakeHubServer(token=token) as hub:
        proc = run_publish("--output", str(run_output), "--repo-id", "me/spp-test", "--sample-rows", str(SAMPLE_ROWS),
                           "--seed", "3", env=hub_env(tmp_path, endpoint=hub.url, token=token))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert hub.unexpected == []
        assert [r["endpoint"] for r in hub.requests] == ["repo_info", "create_repo", "list_tree", "validate_yaml", "preupload", "commit"]
        assert all(r["authorized"] for r in hub.requests)
        repo = hub.repos["me/spp-test"]
        assert repo.repo_type == "dataset" and repo.visibility == "private"
        # Exactly the dry-run folder arrived, byte for byte.
        expected = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file() and p.name != STAGING_MARKER}
        assert repo.files == expected and STAGING_MARKER not in repo.files
        sample = pq.read_table(io.BytesIO(repo.files["sample/train-00000-of-00001.parquet"]))
        assert sample.num_rows == SAMPLE_ROWS and len(set(sample.column("doc_id").to_pylist())) == SAMPLE_ROWS
        assert json.loads(repo.files["stats.json"])["documents_out"] == 300
        assert repo.files["README.md"].decode().startswith("---\n")
        # The token went only into the Authorization header: not into any file, request body or output.
        assert not any(token.encode() in content for content in repo.files.values())
        assert not any(token.encode() in body for body in hub.bodies)
        assert token not in proc.stdout and token not in proc.stderr
        assert "me/spp-test" in proc.stdout

        # Publishing again updates the same repository with a second commit, which also removes what
        # the staging no longer holds (a file an earlier publish left there).
        repo.files["data/old-shard.parquet"] = b"from an earlier publish"
        again = run_publish("--output", str(run_output), "--repo-id", "me/spp-test", "--sample-rows", "10",
                            env=hub_env(tmp_path, endpoint=hub.url, token=token))
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(repo.commits) == 2 and pq.read_table(io.BytesIO(repo.files["sample/train-00000-of-00001.parquet"])).num_rows == 10
        assert "data/old-shard.parquet" not in repo.files and set(repo.files) == set(expected)

        # A repository that is public is published into only with --public.
        repo.visibility = "public"
        refused = run_publish("--output", str(run_output), "--repo-id", "me/spp-test", env=hub_env(tmp_path, endpoint=hub.url, token=token))
        assert refused.returncode == 2 and "me/spp-test exists and is public: pass --public" in refused.stderr
        assert len(repo.commits) == 2
        consent = run_publish("--output", str(run_output), "--repo-id", "me/spp-test", "--public",
                              env=hub_env(tmp_path, endpoint=hub.url, token=token))
        assert consent.returncode == 0, consent.stderr[-3000:]
        assert len(repo.commits) == 3 and hub.unexpected == []


def test_publish_without_a_token_stops_before_any_request(run_output, tmp_path):
    with FakeHubServer(token="hf_unused") as hub:
        proc = run_publish("--output", str(run_output), "--repo-id", "me/spp-test",
                           env=hub_env(tmp_path, endpoint=hub.url, token=None))
        assert proc.returncode == 2
        assert "HF_TOKEN" in proc.stderr
        assert hub.requests == [] and hub.unexpected == []


def test_a_staged_file_holding_the_token_is_refused(tmp_path):
    token = "hf_" + secrets.token_hex(16)
    (tmp_path / "images").mkdir()
    (tmp_path / "README.md").write_text("card\n")
    (tmp_path / "images" / "x.png").write_bytes(b"\x89PNG" + token.encode())
    with pytest.raises(PublishError, match="appears in images/x.png;") as err:
        check_no_secret(tmp_path, token)
    assert token not in str(err.value)
    check_no_secret(tmp_path, "hf_" + secrets.token_hex(16))  # another token: nothing to refuse


def test_size_categories_follow_the_hub_labels():
    assert [size_category(n) for n in (0, 999, 1000, 2000, 250_000, 3_000_000_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "1K<n<10K", "100K<n<1M", "1B<n<10B"]


def test_read_rows_takes_rows_across_row_groups_and_batches(run_output, tmp_path):
    table = pq.read_table(run_output / "shards")
    f = tmp_path / "grouped.parquet"
    pq.write_table(table, f, row_group_size=7)
    assert pq.ParquetFile(f).num_row_groups > 10
    rows = [0, 6, 7, 13, 14, 50, 99, table.num_rows - 1]
    picks = [(float(i), f, r) for i, r in enumerate(reversed(rows))]
    got = read_rows(picks, batch_size=3)
    assert got.to_pylist() == table.take(list(reversed(rows))).to_pylist()


def test_a_run_whose_stats_hold_the_token_is_not_published(run_output, tmp_path):
    import shutil

    token = "hf_" + secrets.token_hex(16)
    leaky = tmp_path / "out"
    shutil.copytree(run_output, leaky)
    stats = json.loads((leaky / "stats.json").read_text())
    stats["config"]["generation"]["engine_kwargs"] = {"hf_token": token}  # e.g. passed through to vLLM
    (leaky / "stats.json").write_text(json.dumps(stats))
    with FakeHubServer(token=token) as hub:
        proc = run_publish("--output", str(leaky), "--repo-id", "me/spp-test", env=hub_env(tmp_path, endpoint=hub.url, token=token))
        assert proc.returncode == 2
        assert "a key (the Hub token or the judge's) appears in report.html, stats.json;" in proc.stderr
        assert token not in proc.stdout + proc.stderr
        assert hub.requests == []


def test_a_dry_run_replaces_only_its_own_staging(run_output, dry_run, tmp_path):
    """A folder is replaced only when it carries the staging marker: a local clone of a Hub
    repository (it has a README.md) and `--dry-run .` in a project are refused, nothing deleted."""
    clone = tmp_path / "clone"
    (clone / ".git").mkdir(parents=True)
    (clone / "README.md").write_text("---\nlicense: mit\n---\nsomeone's dataset\n")
    (clone / "data.parquet").write_bytes(b"PAR1 their data")
    before = sorted(p.relative_to(clone).as_posix() for p in clone.rglob("*"))
    proc = run_publish("--output", str(run_output), "--dry-run", str(clone), "--repo-id", "me/x")
    assert proc.returncode == 2 and f"{clone} is not empty and is not a staging folder of this tool" in proc.stderr
    assert sorted(p.relative_to(clone).as_posix() for p in clone.rglob("*")) == before
    assert (clone / "data.parquet").read_bytes() == b"PAR1 their data"
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "README.md").write_text("my project")
    dot = subprocess.run([sys.executable, str(REPO / "pipelines" / "publish.py"), "--output", str(run_output), "--dry-run", ".",
                          "--repo-id", "me/x"], cwd=project, capture_output=True, text=True, timeout=300)
    assert dot.returncode == 2 and "is not a staging folder of this tool" in dot.stderr
    assert sorted(p.name for p in project.iterdir()) == ["README.md", "src"]
    # An empty folder is used; a staging of this tool is replaced (an earlier one's leftovers go).
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_publish("--output", str(run_output), "--dry-run", str(empty), "--repo-id", "me/x").returncode == 0
    (empty / "leftover.txt").write_text("from an earlier staging")
    assert run_publish("--output", str(run_output), "--dry-run", str(empty), "--repo-id", "me/x").returncode == 0
    assert not (empty / "leftover.txt").exists() and (empty / STAGING_MARKER).is_file()


def test_the_sample_publishes_the_allowed_columns_only(run_output, tmp_path):
    from annotator.publish.hub import PublishOptions, build_repo_folder

    build_repo_folder(run_output, tmp_path / "a", options=PublishOptions(repo_id="me/x", sample_rows=20, columns=["doc_id", "text", "safety_score"]))
    assert pq.read_schema(tmp_path / "a" / "sample" / "train-00000-of-00001.parquet").names == ["doc_id", "text", "safety_score"]
    with pytest.raises(PublishError, match=r"publish\.columns: \['colour'\] are not columns of the run's shards"):
        build_repo_folder(run_output, tmp_path / "b", options=PublishOptions(repo_id="me/x", sample_rows=20, columns=["doc_id", "colour"]))


def test_safety_annotations_are_published_only_when_they_hold_every_scored_document(run_output, tmp_path):
    """The in-process run writes shards but no per-unit safety annotations (as a run from before they
    existed): asked for them, staging stops and says why (tests/output/test_writer.py publishes
    them from a real filtered-baseline run)."""
    from annotator.core.errors import OutputDirError
    from annotator.publish.hub import PublishOptions, build_repo_folder
    from annotator.publish.safety_annotations import safety_config

    options = PublishOptions(repo_id="me/x", sample_rows=10, include_safety_annotations=True)
    with pytest.raises(OutputDirError, match=r"safety_annotations holds 0 rows but the run scored 300 documents \(documents_in\)"):
        build_repo_folder(run_output, tmp_path / "repo", options=options)
    assert safety_config() == {"config_name": "safety_annotations", "data_files": [{"split": "train", "path": "safety_annotations/*.parquet"}]}
