"""Settings of the drivers that read a run: the judge audit, the calibration ledger and the cost plan."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from annotator.config.base import Section


class JudgeConfig(Section):
    model: str | None = Field(
        None, description="Judge model on the cluster's vLLM replicas (Hub id, directory or builtin:...); null: the run's generator. Ignored with base_url."
    )
    base_url: str | None = Field(
        None, description="An OpenAI-compatible endpoint (e.g. http://host:8000/v1) to judge through instead of replicas; `model` is the name it serves."
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the endpoint's key (read at run time, never written; must be set with base_url, to any value for an endpoint without a key).")

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, url: str | None) -> str | None:
        """The URL is logged and recorded (stats.json, report, card): a key in it would travel too."""
        if url is not None:
            parts = urlsplit(url)
            if parts.username or parts.password or parts.query or parts.fragment:
                raise ValueError("must not carry credentials or parameters (user:password@, ?key=...): give the key through "
                                 "audit.judge.api_key_env")
        return url
    num_gpus: float | None = Field(None, ge=0, description="GPUs per judge replica; null: generation.num_gpus. The other engine settings are generation's.")
    concurrency: int | None = Field(None, ge=1, description="Judge replicas (or, with base_url, requests in flight); null: generation.concurrency (x16 with base_url).")
    max_model_len: int | None = Field(None, ge=256, description="Judge context length; null: generation.max_model_len.")
    temperature: float = Field(0.0, ge=0, description="Judge sampling temperature (retries use a new seed).")
    max_output_tokens: int = Field(256, ge=16, description="Generated-token cap of one judgement.")
    max_retries: int = Field(2, ge=0, description="Retries (new seed) of a judgement that does not parse before it is recorded as failed.")
    max_document_chars: int = Field(6000, ge=100, description="The document shown to the judge is cut to this many characters.")
    batch_size: int = Field(64, ge=1, description="Judgements per batch: the grain of resume (each batch is saved when done).")
    request_timeout_s: float = Field(300, gt=0, description="With base_url: seconds one request may take.")
    reflection_pack: str = Field("judge-reflection-v1", description="Rubric of the reflection audit (fields: integer scores, then `reason`).")
    harm_pack: str = Field("judge-harm-v1", description="Rubric of the ledger's 0-5 harm re-scoring (fields: score, reason).")


class ReflectionAuditConfig(Section):
    sample: int = Field(200, ge=1, description="Reflections judged: a seeded sample stratified by safety score and selection reason.")
    seed: int = Field(0, description="Seed of the sample.")
    floor: int = Field(2, ge=0, description="Any dimension scored at or below this rejects the reflection.")
    accept_mean: float = Field(4.0, ge=0, description="Above the floor, a reflection is accepted when its mean score is at least this.")


class LedgerConfig(Section):
    per_bucket: int = Field(50, ge=1, description="Documents re-scored per classifier score bucket (0-5; all of a smaller bucket).")
    seed: int = Field(0, description="Seed of the sample.")
    teacher: Literal["judge", "classifier"] = Field(
        "judge", description="Who re-scores: the audit's judge with the harm rubric, or a transformers 6-label classifier (`teacher_model`)."
    )
    teacher_model: str | None = Field(None, description="teacher=classifier: a transformers 6-label classifier directory or Hub id.")
    teacher_max_length: int = Field(512, ge=8, description="teacher=classifier: inputs are cut at this many tokens.")


class AuditConfig(Section):
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="The judge model and how it runs.")
    reflections: ReflectionAuditConfig = Field(default_factory=ReflectionAuditConfig, description="The judge audit of reflections.")
    ledger: LedgerConfig = Field(default_factory=LedgerConfig, description="The calibration ledger of the safety scorer.")


class PlanConfig(Section):
    calibration_documents: int = Field(64, ge=1, description="Selected documents generated on the configured engine to measure the run's rates.")
    score_documents: int | None = Field(
        None, ge=1, description="Documents scored to count what the run selects (null: all of the input; the count is scaled to the input)."
    )
    documents: int | None = Field(
        None, ge=1, description="Project for this many documents of the same kind instead of the input's count (e.g. the full corpus from a sample)."
    )
