"""The generation cache (`generate/cache.py`): engine batches that depend on the unit alone and
skip what an earlier run saved, saved batches and their counts; and the generator's reply shapes
(`generate/generator.py`: the structured-output schema, annotation tags)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from annotator.config import GenerationConfig, RunConfig, load_config
from annotator.core.checkpoint import write_table
from annotator.core.layout import generated_batch_path
from annotator.generate.cache import (
    cached_generations, generation_counts, generation_key, needs_generation, plan_batches, save_generations,
)
from annotator.core.statuses import NOT_SELECTED
from annotator.generate.generator import FAILED_REPLY, json_schema, parse_tags
from tests.support import REPO


def documents(n: int) -> pa.Table:
    return pa.table({"doc_id": [f"d{i}" for i in range(n)], "text": [f"text {i}" for i in range(n)],
                     "selected": [i % 2 == 0 for i in range(n)], "is_bad": [i == 0 for i in range(n)]})


def test_batches_follow_the_unit_and_skip_saved_ones(tmp_path):
    plans = plan_batches(documents(5), unit="u1", out_dir=tmp_path, batch_size=2, pass_name=None)
    assert [(p["batch_index"], p["doc_ids"]) for p in plans] == [(0, ["d0", "d1"]), (1, ["d2", "d3"]), (2, ["d4"])]
    assert plans[0]["selected_flags"] == [True, False] and plans[0]["bad_flags"] == [True, False]
    assert plans[0]["languages"] == [None, None]  # scored before language identification: `{language}` says undetermined
    with_language = documents(3).append_column("language", pa.array(["de", "en", "fr"]))
    assert [p["languages"] for p in plan_batches(with_language, unit="u9", out_dir=tmp_path, batch_size=2, pass_name=None)] == [["de", "en"], ["fr"]]
    saved = generated_batch_path(tmp_path, "u1", index=1)
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"")
    assert [p["batch_index"] for p in plan_batches(documents(5), unit="u1", out_dir=tmp_path, batch_size=2, pass_name=None)] == [0, 2]
    # An added recipe's batches live apart from the run's own.
    assert len(plan_batches(documents(5), unit="u1", out_dir=tmp_path, batch_size=2, pass_name="preflection")) == 3


def test_needs_generation_is_the_selection_unless_a_recipe_applies_to_all():
    selected = pa.array([True, None, False])
    assert needs_generation(selected, GenerationConfig()).to_pylist() == [True, False, False]
    everything = GenerationConfig(recipes=["reflection", "annotations"], annotations={"apply_to": "all"})
    assert needs_generation(selected, everything).to_pylist() == [True, True, True]


def test_a_saved_batch_keeps_its_columns_and_key_and_counts_its_outcomes(tmp_path):
    batch = pa.table({"doc_id": ["a", "b", "c"], "reflection_1p": ["x", None, None], "reflection_status": ["ok", NOT_SELECTED, "failed:too_long"],
                      FAILED_REPLY: [None, None, "raw"], "gen_output_tokens": pa.array([12, 0, 30], pa.int32()),
                      "gen_prompt_tokens": pa.array([900, 0, 950], pa.int32()), "gen_cached_prompt_tokens": pa.array([800, 0, 0], pa.int32()),
                      "_seconds_generate": [0.5, 0.0, 0.7], "unrelated": [1, 2, 3]})
    path = tmp_path / "b.parquet"
    save_generations(batch, path=path, generation_key="k1", columns=["reflection_1p", "reflection_status"])
    counts = generation_counts(batch, main_status="reflection_status")
    assert counts == {"documents": 3, "selected": 2, "generated_tokens": 42, "prompt_tokens": 1850, "cached_prompt_tokens": 800, "failures": 1}
    saved = pq.read_table(path)
    assert saved.column_names == ["doc_id", "reflection_1p", "reflection_status", FAILED_REPLY, "_seconds_generate", "generation_key"]
    assert saved.column("generation_key").to_pylist() == ["k1"] * 3


def test_reply_schema_and_annotation_tags():
    schema = json_schema(("analysis", "reflection_1p"), max_chars=600)
    assert schema["required"] == ["analysis", "reflection_1p"] and schema["additionalProperties"] is False
    assert schema["properties"]["analysis"] == {"type": "string", "maxLength": 600}
    assert parse_tags('{"topic": "  public   health ", "domain": "news"}', ["topic", "domain"]) == (["topic:public health", "domain:news"], "ok")
    assert parse_tags('{"topic": "health"}', ["topic", "domain"]) == (None, "empty_domain")
    assert parse_tags("no json here", ["topic"]) == (None, "unparseable_json")


def demo(*overrides: str) -> RunConfig:
    return load_config(REPO / "configs" / "demo.yaml", overrides=list(overrides))


def test_generation_key_follows_what_decides_a_generation():
    key = generation_key(demo())
    assert len(key) == 16
    for same in ("generation.concurrency=3", "generation.enabled=false", "output.path=/x", "selection.bad_threshold=4",
                 "generation.enforce_eager=false"):
        assert generation_key(demo(same)) == key, same
    # sampling, the engine batches, and the content a window keeps (pause points) change it
    for other in ("generation.temperature=0.1", "generation.batch_size=16", "output.seq_length=4096",
                  "generation.prompt_pack=reflection-v1"):
        assert generation_key(demo(other)) != key, other


def test_cached_generations_keep_only_this_generation_key(tmp_path):
    assert cached_generations(tmp_path, "u", key="k1") is None
    for index, (keys, ids) in enumerate([(["k1", "k0"], ["a", "b"]), (["k1"], ["c"])]):
        write_table(generated_batch_path(tmp_path, "u", index=index), pa.table({"doc_id": ids, "generation_key": keys}))
    write_table(generated_batch_path(tmp_path, "u", index=0, pass_name="summary"),
                pa.table({"doc_id": ["z"], "generation_key": ["k1"]}))
    assert cached_generations(tmp_path, "u", key="k1").column("doc_id").to_pylist() == ["a", "c"]
    assert cached_generations(tmp_path, "u", key="k0").column("doc_id").to_pylist() == ["b"]
    assert cached_generations(tmp_path, "u", key="k9").num_rows == 0
    assert cached_generations(tmp_path, "u", key="k1", pass_name="summary").column("doc_id").to_pylist() == ["z"]
    assert cached_generations(tmp_path, "other", key="k1") is None
