"""Config: YAML instances validate, overrides apply, bad input names the field."""

from __future__ import annotations

import pytest

from annotator.config import ConfigError, load_config
from tests.support import REPO, run_pipeline


def test_demo_and_production_configs_validate():
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.generation.model == "builtin:smollm2-135m-instruct"
    assert demo.generation.num_gpus == 0
    prod = load_config(REPO / "configs" / "production-gpu.yaml")
    assert prod.generation.num_gpus >= 1
    assert prod.input.paths[0].startswith("hf://datasets/")
    # A GPU replica keeps vLLM's 1,024 sequences running: five batches of 256 in flight together.
    assert (prod.generation.reproducible, prod.generation.engine_seqs, prod.generation.concurrent_batches) == (False, 1024, 5)
    assert "continuous batching" in prod.generation.batching and not demo.generation.reproducible


def test_the_engine_runs_inline_on_cpu_and_in_its_own_process_on_gpus(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    demo = load_config(REPO / "configs" / "demo.yaml").generation
    prod = load_config(REPO / "configs" / "production-gpu.yaml").generation
    assert (demo.engine_process, demo.engine_inline, prod.engine_inline) == ("auto", True, False)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")  # a user's own vLLM binding: vLLM's engine process applies it
    assert not demo.engine_inline
    assert load_config(REPO / "configs" / "production-gpu.yaml", overrides=["generation.engine_process=inline"]).generation.engine_inline
    with pytest.raises(ConfigError, match=r"engine_process: inline runs one device per replica"):
        load_config(REPO / "configs" / "production-gpu.yaml",
                    overrides=["generation.engine_process=inline", "generation.tensor_parallel_size=2"])


def test_override_sets_one_field_with_yaml_typing():
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides=["generation.temperature=0.2", "input.limit=7"])
    assert cfg.generation.temperature == 0.2
    assert cfg.input.limit == 7


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match=r"generation\.temprature: unknown field"):
        load_config(REPO / "configs" / "demo.yaml", overrides=["generation.temprature=0.2"])


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"selection\.bad_threshold: .*less than or equal to 5.*\(got 9\)"):
        load_config(REPO / "configs" / "demo.yaml", overrides=["selection.bad_threshold=9"])


def test_output_inside_input_refused():
    with pytest.raises(ConfigError, match="output.path"):
        load_config(base={"input": {"paths": ["/data/x"]}, "output": {"path": "/data/x"}})


def test_cli_reports_bad_field_and_exits_2():
    proc = run_pipeline("--config", "configs/demo.yaml", "--set", "selection.mode=everything", timeout=120)
    assert proc.returncode == 2
    assert "selection.mode" in proc.stderr
    assert "token_matched" in proc.stderr  # the allowed values are listed


def test_prompt_layout_and_kv_block_size():
    demo = load_config(REPO / "configs" / "demo.yaml").generation
    prod = load_config(REPO / "configs" / "production-gpu.yaml").generation
    assert demo.prompt_layout == prod.prompt_layout == "auto"
    # On CPU the cache is shared at 32-token blocks (vLLM's CPU default is 128); GPUs keep vLLM's default.
    assert (demo.engine_block_size, prod.engine_block_size) == (32, None)
    assert load_config(REPO / "configs" / "demo.yaml", overrides=["generation.block_size=64"]).generation.engine_block_size == 64
    for bad, message in (("generation.prompt_layout=sideways", "generation.prompt_layout: Input should be 'auto', 'published' or 'shared'"),
                         ("generation.block_size=0", "generation.block_size: Value error, must be >= 1 or 'auto'")):
        with pytest.raises(ConfigError) as err:
            load_config(REPO / "configs" / "demo.yaml", overrides=[bad])
        assert message in str(err.value)
