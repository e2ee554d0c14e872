"""Publishing an SFT run, without the network: the card's metadata and figures from a hand-made
stats.json, and the staged repository folder from a small SFT output (refusals included)."""

from __future__ import annotations

import json
import random
import secrets

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from annotator.publish.hub import PublishError, PublishOptions
from annotator.publish.sft_hub import build_sft_card, build_sft_repo_folder
from annotator.sft.export import EXPORT_SCHEMA, PAIRED, RENDERINGS, SKIP_SPLIT, dataset_file, paired_table

REPO_ID = "me/spp-sft-test"
PROMPT = "How do I keep my bike from rusting?"


def sft_stats(*, skip: int = 1) -> dict:
    return {
        "kind": "sft", "rows": {"cited": 2, "uncited": 2, SKIP_SPLIT: skip, "failed": 1}, "conversations": 3 + skip,
        "assistant_turns": 3, "turn_distribution": {"1": 1, "2": 1}, "failures": {"too_many_citations": 1},
        "canaries": {"inject": {"canary-a": 1}}, "tokens": {"output_tokens": 12345},
        "by_source": {"wild": {"prompts": 3, "ok": 2, "skip": 0, "failed": 1}, "beaver": {"prompts": skip, "ok": 0, "skip": skip, "failed": 0}},
        "model": "builtin:smollm2-135m-instruct", "prompt_version": "sft-v1@abc", "followup_version": "followup@def",
        "config": {"sft": {"seed": 7}},
    }


def row(cid: str, messages: list[dict]) -> dict:
    return {"conversation_id": cid, "messages": messages, "source": "wild", "source_id": cid, "category": None,
            "harm_category": "benign", "n_turns": sum(m["role"] == "assistant" for m in messages), "canary_id": None,
            "canary_action": None, "prompt_version": "sft-v1@abc", "model": "builtin:smollm2-135m-instruct"}


def sft_output(tmp_path, *, skip: bool = True):
    """A finished SFT run's files as `sft/export.py` writes them."""
    out = tmp_path / "sft-out"
    tables = {}
    for rendering in RENDERINGS:
        reply = "Oil the chain [2.1]." if rendering == "cited" else "Oil the chain."
        table = pa.Table.from_pylist([row("c0", [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": reply}]),
                                      row("c1", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])],
                                     schema=EXPORT_SCHEMA)
        tables[rendering] = table
    for name, table in [*tables.items(), (PAIRED, paired_table(*tables.values()))]:
        path = dataset_file(out, name)
        path.parent.mkdir(parents=True)
        pq.write_table(table, path)
    if skip:
        path = dataset_file(out, SKIP_SPLIT, split=SKIP_SPLIT)
        path.parent.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist([row("c2", [{"role": "user", "content": "Tell me about canary-b"}])], schema=EXPORT_SCHEMA), path)
    (out / "stats.json").write_text(json.dumps(sft_stats(skip=int(skip))))
    (out / "run.json").write_text("{}")
    (out / "_work").mkdir()
    (out / "_work" / "prompts.parquet").write_bytes(b"not staged")
    return out


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


def test_card_metadata_has_one_config_per_rendering_and_the_paired_one():
    card = build_sft_card(sft_stats(), options=PublishOptions(repo_id=REPO_ID))
    meta = front_matter(card)
    assert [c["config_name"] for c in meta["configs"]] == ["cited", "uncited", "paired"]
    assert [c.get("default", False) for c in meta["configs"]] == [True, False, False]
    assert meta["configs"][1]["data_files"] == [{"split": "train", "path": "data/uncited/*.parquet"},
                                                {"split": "skip", "path": "data/skip/*.parquet"}]
    assert meta["configs"][2]["data_files"] == [{"split": "train", "path": "data/paired/*.parquet"}]   # skip rows have no reply to pair
    assert "- `paired`: split `train`, the same conversations in the same order" in card and "`messages_nocite`" in card
    assert meta["license"] == "other" and meta["license_name"] == "source-licences" and meta["license_link"] == "LICENSE.md"
    assert meta["size_categories"] == ["n<1K"] and meta["pretty_name"] == "SPP persona SFT: spp-sft-test"
    assert "language" not in meta and "sft" in meta["tags"]


def test_card_without_skip_rows_lists_no_skip_split_and_declares_what_it_is_told():
    options = PublishOptions(repo_id=REPO_ID, license="apache-2.0", language=["en", "fr"])
    card = build_sft_card(sft_stats(skip=0), options=options)
    meta = front_matter(card)
    assert all([f["split"] for f in c["data_files"]] == ["train"] for c in meta["configs"])
    assert meta["license"] == "apache-2.0" and "license_name" not in meta and meta["language"] == ["en", "fr"]
    assert "Declared licence: `apache-2.0`. Replies" in card


def test_card_body_carries_the_run_figures():
    card = build_sft_card(sft_stats(), options=PublishOptions(repo_id=REPO_ID))
    assert "Generator `builtin:smollm2-135m-instruct`, prompt version `sft-v1@abc`, follow-up prompt `followup@def`, seed 7." in card
    for line in ("| conversations | 4 |", "| rows per rendering (train) | 2 |", "| skip rows | 1 |", "| failed conversations | 1 |",
                 "| assistant turns | 3 |", "| turns per conversation | 1: 1, 2: 1 |", "| failures by reason | too_many_citations: 1 |",
                 "| canaries woven in | canary-a: 1 |", "| generated tokens | 12,345 |",
                 "| wild | 3 prompts, 2 kept, 0 skipped, 1 failed |", "| beaver | 1 prompts, 0 kept, 1 skipped, 0 failed |"):
        assert line in card, line
    assert f'load_dataset("{REPO_ID}", "cited", split="train")' in card
    assert "(source-licences, see `LICENSE.md`)" in card
    empty = build_sft_card({"rows": {}}, options=PublishOptions(repo_id=REPO_ID))
    assert "| failures by reason | none |" in empty and "| canaries woven in | none |" in empty


def test_staged_folder_holds_the_datasets_card_stats_and_licence(tmp_path, no_token):
    out = sft_output(tmp_path)
    dest = tmp_path / "staging"
    options = PublishOptions(repo_id=REPO_ID)
    paths = build_sft_repo_folder(out, dest, options=options)
    assert paths == ["LICENSE.md", "README.md", "data/cited/train-00000-of-00001.parquet", "data/paired/train-00000-of-00001.parquet",
                     "data/skip/skip-00000-of-00001.parquet", "data/uncited/train-00000-of-00001.parquet", "stats.json"]
    for rel in paths:
        if rel.startswith("data/") or rel == "stats.json":
            assert (dest / rel).read_bytes() == (out / rel).read_bytes(), rel
    assert (dest / "README.md").read_text() == build_sft_card(sft_stats(), options=options)
    assert REPO_ID in (dest / "LICENSE.md").read_text()
    cited = pq.read_table(dest / "data/cited/train-00000-of-00001.parquet")
    assert cited.column("messages").to_pylist()[0][1] == {"role": "assistant", "content": "Oil the chain [2.1]."}
    paired = pq.read_table(dest / "data/paired/train-00000-of-00001.parquet")
    assert paired.column_names == ["source", "source_id", "messages_cite", "messages_nocite", "n_turns", "meta"]
    first = paired.to_pylist()[0]
    assert [m["content"] for m in first["messages_cite"]] == [PROMPT, "Oil the chain [2.1]."]
    assert [m["content"] for m in first["messages_nocite"]] == [PROMPT, "Oil the chain."]
    assert json.loads(first["meta"]) == {"conversation_id": "c0", "category": None, "harm_category": "benign", "canary_id": None,
                                         "canary_action": None, "prompt_version": "sft-v1@abc", "model": "builtin:smollm2-135m-instruct"}


def test_restaging_replaces_an_earlier_staging_only(tmp_path, no_token):
    out = sft_output(tmp_path, skip=False)
    dest = tmp_path / "staging"
    first = build_sft_repo_folder(out, dest, options=PublishOptions(repo_id=REPO_ID))
    assert "data/skip/skip-00000-of-00001.parquet" not in first
    (dest / "leftover.txt").write_text("from an earlier staging")
    again = build_sft_repo_folder(out, dest, options=PublishOptions(repo_id=REPO_ID, license="mit"))
    assert again == [p for p in first if p != "LICENSE.md"]  # mit: the card links no licence file
    assert not (dest / "leftover.txt").exists()

    foreign = tmp_path / "someone-elses"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(PublishError, match="is not empty and is not a staging folder of this tool"):
        build_sft_repo_folder(out, foreign, options=PublishOptions(repo_id=REPO_ID))
    assert (foreign / "thesis.tex").read_text() == "precious"
    clone = tmp_path / "clone"   # a local clone of a Hub repository: it has a README.md, but no marker
    clone.mkdir()
    (clone / "README.md").write_text("someone's card")
    with pytest.raises(PublishError, match="is not a staging folder of this tool"):
        build_sft_repo_folder(out, clone, options=PublishOptions(repo_id=REPO_ID))
    assert [p.name for p in clone.iterdir()] == ["README.md"]


def test_an_unfinished_run_is_refused(tmp_path, no_token):
    out = sft_output(tmp_path)
    dataset_file(out, PAIRED).unlink()
    with pytest.raises(PublishError, match=r"paired/train-00000-of-00001\.parquet not found; .* run spp_sft\.py on it again"):
        build_sft_repo_folder(out, tmp_path / "staging", options=PublishOptions(repo_id=REPO_ID))
    dataset_file(out, "uncited").unlink()
    with pytest.raises(PublishError, match=r"uncited/train-00000-of-00001\.parquet not found; is --output a finished SFT run\?"):
        build_sft_repo_folder(out, tmp_path / "staging", options=PublishOptions(repo_id=REPO_ID))


WORDS = ("the of and to in is you that it was for on are as with they at be this have from or one had by word but not what all "
         "were we when your can said there use an each which she do how their if will up other about out many then them").split()


def test_a_token_in_any_staged_file_stops_the_staging(tmp_path, monkeypatch):
    token = "hf_" + secrets.token_hex(12)
    monkeypatch.setenv("HF_TOKEN", token)
    out = sft_output(tmp_path)
    assert "LICENSE.md" in build_sft_repo_folder(out, tmp_path / "clean", options=PublishOptions(repo_id=REPO_ID))
    rng = random.Random(0)   # varied prose: zstd codes its literals, so the token's bytes do not appear
    prose = " ".join(rng.choice(WORDS) for _ in range(600))
    leaky = pa.Table.from_pylist([row("c9", [{"role": "user", "content": f"{prose} my key is {token}. {prose}"},
                                             {"role": "assistant", "content": "Do not share keys."}])], schema=EXPORT_SCHEMA)
    # Compressed as the exports are: no byte search finds the token; the decoded values hold it.
    pq.write_table(leaky, dataset_file(out, "uncited"), compression="zstd")
    assert token.encode() not in dataset_file(out, "uncited").read_bytes()
    with pytest.raises(PublishError, match=r"a key \(the Hub token or the judge's\) appears in data/uncited/train-00000-of-00001\.parquet; "
                                           r"not publishing"):
        build_sft_repo_folder(out, tmp_path / "leaky", options=PublishOptions(repo_id=REPO_ID))
    # The judge endpoint's key (the variable the run's audit.judge.api_key_env names) is looked for too.
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-saved-login"))
    judge_key = "sk-" + secrets.token_hex(12)
    monkeypatch.setenv("OPENAI_API_KEY", judge_key)
    leaky = pa.Table.from_pylist([row("c9", [{"role": "user", "content": f"{prose} the endpoint key {judge_key}. {prose}"},
                                             {"role": "assistant", "content": "Do not share keys."}])], schema=EXPORT_SCHEMA)
    pq.write_table(leaky, dataset_file(out, "uncited"), compression="zstd")
    with pytest.raises(PublishError, match="appears in data/uncited/"):
        build_sft_repo_folder(out, tmp_path / "leaky2", options=PublishOptions(repo_id=REPO_ID))
