"""The whole tree of a run and how it is loaded: YAML, then `section.field=value` overrides, then validation."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from annotator.config.base import ConfigError, Section
from annotator.config.scoring import ClassifierConfig, InputConfig, SelectionConfig
from annotator.config.generation import GenerationConfig
from annotator.config.output import OutputConfig, PublishConfig, RayConfig
from annotator.config.audit import AuditConfig, PlanConfig
from annotator.config.sft import SftConfig


class RunConfig(Section):
    input: InputConfig = Field(description="What to read.")
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig, description="Safety scoring.")
    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="Which documents get a reflection.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Reflection generation.")
    output: OutputConfig = Field(description="Where and how to write.")
    publish: PublishConfig = Field(default_factory=PublishConfig, description="Publishing to the Hugging Face Hub.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster settings.")
    sft: SftConfig = Field(default_factory=SftConfig, description="Persona-binding SFT data (`pipelines/spp_sft.py`).")
    audit: AuditConfig = Field(default_factory=AuditConfig, description="Judge audit and calibration ledger of a finished run (`pipelines/audit.py`).")
    plan: PlanConfig = Field(default_factory=PlanConfig, description="The cost plan (`--plan`).")

    @model_validator(mode="after")
    def _window_fits(self) -> "RunConfig":
        if self.content_tokens < 16:
            raise ValueError(f"output.seq_length {self.output.seq_length} leaves {self.content_tokens} content tokens after the "
                             "reflection budget")
        if self.generation.annotations.max_block_tokens > self.generation.max_reflection_tokens:
            raise ValueError("generation.annotations.max_block_tokens must fit the budget a window reserves "
                             f"(generation.max_reflection_tokens = {self.generation.max_reflection_tokens})")
        return self

    @property
    def content_tokens(self) -> int:
        """Content tokens an annotated document keeps (and where its pause point may lie): the
        window's seq_length minus the budget every recipe's placed text fits (reflection,
        preflection field, summary, annotation block)."""
        return self.output.seq_length - self.generation.max_reflection_tokens

    @model_validator(mode="after")
    def _output_not_input(self) -> "RunConfig":
        out = self.output.path.rstrip("/")
        for p in self.input.paths:
            if "://" not in p and out and Path(p.rstrip("/")).resolve() == Path(out).resolve():
                raise ValueError(f"output.path {out!r} is also an input path; refusing to write into the input")
        return self


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown field")
        else:
            lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _apply_override(tree: dict[str, Any], override: str | tuple[str, Any]) -> None:
    """`section.field=value` (a `--set`: the value is read as YAML), or a `(field, value)` pair set
    as it is (what a path flag means: `--output "/runs/exp #2"` is that folder, not `/runs/exp`
    followed by a YAML comment)."""
    if isinstance(override, tuple):
        key, value = override
    elif "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value")
    else:
        key, raw = override.split("=", 1)
        value = yaml.safe_load(raw)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, *, overrides: list[str | tuple[str, Any]] = (),
                base: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (or `base`), apply the overrides (`section.field=value` strings read as
    YAML, `(field, value)` pairs set as they are), validate."""
    tree: dict[str, Any] = copy.deepcopy(base or {})  # overrides must not reach the caller's dict
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        tree = loaded
    for override in overrides:
        _apply_override(tree, override)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
