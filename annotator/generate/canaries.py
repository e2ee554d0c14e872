"""Canaries in generation: which canaries a run draws from, which document gets one (seeded by
document id), and whether a reply carries the canary's value.
"""

from __future__ import annotations

from annotator.config import ConfigError, GenerationConfig
from annotator.core.seeding import unit_hash
from annotator.method.prompt_packs import Canary, load_canaries


def run_canaries(cfg: GenerationConfig) -> list[Canary]:
    """The canaries a run draws from: the file's `inject` entries, then the inline items."""
    items = load_canaries(cfg.canaries.file) if cfg.canaries.file else []
    items += [Canary(id=c.id, value=c.value, instruction=c.instruction, instruction_3p=c.instruction_3p) for c in cfg.canaries.items]
    ids = [c.id for c in items]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"generation.canaries: canary ids must be distinct, got {ids}")
    return items


def assign_canary(canaries: list[Canary], *, fraction: float, seed: int, doc_id: str) -> Canary | None:
    """A canary for `fraction` of documents, chosen uniformly; a pure function of (seed, doc_id)."""
    if not canaries or unit_hash("canary", seed, doc_id) >= fraction:
        return None
    return canaries[int(unit_hash("canary-choice", seed, doc_id) * len(canaries))]


def canary_present(text: str | None, canary: Canary) -> bool:
    return bool(text) and canary.value.casefold() in text.casefold()
