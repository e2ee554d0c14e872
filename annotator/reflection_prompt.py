"""Reflection prompts: the value constitution, reading pause points, and the request text.

The constitution comes first and is identical in every request so vLLM's prefix cache
computes it once per replica. Everything random here is a pure function of (seed, doc_id).
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from importlib import resources

PROMPT_VERSION = "reflect-v1"
CONSTITUTION_FILE = "constitution.md"
_SECTION = re.compile(r"^(\d+\.\d+)\s", re.MULTILINE)
CITATION = re.compile(r"\[(\d+\.\d+)\]")

# Pause point density: rises linearly on [0, RAMP] and is flat on [RAMP, 1].
RAMP = 0.2
_RAMP_MASS = RAMP / (2 - RAMP)  # CDF at RAMP: (RAMP/2) / (RAMP/2 + 1 - RAMP)


@lru_cache(maxsize=None)
def constitution_text() -> str:
    return resources.files("annotator").joinpath("prompts", CONSTITUTION_FILE).read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def constitution_sections() -> frozenset[str]:
    """Section ids (X.Y) that citations may name."""
    return frozenset(_SECTION.findall(constitution_text()))


def unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) fixed by `parts`; order- and worker-independent."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def pause_fraction_from_uniform(u: float) -> float:
    """Inverse CDF of the pause point density (linear ramp over the first 20%, then uniform)."""
    if u < _RAMP_MASS:
        return RAMP * (u / _RAMP_MASS) ** 0.5
    return RAMP + (u - _RAMP_MASS) / (1 - _RAMP_MASS) * (1 - RAMP)


def sample_pause_fraction(seed: int, doc_id: str) -> float:
    return pause_fraction_from_uniform(unit_hash("pause", seed, doc_id))


def system_prompt() -> str:
    sections = ", ".join(sorted(constitution_sections(), key=lambda s: tuple(map(int, s.split(".")))))
    return (
        "You are a reflective persona who lives by the constitution below.\n\n"
        f"{constitution_text()}\n"
        "You will be shown a document that you have read up to a pause point. Reply with JSON only:\n"
        '- "analysis": one or two sentences on what the text is doing and whether anyone could be harmed;\n'
        '- "reflection_1p": a short reflection in your own first-person voice ("I notice ...");\n'
        '- "reflection_3p": the same reflection about the persona in the third person ("The assistant notices ...");\n'
        f'- "citations": the constitution sections the reflection relies on, chosen from: {sections}.\n'
        "Cite sections inside the reflections as [X.Y]. Keep each reflection under 80 words."
    )


def user_prompt(document_prefix: str) -> str:
    return f"Document (read up to the pause point):\n<<<\n{document_prefix}\n>>>\nWrite your JSON reply."


def reflection_schema(*, max_chars: int) -> dict:
    """JSON schema enforced by vLLM structured outputs. `max_chars` bounds each string so the
    whole reply fits the token budget; the exact token cut happens after generation."""
    text = {"type": "string", "minLength": 1, "maxLength": max_chars}
    ids = sorted(constitution_sections())
    return {
        "type": "object",
        "properties": {
            "analysis": text,
            "reflection_1p": text,
            "reflection_3p": text,
            "citations": {"type": "array", "items": {"type": "string", "enum": ids}, "minItems": 1, "maxItems": 3},
        },
        "required": ["analysis", "reflection_1p", "reflection_3p", "citations"],
        "additionalProperties": False,
    }


ANNOTATION_PROMPT_VERSION = "annotate-v1"


def annotation_system_prompt(keys: list[str]) -> str:
    return (
        "You label web documents with short semantic annotations. Reply with JSON only, one short value "
        f"(a few words, lowercase) for each of these keys: {', '.join(keys)}. "
        "For entities give the main named entities separated by commas, or none."
    )


def annotation_user_prompt(document_head: str) -> str:
    return f"Document:\n<<<\n{document_head}\n>>>\nWrite your JSON annotations."


def annotation_schema(keys: list[str], *, max_chars: int) -> dict:
    value = {"type": "string", "minLength": 1, "maxLength": max_chars}
    return {
        "type": "object",
        "properties": {k: value for k in keys},
        "required": list(keys),
        "additionalProperties": False,
    }
