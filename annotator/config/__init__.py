"""The one typed configuration tree of a run, split by section (one module per part of the run).

YAML files in `configs/` are instances of `RunConfig`; the CLI overrides single fields with
`--set section.field=value`. Every field carries its documentation once, in its section's module.
"""

from annotator.config.base import ConfigError, refuse_moved, Section
from annotator.config.scoring import InputConfig, CascadeConfig, ClassifierConfig, PrecisionConfig, SelectionConfig
from annotator.config.generation import AnnotationConfig, CanaryItem, CanaryConfig, PauseConfig, GuardConfig, GenerationConfig, TemplateConfig
from annotator.config.output import OutputConfig, PublishConfig, RayConfig
from annotator.config.audit import JudgeConfig, ReflectionAuditConfig, LedgerConfig, AuditConfig, PlanConfig
from annotator.config.sft import SftSourceConfig, SftConfig
from annotator.config.run import RunConfig, load_config

__all__ = [
    "ConfigError",
    "refuse_moved",
    "Section",
    "InputConfig",
    "CascadeConfig",
    "ClassifierConfig",
    "PrecisionConfig",
    "SelectionConfig",
    "AnnotationConfig",
    "CanaryItem",
    "CanaryConfig",
    "PauseConfig",
    "GuardConfig",
    "GenerationConfig",
    "TemplateConfig",
    "OutputConfig",
    "PublishConfig",
    "RayConfig",
    "JudgeConfig",
    "ReflectionAuditConfig",
    "LedgerConfig",
    "AuditConfig",
    "PlanConfig",
    "SftSourceConfig",
    "SftConfig",
    "RunConfig",
    "load_config",
]
