"""Config sections, each from its own module: unknown fields refused by name, every section's
validator and its message, and `load_config`'s overrides and the errors that name the field."""

from __future__ import annotations

import re

import pydantic
import pytest

from annotator.config.audit import AuditConfig, JudgeConfig, LedgerConfig, PlanConfig, ReflectionAuditConfig
from annotator.config.base import ConfigError, Section, refuse_moved
from annotator.config.generation import (
    AnnotationConfig, CanaryConfig, CanaryItem, GenerationConfig, GuardConfig, PauseConfig, TemplateConfig,
)
from annotator.config.output import OutputConfig, PublishConfig, RayConfig
from annotator.config.run import RunConfig, load_config
from annotator.config.scoring import CascadeConfig, ClassifierConfig, InputConfig, SelectionConfig
from annotator.config.sft import SftConfig, SftSourceConfig
from tests.support import REPO

DEMO = REPO / "configs" / "demo.yaml"
MINIMAL = {"input": {"paths": ["/data/in"]}, "output": {"path": "/data/out"}}

# Every section class with the fields it requires (none for most).
SECTIONS = [
    (InputConfig, {"paths": ["/data/in"]}), (CascadeConfig, {}), (ClassifierConfig, {}), (SelectionConfig, {}),
    (AnnotationConfig, {}), (CanaryItem, {"id": "c", "value": "v", "instruction": "i"}), (CanaryConfig, {}),
    (PauseConfig, {}), (GuardConfig, {}), (GenerationConfig, {}), (TemplateConfig, {}),
    (OutputConfig, {"path": "/data/out"}), (PublishConfig, {}), (RayConfig, {}),
    (JudgeConfig, {}), (ReflectionAuditConfig, {}), (LedgerConfig, {}), (AuditConfig, {}), (PlanConfig, {}),
    (SftSourceConfig, {"name": "s", "path": "/p"}), (SftConfig, {}), (RunConfig, MINIMAL),
]


def errors_of(cls, data: dict) -> list[dict]:
    with pytest.raises(pydantic.ValidationError) as info:
        cls.model_validate(data)
    return info.value.errors()


@pytest.mark.parametrize("cls,required", SECTIONS, ids=[c.__name__ for c, _ in SECTIONS])
def test_every_section_refuses_an_unknown_field_by_name(cls, required):
    assert issubclass(cls, Section)
    cls.model_validate(required)  # the required fields alone are a valid section
    errors = errors_of(cls, {**required, "colour": "blue"})
    assert [(e["loc"], e["type"]) for e in errors] == [(("colour",), "extra_forbidden")]


def test_sections_validate_assignment_too():
    sel = SelectionConfig()
    sel.bad_threshold = 5
    assert sel.bad_threshold == 5
    with pytest.raises(pydantic.ValidationError, match="bad_threshold"):
        sel.bad_threshold = 6
    assert sel.bad_threshold == 5


def test_refuse_moved_names_where_the_field_went():
    data = {"keys": ["topic"]}
    assert refuse_moved(data, enabled="moved to recipes") is data
    assert refuse_moved("not a mapping", enabled="moved") == "not a mapping"
    with pytest.raises(ValueError, match="^moved to recipes$"):
        refuse_moved({"enabled": True, "keys": []}, enabled="moved to recipes")
    assert issubclass(ConfigError, ValueError)


def test_scoring_sections_validators():
    assert "at least one input path is required" in errors_of(InputConfig, {"paths": []})[0]["msg"]
    assert errors_of(InputConfig, {"paths": ["x"], "rows_per_unit": 0})[0]["loc"] == ("rows_per_unit",)
    # A cascade starts with fastText: a transformers first stage with a cascade is refused.
    err = errors_of(ClassifierConfig, {"backend": "transformers", "cascade": {"model": "m"}})[0]
    assert "cascade starts with the fastText scorer" in err["msg"] and "got transformers" in err["msg"]
    assert ClassifierConfig(backend="transformers").cascade.model is None
    assert ClassifierConfig(cascade={"model": "m", "threshold": 4}).cascade.threshold == 4
    assert errors_of(CascadeConfig, {"threshold": 6})[0]["loc"] == ("threshold",)
    assert errors_of(SelectionConfig, {"mode": "everything"})[0]["loc"] == ("mode",)
    assert errors_of(SelectionConfig, {"min_confidence": 1.5})[0]["loc"] == ("min_confidence",)


def test_generation_sections_validators():
    moved = errors_of(AnnotationConfig, {"enabled": True})[0]["msg"]
    assert "annotations.enabled was replaced by the annotations recipe" in moved
    for keys in (["topic", "topic"], ["topic", "not-a-name"], [], [""]):
        assert "keys must be distinct non-empty identifiers" in errors_of(AnnotationConfig, {"keys": keys})[0]["msg"]
    assert AnnotationConfig(keys=["topic", "reading_level"]).keys == ["topic", "reading_level"]

    assert "generation.tokenizer was replaced by output.tokenizer" in errors_of(GenerationConfig, {"tokenizer": "x"})[0]["msg"]
    assert "recipe 'nope': not a built-in recipe (annotations, preflection" in errors_of(GenerationConfig, {"recipes": ["reflection", "nope"]})[0]["msg"]
    assert "recipes must have distinct names" in errors_of(GenerationConfig, {"recipes": ["summary", "summary"]})[0]["msg"]
    assert "name at least one recipe" in errors_of(GenerationConfig, {"recipes": []})[0]["msg"]
    assert GenerationConfig(recipes=["summary", "reflection"]).recipes == ["summary", "reflection"]
    assert "must be > 0 or 'auto'" in errors_of(GenerationConfig, {"num_cpus": 0})[0]["msg"]
    assert GenerationConfig(num_cpus="auto").num_cpus == "auto"
    assert GenerationConfig(num_cpus=2.5).num_cpus == 2.5
    assert errors_of(GenerationConfig, {"max_reflection_tokens": 2048})[0]["loc"] == ("max_reflection_tokens",)
    assert errors_of(PauseConfig, {"snap": "line"})[0]["loc"] == ("snap",)


def test_canary_fraction_defaults_to_a_tenth_only_when_canaries_are_given():
    assert CanaryConfig().effective_fraction == 0.0
    assert CanaryConfig(file="canaries.yaml").effective_fraction == 0.1
    assert CanaryConfig(items=[{"id": "c", "value": "v", "instruction": "i"}]).effective_fraction == 0.1
    assert CanaryConfig(file="canaries.yaml", fraction=0.0).effective_fraction == 0.0
    assert CanaryConfig(fraction=0.25).effective_fraction == 0.25
    assert CanaryItem(id="c", value="v", instruction="i").instruction_3p is None


def test_output_audit_and_sft_sections_validators():
    for voices in (["1p", "1p"], []):
        assert "voices must be a non-empty list of distinct voices" in errors_of(OutputConfig, {"path": "o", "voices": voices})[0]["msg"]
    assert errors_of(OutputConfig, {"path": "o", "voices": ["2p"]})[0]["loc"][0] == "voices"
    assert OutputConfig(path="o", voices=["3p", "1p"]).voices == ["3p", "1p"]
    assert errors_of(OutputConfig, {"path": "o", "seq_length": 32})[0]["loc"] == ("seq_length",)
    assert errors_of(RayConfig, {"progress_interval_s": 0})[0]["loc"] == ("progress_interval_s",)
    assert errors_of(LedgerConfig, {"teacher": "oracle"})[0]["loc"] == ("teacher",)
    assert errors_of(JudgeConfig, {"max_model_len": 100})[0]["loc"] == ("max_model_len",)
    assert errors_of(AuditConfig, {"judge": {"tempreature": 0}})[0]["loc"] == ("judge", "tempreature")
    assert errors_of(PlanConfig, {"calibration_documents": 0})[0]["loc"] == ("calibration_documents",)

    err = errors_of(SftConfig, {"sources": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]})[0]
    assert "source names must be distinct" in err["msg"] and "['a', 'a']" in err["msg"]
    ok = SftConfig(sources=[{"name": "a", "path": "x"}, {"name": "b", "path": "y", "harm_category": "benign"}])
    assert [s.harm_category for s in ok.sources] == ["unknown", "benign"]
    assert errors_of(SftSourceConfig, {"name": "a", "path": "x", "harm_category": "evil"})[0]["loc"] == ("harm_category",)
    assert errors_of(SftSourceConfig, {"name": "a", "path": "x", "weight": 0})[0]["loc"] == ("weight",)


def test_run_config_checks_the_window_and_the_output_location():
    cfg = RunConfig.model_validate(MINIMAL)
    assert cfg.content_tokens == 2048 - 128
    wide = RunConfig.model_validate({**MINIMAL, "output": {"path": "/data/out", "seq_length": 4096},
                                     "generation": {"max_reflection_tokens": 256}})
    assert wide.content_tokens == 4096 - 256
    small = errors_of(RunConfig, {**MINIMAL, "output": {"path": "/data/out", "seq_length": 140}})[0]["msg"]
    assert "output.seq_length 140 leaves 12 content tokens" in small
    block = errors_of(RunConfig, {**MINIMAL, "generation": {"max_reflection_tokens": 64, "annotations": {"max_block_tokens": 65}}})
    assert "max_block_tokens must fit the budget" in block[0]["msg"] and "max_reflection_tokens = 64" in block[0]["msg"]
    same = errors_of(RunConfig, {"input": {"paths": ["/data/x/"]}, "output": {"path": "/data/x"}})[0]["msg"]
    assert "is also an input path; refusing to write into the input" in same
    # A URL input is never compared with a local output.
    assert RunConfig.model_validate({"input": {"paths": ["s3://b/x"]}, "output": {"path": "b/x"}}).output.path == "b/x"
    assert {e["loc"] for e in errors_of(RunConfig, {})} == {("input",), ("output",)}


def test_load_config_overrides_are_yaml_typed_and_nested():
    cfg = load_config(DEMO, overrides=["generation.pause.snap=token", "output.voices=[1p, 3p]", "input.limit=null",
                                       "generation.sampling={top_k: 20}", "selection.fraction=0.5", "input.text_column = body"])
    assert cfg.generation.pause.snap == "token"
    assert cfg.output.voices == ["1p", "3p"]
    assert cfg.input.limit is None
    assert cfg.generation.sampling == {"top_k": 20}
    assert cfg.selection.fraction == 0.5
    assert cfg.input.text_column == "body"
    # Untouched fields keep the file's values; a later override wins over an earlier one.
    assert cfg.generation.prompt_pack == "reflection-v2"
    assert load_config(DEMO, overrides=["input.limit=5", "input.limit=9"]).input.limit == 9
    # A new section is created by an override.
    assert load_config(DEMO, overrides=["plan.documents=1000"]).plan.documents == 1000


def test_load_config_from_a_base_tree_without_a_file():
    cfg = load_config(base=MINIMAL, overrides=["output.seq_length=4096"])
    assert cfg.input.paths == ["/data/in"]
    assert cfg.output.seq_length == 4096
    assert cfg.generation.model == "builtin:smollm2-135m-instruct"


def test_load_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'nothing' must look like section\.field=value"):
        load_config(DEMO, overrides=["nothing"])
    with pytest.raises(ConfigError, match=r"override 'input\.limit\.x': 'limit' is not a section"):
        load_config(DEMO, overrides=["input.limit.x=1"])
    with pytest.raises(ConfigError, match=r"generation\.pause\.snap: Input should be 'word' or 'token' \(got 'line'\)"):
        load_config(DEMO, overrides=["generation.pause.snap=line"])
    with pytest.raises(ConfigError, match=r"^invalid config:\n  sft\.sources\.0\.colour: unknown field$"):
        load_config(DEMO, overrides=["sft.sources=[{name: a, path: x, colour: red}]"])
    with pytest.raises(ConfigError) as two:
        load_config(DEMO, overrides=["input.limit=0", "output.compresion=gzip"])
    lines = str(two.value).splitlines()
    assert lines[0] == "invalid config:"
    assert sorted(line.strip().split(":")[0] for line in lines[1:]) == ["input.limit", "output.compresion"]

    listed = tmp_path / "list.yaml"
    listed.write_text("- input\n- output\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listed)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"input: Field required"):
        load_config(empty)


def test_overrides_do_not_reach_the_callers_base():
    base = {"input": {"paths": ["x"]}, "output": {"path": "out", "seq_length": 2048}}
    cfg = load_config(None, base=base, overrides=["output.seq_length=4096"])
    assert cfg.output.seq_length == 4096 and base["output"]["seq_length"] == 2048


ODD_PATHS = ["/runs/exp #2", "/runs/a, b", "/runs/key: value", "/runs/data[1]", "/runs/with space", "/runs/caf\u00e9 \u65e5\u672c",
             "/runs/{braces}", "/runs/- dash", "null", "true", "0.5"]


@pytest.mark.parametrize("path", ODD_PATHS)
def test_path_flags_are_literal_strings(path):
    """`--output` (and every flag that stands for a field) sets its field as it is; `--set` keeps
    YAML values. `--output "/runs/exp #2"` read as YAML was `/runs/exp`: with --overwrite, another run."""
    from pipelines.spp_reflections import parse_args
    from pipelines.cli import cli_overrides

    args = parse_args(["--config", str(DEMO), "--output", path, "--limit", "3", "--overwrite", "--set", "input.limit=5"])
    cfg = load_config(args.config, overrides=cli_overrides(args, {"input.limit": args.limit}))
    assert cfg.output.path == path and cfg.output.overwrite is True
    assert cfg.input.limit == 3   # the flag comes after --set, typed by argparse
    assert load_config(DEMO, overrides=[("output.path", path)]).output.path == path
    assert load_config(DEMO, overrides=[("input.paths", [path])]).input.paths == [path]


def test_output_path_takes_object_storage_urls_and_refuses_what_cannot_hold_a_run():
    assert load_config(DEMO, overrides=[("output.path", "s3://bucket/prefix")]).output.path == "s3://bucket/prefix"
    assert load_config(DEMO, overrides=[("output.path", "file:///tmp/x")]).output.path == "file:///tmp/x"
    refused = {"hf://datasets/me/x": "hf:// cannot hold a run's output", "https://host/x": "https:// cannot hold a run's output",
               "s3://": "names no bucket", "nosuchfs://b/p": "no filesystem for nosuchfs://",
               "s3://AKIA:secret@bucket/p": "must not carry credentials", "s3://bucket/p?key=AKIA": "must not carry credentials"}
    for url, why in refused.items():
        with pytest.raises(ConfigError, match=rf"output\.path: .*{re.escape(why)}"):
            load_config(DEMO, overrides=[("output.path", url)])
    assert load_config(DEMO, overrides=[("output.path", "/runs/s3:bucket")]).output.path == "/runs/s3:bucket"   # a colon is not a URL


def test_a_judge_endpoint_url_carries_no_credentials():
    ok = load_config(DEMO, overrides=[("audit.judge.base_url", "https://judge.example.org:8443/v1")])
    assert ok.audit.judge.base_url == "https://judge.example.org:8443/v1"
    for url in ("https://me:s3cret@judge.example.org/v1", "https://judge.example.org/v1?api_key=s3cret", "https://tok@host/v1"):
        with pytest.raises(ConfigError, match=r"audit\.judge\.base_url: Value error, must not carry credentials"):
            load_config(DEMO, overrides=[("audit.judge.base_url", url)])
