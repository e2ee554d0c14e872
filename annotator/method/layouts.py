"""Prompt layouts: how a recipe's requests are laid out, and so what a document's recipes share in
the engine's prefix cache (`generation.prompt_layout`).

- published (every pack): system = the pack's method, one user turn = the document and the task
  (the SPP runner's layout). Each recipe computes the document after its own system prompt.
- shared (a pack with a `shared:` form): system = a block several packs hold word for word (the
  built-in one: the constitution, the guidelines, every built-in track's instructions), then the
  document as its own user turn, then the pack's task as a final user turn. Requests of one
  document whose system block and document turn render the same text send the same token ids up
  to the task, so the document is computed once for all of them.

A pack's shared form is read here, only when a run asks for the shared layout: the published
layout never depends on it (a built-in pack copied elsewhere without `shared-v1/` still loads and
runs published), and its problems are found at start, naming the file.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from annotator.method.prompt_packs import (PROMPT_LAYOUTS, REQUEST_PLACEHOLDERS, SHARED_PARTS, PackError, PromptPack, check_placeholders,
                                           placeholders, read_entry)


def in_layout(pack: PromptPack, choice: str) -> PromptPack:
    """`pack` building prompts in `choice`: published; shared (where the pack has a shared form,
    published otherwise); auto (the pack's own `prompt_layout`). In the shared layout its version is
    `name@<hash of every file>+shared`, so rows, cached generations and fingerprints differ."""
    layout = pack.default_layout if choice == "auto" else choice
    if layout not in PROMPT_LAYOUTS:
        raise PackError(f"prompt layout must be auto or one of {list(PROMPT_LAYOUTS)}, got {choice!r}")
    if layout == "published" or not pack.shared_spec:
        return pack if pack.layout == "published" else replace(pack, layout="published", version=pack.published_version)
    return pack if pack.layout == "shared" else _shared_pack(pack)


def _shared_pack(pack: PromptPack) -> PromptPack:
    """The pack with its shared form read and checked: every placeholder known, each turn holding
    only what it may (the system block nothing per request, the document turn `{text}` once)."""
    manifest, spec = Path(pack.source), pack.shared_spec
    contents: dict[str, str] = {}

    def read(role: str, entry) -> str:
        if entry is None:
            raise PackError(f"{manifest}: 'shared.{role}' is required")
        contents[role] = read_entry(manifest, f"shared.{role}", entry=entry)[1]
        return contents[role]

    shared_files = {str(k): read(f"files.{k}", v) for k, v in sorted((spec.get("files") or {}).items())}
    parts = {part: read(part, spec.get(part)) for part in SHARED_PARTS}
    known = set(pack.files) | ({"charter"} if pack.constitution is not None else set()) | set(shared_files)
    where = f"{manifest}: shared"
    check_placeholders(parts["system"], f"{where}.system", allowed=known, forbidden=(*REQUEST_PLACEHOLDERS, "keys"))
    check_placeholders(parts["document"], f"{where}.document", allowed={"text"}, forbidden=())
    if parts["document"].count("{text}") != 1:
        raise PackError(f"{where}.document: the document turn must contain {{text}} exactly once")
    tags = {"keys"} if pack.format == "tags" else set()
    check_placeholders(parts["task"], f"{where}.task", allowed=known | {"canary", "language"} | tags, forbidden=())
    if pack.canary_template is not None and "canary" not in placeholders(parts["task"]):
        raise PackError(f"{where}.task: missing placeholder {{canary}}: the pack has a canary template")
    unused = sorted(set(shared_files) - {n for t in parts.values() for n in placeholders(t)})
    if unused:
        raise PackError(f"{where}.files: {unused} named but no shared template uses them")
    digest = hashlib.sha256(pack.published_version.encode())
    for role in sorted(contents):
        digest.update(f"\x00{role}\x00".encode() + contents[role].encode("utf-8"))
    return replace(pack, layout="shared", shared=parts, shared_files=shared_files,
                   version=f"{pack.name}@{digest.hexdigest()[:12]}+shared")
