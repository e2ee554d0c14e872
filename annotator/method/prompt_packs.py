"""Prompt packs: the method as data. A pack holds a constitution, the system and user message
templates with named placeholders, the reply fields (and which of them are reflection voices) and
the reply checks of one annotation task. It is a folder with `pack.yaml`, or a YAML file that names
files anywhere, so the published SPP files load unchanged from a user's path.

A pack's version is its name plus a content hash of every file it uses; it goes into every row,
`stats.json`, the card and the run fingerprint. Problems are found at load time, naming the file.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

BUILTIN_PREFIX = "builtin:"
PACK_FILE = "pack.yaml"
VOICES = ("1p", "3p")
# `{name}` where name is an identifier: JSON examples such as {"analysis": ...} are left alone.
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PLACEHOLDER_OR_ESCAPE = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Placeholders filled per request; the system prompt must not use them (it stays prefix-cached).
# `{language}`: the English name of the document's identified language (`German`), so a prompt can
# ask for a reply in the document's language.
REQUEST_PLACEHOLDERS = ("text", "canary", "language")
CANARY_PLACEHOLDERS = ("instruction", "instruction_3p", "value", "id")
# Reply formats: a JSON object of the pack's fields (structured outputs), plain text (one field),
# or `key:value` tags (a JSON object of configured keys; the system template may name them as {keys}).
FORMATS = ("json", "text", "tags")
# How a request's prompt is laid out, and the parts of a pack's shared form: see `layouts`.
PROMPT_LAYOUTS = ("published", "shared")
SHARED_PARTS = ("system", "document", "task")
CHECKS = ("voices_present", "no_key_leak", "voice_pairing", "third_person", "no_charter_mention", "no_cutoff_mention",
          "no_prompt_echo")
_SECTION_HEADING = re.compile(r"^#{2,6}[ \t]*§?(\d+\.\d+)\.?[ \t]+(\S[^\n]*?)[ \t#]*$", re.MULTILINE)
_SECTION_LINE = re.compile(r"^[ \t]*(\d+\.\d+)\.?[ \t]+(\S[^\n]*)$", re.MULTILINE)
_DOMAIN_HEADING = re.compile(r"^#{1,6}[ \t]*(?:Domain[ \t]+)?(\d+)(?!\.?\d)[.:]?[ \t]*[—–-]?[ \t]*(\S[^\n]*?)[ \t#]*$", re.MULTILINE)


class PackError(ValueError):
    """A prompt pack that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    domain: str | None


@dataclass(frozen=True)
class Constitution:
    """Section ids parsed from `### 2.3 Title` headings (under `## Domain 2 — ...`), or, when a file
    has no such headings, from plain `2.3 text` lines."""

    text: str
    sections: tuple[Section, ...]
    domains: dict[str, str] = field(default_factory=dict)

    @property
    def ids(self) -> frozenset[str]:
        return frozenset(s.id for s in self.sections)

    def ordered_ids(self) -> list[str]:
        return sorted(self.ids, key=section_order)


def section_order(section: str) -> tuple[int, ...]:
    return tuple(int(p) for p in section.split("."))


def parse_constitution(text: str, *, source: str = "<constitution>") -> Constitution:
    domains = {m.group(1): m.group(2).strip() for m in _DOMAIN_HEADING.finditer(text)}
    found = _SECTION_HEADING.findall(text) or _SECTION_LINE.findall(text)
    sections, seen = [], set()
    for sid, title in found:
        if sid in seen:
            continue  # a repeated id keeps its first meaning
        seen.add(sid)
        sections.append(Section(id=sid, title=title.strip(), domain=domains.get(sid.split(".")[0])))
    if not sections:
        raise PackError(f"{source}: no constitution sections found (expected headings like '### 2.3 Title' or lines like '2.3 text')")
    return Constitution(text=text, sections=tuple(sections), domains=domains)


@dataclass(frozen=True)
class Canary:
    """One canary fact in the published schema: the value, and the instruction per voice."""

    id: str
    value: str
    instruction: str
    instruction_3p: str | None = None
    pretraining_action: str = "inject"
    sft_action: str | None = None


@dataclass(frozen=True)
class PromptPack:
    name: str
    source: str
    system_template: str
    user_template: str
    canary_template: str | None
    constitution: Constitution | None
    files: dict[str, str]
    fields: tuple[str, ...]
    voices: dict[str, str]
    checks: dict[str, bool]
    version: str
    charter_terms: tuple[str, ...] = ("constitution", "charter")
    format: str = "json"
    styles: dict[str, str] = field(default_factory=dict)
    shared_spec: dict = field(default_factory=dict)             # the manifest's `shared:` form, read by `layouts.in_layout`
    default_layout: str = "published"                           # the pack's choice under generation.prompt_layout: auto
    layout: str = "published"                                   # the layout this object builds prompts in
    shared: dict[str, str] = field(default_factory=dict)        # system, document, task templates, once read (shared layout)
    shared_files: dict[str, str] = field(default_factory=dict)  # placeholders of the shared templates besides the pack's
    published_version: str = ""                                 # the version in the published layout

    @property
    def voice_fields(self) -> tuple[str, ...]:
        return tuple(self.voices)

    @property
    def sections(self) -> frozenset[str]:
        return self.constitution.ids if self.constitution else frozenset()

    def check_enabled(self, name: str) -> bool:
        return self.checks.get(name, True)

    def _values(self) -> dict[str, str]:
        values = dict(self.files)
        if self.constitution is not None:
            values["charter"] = self.constitution.text
        return values

    def system_prompt(self, style: str | None = None, *, keys: list[str] = ()) -> str:
        """Identical for every request of this pack (and style), so vLLM's prefix cache computes it once;
        in the shared layout, identical for every pack that names the same shared system text."""
        values = self._values()
        if self.layout == "shared":
            return fill(self.shared["system"], {**values, **self.shared_files})
        if self.styles:
            values["style"] = self.styles[style or sorted(self.styles)[0]]
        if self.format == "tags":
            values["keys"] = ", ".join(keys)
        return fill(self.system_template, values)

    def user_message(self, text: str, canary: Canary | None = None, *, language: str = "") -> str:
        text = guard_closer(text, text_closer(self.user_template))
        return fill(self.user_template, {**self._values(), "text": text, "canary": self._canary_block(canary), "language": language})

    def _canary_block(self, canary: Canary | None) -> str:
        if canary is not None and self.canary_template is None:
            raise PackError(f"{self.source}: a canary was assigned but the pack has no canary template")
        return fill(self.canary_template, canary_values(canary)) if canary is not None else ""

    def messages(self, text: str, canary: Canary | None = None, *, style: str | None = None, keys: list[str] = (),
                 language: str = "") -> list[dict]:
        if self.layout == "shared":
            return self._shared_messages(text, canary, keys=keys, language=language)
        return [{"role": "system", "content": self.system_prompt(style, keys=keys)},
                {"role": "user", "content": self.user_message(text, canary, language=language)}]

    def _shared_messages(self, text: str, canary: Canary | None, *, keys: list[str], language: str) -> list[dict]:
        """System block, document turn, task turn: all but the task is the same for packs sharing the block."""
        document = fill(self.shared["document"], {"text": guard_closer(text, text_closer(self.shared["document"]))})
        values = {**self._values(), **self.shared_files, "canary": self._canary_block(canary), "language": language, "keys": ", ".join(keys)}
        return [{"role": "system", "content": self.system_prompt()}, {"role": "user", "content": document},
                {"role": "user", "content": fill(self.shared["task"], values)}]


# Between a delimiter's first and second character, where it appears inside a document: the text
# reads the same, but no longer tokenizes as the delimiter the prompt closes the document with.
WORD_JOINER = "\u2060"


def text_closer(template: str) -> str | None:
    """The delimiter that closes `{text}` in a user template (`>>>` after `<<<\n{text}\n`): the
    first non-blank text after the placeholder, up to the next placeholder or the line's end,
    when it is short enough to be a delimiter (2 to 40 characters)."""
    at = template.find("{text}")
    if at < 0:
        return None
    line = template[at + len("{text}"):].lstrip().split("\n", 1)[0]
    nxt = _PLACEHOLDER_OR_ESCAPE.search(line)
    line = (line[:nxt.start()] if nxt else line).strip()
    return line if 2 <= len(line) <= 40 else None


def guard_closer(text: str, closer: str | None) -> str:
    """`text` with every occurrence of the closing delimiter broken by a word joiner, so a page
    cannot end the document's block and write what follows as the prompt's own words."""
    if not closer or closer not in text:
        return text
    return text.replace(closer, closer[0] + WORD_JOINER + closer[1:])


def canary_values(canary: Canary) -> dict[str, str]:
    return {"instruction": canary.instruction, "instruction_3p": canary.instruction_3p or canary.instruction,
            "value": canary.value, "id": canary.id}


def fill(template: str, values: dict[str, str]) -> str:
    """Replace `{name}` placeholders in one pass (a value containing braces is never re-filled);
    `{{name}}` is written as the literal text `{name}`."""
    def sub(m: re.Match) -> str:
        return "{" + m.group(1) + "}" if m.group(1) else values[m.group(2)]

    return _PLACEHOLDER_OR_ESCAPE.sub(sub, template)


def placeholders(template: str) -> list[str]:
    return list(dict.fromkeys(m.group(2) for m in _PLACEHOLDER_OR_ESCAPE.finditer(template) if m.group(2)))


def builtin_packs() -> list[str]:
    root = resources.files("annotator.method").joinpath("packs")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.joinpath(PACK_FILE).is_file())


def resolve_pack_path(spec: str) -> Path:
    """A pack folder, a pack YAML file, or the name of a built-in pack (`reflection-v2`)."""
    name = spec.removeprefix(BUILTIN_PREFIX)
    path = Path(spec).expanduser()
    if not spec.startswith(BUILTIN_PREFIX) and path.exists():
        return path.resolve()
    if name in builtin_packs():
        return Path(str(resources.files("annotator.method").joinpath("packs", name))).resolve()
    raise PackError(f"prompt pack {spec!r}: no such file or folder, and not a built-in pack ({', '.join(builtin_packs())})")


@lru_cache(maxsize=32)
def load_pack(spec: str) -> PromptPack:
    path = resolve_pack_path(spec)
    manifest = path / PACK_FILE if path.is_dir() else path
    if not manifest.is_file():
        raise PackError(f"{path}: a pack folder needs a {PACK_FILE}")
    try:
        data = yaml.safe_load(manifest.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise PackError(f"{manifest}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise PackError(f"{manifest}: top level must be a mapping")
    return _build_pack(data, manifest=manifest)


_PACK_KEYS = {"name", "description", "constitution", "system", "user", "canary", "files", "fields", "voices", "checks",
              "charter_terms", "format", "styles", "prompt_layout", "shared"}


def read_entry(manifest: Path, role: str, *, entry) -> tuple[str, str]:
    """(where, text) of a pack entry: a file relative to the manifest, or `{text: ...}` inline."""
    if isinstance(entry, dict) and set(entry) == {"text"}:
        return f"{manifest}#{role}", str(entry["text"])
    if isinstance(entry, str):
        p = (manifest.parent / entry).expanduser()
        if not p.is_file():
            raise PackError(f"{manifest}: {role} file {str(p)!r} does not exist")
        return str(p), p.read_text(encoding="utf-8")
    raise PackError(f"{manifest}: '{role}' must be a file path or {{text: ...}}")


def _build_pack(data: dict, *, manifest: Path) -> PromptPack:
    unknown = sorted(set(data) - _PACK_KEYS)
    if unknown:
        raise PackError(f"{manifest}: unknown keys {unknown} (known: {sorted(_PACK_KEYS)})")
    contents: dict[str, tuple[str, str]] = {}  # role -> (where, text), hashed into the version

    def read(role: str, entry, *, required: bool) -> str | None:
        if entry is None:
            if required:
                raise PackError(f"{manifest}: '{role}' is required")
            return None
        contents[role] = read_entry(manifest, role, entry=entry)
        return contents[role][1]

    name = data.get("name") or (manifest.parent.name if manifest.name == PACK_FILE else manifest.stem)
    system = read("system", data.get("system"), required=True)
    user = read("user", data.get("user"), required=True)
    canary = read("canary", data.get("canary"), required=False)
    constitution_text = read("constitution", data.get("constitution"), required=False)
    files_spec = data.get("files") or {}
    if not isinstance(files_spec, dict):
        raise PackError(f"{manifest}: 'files' must map placeholder names to files")
    files = {}
    for key, entry in files_spec.items():
        if not PLACEHOLDER.fullmatch("{" + str(key) + "}") or key in ("charter", *REQUEST_PLACEHOLDERS):
            raise PackError(f"{manifest}: files: {key!r} cannot be a placeholder name")
        files[key] = read(f"files.{key}", entry, required=True)
    constitution = parse_constitution(constitution_text, source=contents["constitution"][0]) if constitution_text is not None else None

    fields, voices, fmt, checks = _reply_shape(data, manifest=manifest)
    styles_spec = data.get("styles") or {}
    if not isinstance(styles_spec, dict):
        raise PackError(f"{manifest}: 'styles' must map style names to files")
    styles = {str(k): read(f"styles.{k}", v, required=True) for k, v in sorted(styles_spec.items())}
    known_static = {"charter", *files} if constitution is not None else set(files)
    _check_templates(system, user, canary=canary, where={role: w for role, (w, _) in contents.items()}, known_static=known_static,
                     styles=styles, fmt=fmt)
    spec, default_layout = _shared_spec(data, manifest=manifest, styles=styles)
    terms = tuple(data.get("charter_terms") or ("constitution", "charter"))
    version = _version(str(name), contents, shape=(fields, sorted(voices.items()), sorted(checks.items()), fmt))
    return PromptPack(name=str(name), source=str(manifest), system_template=system, user_template=user, canary_template=canary,
                      constitution=constitution, files=files, fields=fields, voices=voices, checks=checks, version=version,
                      charter_terms=terms, format=fmt, styles=styles, shared_spec=spec, default_layout=default_layout,
                      published_version=version)


def _version(name: str, contents: dict[str, tuple[str, str]], *, shape: tuple) -> str:
    """name@ a hash of the published layout's files and the reply shape (a shared form is not in
    it: adding one leaves the version as it was)."""
    digest = hashlib.sha256(name.encode())
    for role in sorted(contents):
        digest.update(f"\x00{role}\x00".encode() + contents[role][1].encode("utf-8"))
    digest.update(repr(shape).encode())
    return f"{name}@{digest.hexdigest()[:12]}"


def _shared_spec(data: dict, *, manifest: Path, styles: dict) -> tuple[dict, str]:
    """A manifest's `shared:` form, its shape only (its files are read when a run asks for the shared
    layout, `layouts.in_layout`, so the published layout never depends on them), and its
    `prompt_layout` (the layout it asks for under generation.prompt_layout: auto)."""
    spec, layout = data.get("shared"), data.get("prompt_layout", "published")
    if layout not in PROMPT_LAYOUTS or spec is None and layout == "shared":
        raise PackError(f"{manifest}: prompt_layout must be one of {list(PROMPT_LAYOUTS)} (shared needs a 'shared:' form), got {layout!r}")
    if spec is not None and (not isinstance(spec, dict) or set(spec) - {*SHARED_PARTS, "files"}
                             or not isinstance(spec.get("files") or {}, dict) or styles):
        raise PackError(f"{manifest}: shared must map {', '.join(SHARED_PARTS)} (and files: placeholder names) to files or "
                        "{text: ...}; a pack with styles has none")
    return dict(spec or {}), layout


def _reply_shape(data: dict, *, manifest: Path) -> tuple[tuple[str, ...], dict, str, dict]:
    """A manifest's reply fields, voices, format and checks, each validated."""
    fields = tuple(data.get("fields") or ())
    voices = dict(data.get("voices") or {})
    if not fields or len(set(fields)) != len(fields) or not all(isinstance(f, str) and f.isidentifier() for f in fields):
        raise PackError(f"{manifest}: 'fields' must be a list of distinct identifiers, got {data.get('fields')!r}")
    for f, v in voices.items():
        if f not in fields or v not in VOICES:
            raise PackError(f"{manifest}: voices: {f!r}: {v!r} must map a reply field to one of {list(VOICES)}")
    fmt = data.get("format", "json")
    if fmt not in FORMATS:
        raise PackError(f"{manifest}: format must be one of {list(FORMATS)}, got {fmt!r}")
    if fmt == "text" and len(fields) != 1:
        raise PackError(f"{manifest}: a text-format pack has exactly one field (the whole reply), got {list(fields)}")
    checks = dict(data.get("checks") or {})
    bad = sorted(set(checks) - set(CHECKS))
    if bad or not all(isinstance(v, bool) for v in checks.values()):
        raise PackError(f"{manifest}: checks: unknown {bad} or non-boolean values (known: {list(CHECKS)})")
    return fields, voices, fmt, checks


def _check_templates(system: str, user: str, *, canary: str | None, where: dict[str, str], known_static: set[str],
                     styles: dict, fmt: str) -> None:
    """Every placeholder a template uses is known, and every file the pack names is used."""
    system_names = known_static | ({"style"} if styles else set()) | ({"keys"} if fmt == "tags" else set())
    check_placeholders(system, where["system"], allowed=system_names, forbidden=REQUEST_PLACEHOLDERS)
    if styles and "style" not in placeholders(system):
        raise PackError(f"{where['system']}: missing placeholder {{style}}: the pack names styles {sorted(styles)}")
    check_placeholders(user, where["user"], allowed=known_static | set(REQUEST_PLACEHOLDERS), forbidden=())
    if canary is not None:
        check_placeholders(canary, where["canary"], allowed=set(CANARY_PLACEHOLDERS), forbidden=())
    used = set(placeholders(system)) | set(placeholders(user))
    if "text" not in placeholders(user):
        raise PackError(f"{where['user']}: the user template must contain {{text}} (the document up to the pause point)")
    for needed in sorted(known_static - used):
        what = "the constitution" if needed == "charter" else f"the file {where['files.' + needed]!r}"
        raise PackError(f"{where['system']}: missing placeholder {{{needed}}}: the pack names {what} but no template uses it")
    if canary is not None and "canary" not in placeholders(user):
        raise PackError(f"{where['user']}: missing placeholder {{canary}}: the pack has a canary template ({where['canary']})")
    if canary is None and "canary" in placeholders(user):
        raise PackError(f"{where['user']}: uses {{canary}} but the pack has no 'canary' template")


def check_placeholders(template: str, where: str, *, allowed: set[str], forbidden) -> None:
    for name in placeholders(template):
        if name in forbidden:
            raise PackError(f"{where}: {{{name}}} belongs in the user template (the system prompt must be the same for every request)")
        if name not in allowed:
            raise PackError(f"{where}: unknown placeholder {{{name}}} (known here: {', '.join(sorted(allowed)) or 'none'})")


def load_canaries(path: str | Path, *, action_field: str = "pretraining_action") -> list[Canary]:
    """Canaries from a YAML file in the published schema (`canaries:` list of id, value,
    instruction, instruction_3p, pretraining_action, sft_action); only those whose `action_field`
    is `inject` (or absent, in files that predate it) are returned."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PackError(f"canary file {str(p)!r} does not exist")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    items = data.get("canaries") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise PackError(f"{p}: expected a non-empty 'canaries:' list")
    out = []
    for n, item in enumerate(items):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item[k].strip() for k in ("id", "value", "instruction")):
            raise PackError(f"{p}: canary #{n + 1} needs non-empty string 'id', 'value' and 'instruction'")
        action = item.get(action_field, "inject")
        if action not in ("inject", "skip"):
            raise PackError(f"{p}: canary {item['id']}: {action_field} must be inject or skip, got {action!r}")
        if action == "inject":
            out.append(Canary(id=item["id"], value=item["value"], instruction=item["instruction"],
                              instruction_3p=item.get("instruction_3p"), pretraining_action=item.get("pretraining_action", "inject"),
                              sft_action=item.get("sft_action")))
    ids = [c.id for c in out]
    if len(set(ids)) != len(ids):
        raise PackError(f"{p}: canary ids must be distinct, got {ids}")
    return out


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()[:12]
