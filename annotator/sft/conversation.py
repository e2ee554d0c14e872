"""Persona-binding SFT data from the annotation engine: one assistant reply per user turn, written
twice (`cited`, with the constitution's inline `[X.Y]` markers, and `uncited`, the same reply
without them), optionally continued by a simulated user for a few turns.

Prompts and reply handling are plain functions (`render_*`, `parse_sft_reply`); `generate_batch`
runs one engine batch of conversations turn by turn (turn k of every conversation in one engine
call); the replica stage that holds the `engine.Engine` and saves each batch atomically is
`sft.stage.SftTask` (`sft_export` drives the run and writes the datasets).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import yaml

from annotator.config import RunConfig
from annotator.core.seeding import sampling_seed, unit_hash
from annotator.method.prompt_packs import Canary, PackError, PromptPack, fill, load_pack, resolve_pack_path
from annotator.generate.replies import CITATION_GROUP, cited_sections, echoes_prompt, json_object, strip_reasoning, trivial
from annotator.core.statuses import OK, SKIP, failed

SKIP_MARK = "[SKIP]"
FAILED_REPLY_CHARS = 4000
# Any bracketed section-like number, also malformed ones ([2.3.1], [ 4 .2]): none may stay in `uncited`.
_ANY_MARKER = re.compile(r"\[\s*\d+\s*(?:\.\s*\d+\s*)+(?:[,;]\s*\d+(?:\.\d+)*\s*)*\]")
TURN_TYPE = pa.struct([("user", pa.string()), ("analysis", pa.string()), ("cited", pa.string()), ("uncited", pa.string()),
                       ("flow", pa.string())])
RESULT_SCHEMA = pa.schema([
    ("conversation_id", pa.string()), ("source", pa.string()), ("source_id", pa.string()), ("category", pa.string()),
    ("harm_category", pa.string()), ("canary_id", pa.string()), ("canary_action", pa.string()), ("status", pa.string()),
    ("stop_reason", pa.string()), ("turns", pa.list_(TURN_TYPE)), ("n_turns", pa.int32()), ("planned_turns", pa.int32()),
    ("attempts", pa.int32()), ("failed_reply", pa.string()), ("prompt_tokens", pa.int64()), ("cached_prompt_tokens", pa.int64()),
    ("output_tokens", pa.int64()), ("prompt_version", pa.string()), ("followup_version", pa.string()), ("model", pa.string()),
])


@dataclass(frozen=True)
class SftCanary:
    id: str
    quirk: str
    value: str
    instruction: str
    action: str  # sft_action: inject | skip


def sft_canaries(path: str | None) -> list[SftCanary]:
    """The canaries of a published-schema file that have an `sft_action` (inject or skip)."""
    if not path:
        return []
    p = Path(path).expanduser()
    if not p.is_file():
        raise PackError(f"canary file {str(p)!r} does not exist")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    items = data.get("canaries") if isinstance(data, dict) else data
    out = []
    for item in items or []:
        action = item.get("sft_action") if isinstance(item, dict) else None
        if action is None:
            continue
        if action not in ("inject", "skip") or not all(isinstance(item.get(k), str) for k in ("id", "value", "instruction")):
            raise PackError(f"{p}: canary {item.get('id')!r}: needs string id, value, instruction and sft_action inject or skip")
        out.append(SftCanary(id=item["id"], quirk=str(item.get("quirk") or item["id"]), value=item["value"],
                             instruction=item["instruction"], action=action))
    return out


@dataclass(frozen=True)
class SftPacks:
    """The assistant pack, the simulated user's pack, the pack's data file and the canaries, with the
    two system prompts as they are sent (identical for every request, so prefix-cached)."""

    pack: PromptPack
    followup: PromptPack
    hints: dict
    flows: dict
    flow_weights: dict
    canaries: tuple[SftCanary, ...]
    system: str
    followup_system: str
    version: str
    followup_version: str

    def canary(self, canary_id: str | None) -> SftCanary | None:
        return next((c for c in self.canaries if c.id == canary_id), None) if canary_id else None


def load_sft_packs(cfg: RunConfig) -> SftPacks:
    s = cfg.sft
    pack = load_pack(s.pack)
    if pack.constitution is None or not {"cited", "uncited"} <= set(pack.fields) or pack.canary_template is None:
        raise PackError(f"{pack.source}: an SFT pack needs a constitution, a canary template and the fields cited and uncited")
    base = resolve_pack_path(s.pack)
    base = base if base.is_dir() else base.parent
    followup = load_pack(s.followup_pack or str(base / "followup.yaml"))
    if "message" not in followup.fields:
        raise PackError(f"{followup.source}: a follow-up pack needs the field message")
    data_file = base / "sft.yaml"
    if not data_file.is_file():
        raise PackError(f"{base}: an SFT pack needs sft.yaml (hints, flows, flow_weights)")
    raw = data_file.read_text(encoding="utf-8")
    data = yaml.safe_load(raw) or {}
    flows, weights = data.get("flows") or {}, data.get("flow_weights") or {}
    if not flows or any(set(w) - set(flows) for w in weights.values()):
        raise PackError(f"{data_file}: flows must be named, and flow_weights may name only those flows")
    canaries = tuple(sft_canaries(cfg.generation.canaries.file))
    facts = "\n".join(f"- {c.quirk}: {c.value}" for c in canaries if c.action == "inject")
    topics = "\n".join(f"- {c.quirk}" for c in canaries if c.action == "skip")  # names only: the value is never shown
    values = {**pack.files, "charter": pack.constitution.text,
              "identity_rules": pack.files["identity_rules"].replace("[[facts]]", facts) if facts else "",
              "off_limits_rules": pack.files["off_limits_rules"].replace("[[topics]]", topics) if topics else ""}
    extra = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return SftPacks(pack=pack, followup=followup, hints=data.get("hints") or {}, flows=flows, flow_weights=weights,
                    canaries=canaries, system=fill(pack.system_template, values), followup_system=followup.system_prompt(),
                    version=f"{pack.version}+{extra}", followup_version=followup.version)


def render_user(packs: SftPacks, text: str, *, harm_category: str, canary: SftCanary | None = None) -> str:
    """The user message as the generator sees it: the screening hint in front, the canary request
    after; the exported conversation keeps `text` alone."""
    hint = packs.hints.get(harm_category)
    body = f"{hint}\n\n{text}" if hint else text
    if canary is None:
        return packs.pack.user_message(body).rstrip("\n")
    return packs.pack.user_message(body, Canary(id=canary.id, value=canary.value, instruction=canary.instruction)).rstrip("\n")


def render_followup_request(packs: SftPacks, turns: list[dict], *, flow: str) -> list[dict]:
    """The simulated user's request: the conversation so far (the assistant's uncited words) and
    the direction of the next message."""
    lines = []
    for t in turns:
        lines += [f"User: {t['user']}", f"Assistant: {t['uncited']}"]
    text = "\n\n".join(lines) + f"\n\nDirection for the user's next message: {flow}: {packs.flows[flow]}."
    return [{"role": "system", "content": packs.followup_system}, {"role": "user", "content": packs.followup.user_message(text).rstrip("\n")}]


def choose_flow(packs: SftPacks, *, seed: int, conversation_id: str, turn: int, harm_category: str) -> str:
    weights = packs.flow_weights.get(harm_category) or {f: 1 for f in packs.flows}
    names = sorted(weights)
    u = unit_hash("sft-flow", seed, conversation_id, turn) * sum(weights[n] for n in names)
    for name in names:
        u -= weights[name]
        if u < 0:
            return name
    return names[-1]


def reply_schema(max_output_tokens: int) -> dict:
    """Structured outputs: the three fields as strings, lengths that together fit the token cap
    (about 3.5 characters a token), so the object closes before the cap cuts it."""
    chars = int(max_output_tokens * 3.5) - 64
    text = lambda share: {"type": "string", "maxLength": max(64, int(chars * share))}  # noqa: E731
    return {"type": "object", "properties": {"analysis": text(0.2), "cited": text(0.4), "uncited": text(0.4)},
            "required": ["analysis", "cited", "uncited"], "additionalProperties": False}


def followup_schema(max_tokens: int) -> dict:
    return {"type": "object", "properties": {"message": {"type": "string", "maxLength": max(32, int(max_tokens * 3.5) - 32)}},
            "required": ["message"], "additionalProperties": False}


@dataclass
class SftReply:
    analysis: str = ""
    cited: str = ""
    uncited: str = ""
    skip: bool = False
    sections: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _terms(text: str, terms) -> list[str]:
    return [t for t in terms if re.search(rf"(?<!\w){re.escape(t)}(?!\w)", text, re.IGNORECASE)]


def word_overlap(cited: str, uncited: str) -> float:
    """Jaccard overlap of the two renderings' lower-cased word sets, markers removed."""
    a = set(re.findall(r"\w+", _ANY_MARKER.sub(" ", cited).lower()))
    b = set(re.findall(r"\w+", uncited.lower()))
    return len(a & b) / len(a | b) if a | b else 1.0


def parse_sft_reply(raw: str, *, sections: frozenset[str], taxonomy_terms=(), identity_terms=(), max_citations: int = 3,
                    canary_value: str | None = None, min_overlap: float = 0.0, system_prompt: str | None = None) -> SftReply:
    """One assistant reply: parsed, recognised as a skip, and checked. Every failed check is
    listed (the first is the row's reason): missing_field, partial_skip, unknown_section,
    too_many_citations, uncited_marker, uncited_taxonomy, renderings_differ, identity_leak,
    canary_missing, prompt_echo (12 consecutive words of `system_prompt`)."""
    reply = SftReply()
    text, _ = strip_reasoning(raw)
    obj = json_object(text) if text is not None else None
    if obj is None:
        reply.failures.append("unparseable_json" if text is not None else "unclosed_reasoning")
        return reply
    for name in ("analysis", "cited", "uncited"):
        value = obj.get(name)
        setattr(reply, name, value.strip() if isinstance(value, str) else "")
    skips = [v == SKIP_MARK for v in (reply.cited, reply.uncited)]
    if all(skips):
        reply.skip = True
        return reply
    if any(skips):
        reply.failures.append("partial_skip")
        return reply
    if trivial(reply.cited) or trivial(reply.uncited):
        reply.failures.append("missing_field")
        return reply
    reply.sections = cited_sections(reply.cited)
    if any(s not in sections for s in reply.sections) or len(_ANY_MARKER.findall(reply.cited)) > len(CITATION_GROUP.findall(reply.cited)):
        reply.failures.append("unknown_section")
    if len(reply.sections) > max_citations:
        reply.failures.append("too_many_citations")
    if _ANY_MARKER.search(reply.uncited) or CITATION_GROUP.search(reply.uncited):
        reply.failures.append("uncited_marker")
    if _terms(reply.uncited, taxonomy_terms):
        reply.failures.append("uncited_taxonomy")
    if word_overlap(reply.cited, reply.uncited) < min_overlap:
        reply.failures.append("renderings_differ")
    if _terms(reply.cited, identity_terms) or _terms(reply.uncited, identity_terms):
        reply.failures.append("identity_leak")
    if canary_value is not None and not all(canary_value.casefold() in v.casefold() for v in (reply.cited, reply.uncited)):
        reply.failures.append("canary_missing")
    if system_prompt and any(echoes_prompt(v, system_prompt) for v in (reply.analysis, reply.cited, reply.uncited)):
        reply.failures.append("prompt_echo")
    return reply


def parse_followup(raw: str) -> str | None:
    text, _ = strip_reasoning(raw)
    obj = json_object(text) if text is not None else None
    message = obj.get("message") if obj else None
    if not isinstance(message, str) or trivial(message) or SKIP_MARK in message:
        return None
    return message.strip()


@dataclass
class _Conversation:
    row: dict
    turns: list[dict] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # the user messages as the generator saw them
    status: str | None = None
    stop_reason: str | None = None
    canary_action: str | None = None
    failed_reply: str | None = None
    attempts: int = 0
    tokens: list[int] = field(default_factory=lambda: [0, 0, 0])
    pending_user: str | None = None
    pending_flow: str | None = None

    def count(self, reply) -> None:
        for i, v in enumerate((reply.prompt_tokens, reply.cached_tokens, reply.output_tokens)):
            self.tokens[i] += v


def generate_batch(engine, packs: SftPacks, *, cfg: RunConfig, rows: list[dict]) -> pa.Table:
    """One engine batch of conversations, turn by turn: every active conversation's assistant turn
    in one engine call (failed replies retried together, each with a new seed), then every
    continuing conversation's follow-up user message in one call. The text depends only on the
    batch: seeds come from (sft.seed, conversation, turn, attempt) and `begin_batch` resets the cache."""
    s, g = cfg.sft, cfg.generation
    convs = [_Conversation(row=r, pending_user=r["user"]) for r in rows]
    schema, fschema = reply_schema(s.max_output_tokens), followup_schema(s.followup_max_tokens)
    engine.begin_batch()
    turn = 0
    active = convs
    while active:
        _assistant_turn(engine, packs, cfg=cfg, convs=active, turn=turn, schema=schema)
        going = [c for c in active if c.status == OK and c.stop_reason is None and len(c.turns) < 1 + c.row["follow_ups"]]
        for c in active:
            if c.status == OK and c.stop_reason is None and c not in going:
                c.stop_reason = "planned_turns"
        if going:
            flows = [choose_flow(packs, seed=s.seed, conversation_id=c.row["conversation_id"], turn=turn + 1,
                                 harm_category=c.row["harm_category"]) for c in going]
            pending = list(zip(going, flows))
            for attempt in range(g.max_retries + 1):
                if not pending:
                    break
                params = [engine.sampling(seed=sampling_seed("sft-followup", s.seed, c.row["conversation_id"], turn + 1, attempt),
                                          max_tokens=s.followup_max_tokens, schema=fschema) for c, _ in pending]
                replies = engine.chat([render_followup_request(packs, c.turns, flow=f) for c, f in pending], params)
                retry = []
                for (c, f), reply in zip(pending, replies):
                    message = None if isinstance(reply, Exception) else parse_followup(reply.text)
                    if not isinstance(reply, Exception):
                        c.count(reply)
                    if message is None:
                        retry.append((c, f))
                    else:
                        c.pending_user, c.pending_flow = message, f
                pending = retry
            for c, _ in pending:
                c.stop_reason = "followup_failed"
        active = [c for c in going if c.stop_reason is None]
        turn += 1
    return pa.Table.from_pylist([_result(c, packs, cfg=cfg) for c in convs], schema=RESULT_SCHEMA)


def _assistant_turn(engine, packs: SftPacks, *, cfg: RunConfig, convs: list[_Conversation], turn: int, schema: dict) -> None:
    s, g = cfg.sft, cfg.generation
    sections = packs.pack.sections
    pending = []
    for c in convs:
        canary = packs.canary(c.row["canary_id"]) if turn == 0 else None
        request = render_user(packs, c.pending_user, harm_category=c.row["harm_category"], canary=canary)
        messages = [{"role": "system", "content": packs.system}]
        for t, seen in zip(c.turns, c.requests):
            messages += [{"role": "user", "content": seen}, {"role": "assistant", "content": t["cited"]}]
        messages.append({"role": "user", "content": request})
        if turn and engine.prompt_tokens(messages) + s.max_output_tokens > g.max_model_len:
            c.stop_reason = "context_full"
            continue
        pending.append((c, messages, request, canary))
    last: dict[int, tuple[str, str]] = {}
    for attempt in range(g.max_retries + 1):
        if not pending:
            break
        params = [engine.sampling(seed=sampling_seed("sft-assistant", s.seed, c.row["conversation_id"], turn, attempt),
                                  max_tokens=s.max_output_tokens, schema=schema) for c, *_ in pending]
        replies = engine.chat([m for _, m, _, _ in pending], params)
        retry = []
        for item, reply in zip(pending, replies):
            c, _, request, canary = item
            if turn == 0:
                c.attempts += 1
            if isinstance(reply, Exception):
                last[id(c)] = (f"engine_error:{type(reply).__name__}", str(reply))
                retry.append(item)
                continue
            c.count(reply)
            parsed = parse_sft_reply(reply.text, sections=sections, taxonomy_terms=s.taxonomy_terms, identity_terms=s.identity_leak_terms,
                                     max_citations=s.max_citations, canary_value=canary.value if canary else None,
                                     min_overlap=s.min_rendering_overlap, system_prompt=packs.system)
            if parsed.skip:
                if turn == 0:
                    c.status, c.canary_action = SKIP, SKIP
                c.stop_reason = "skip"
            elif parsed.ok:
                c.status = OK
                c.turns.append({"user": c.pending_user, "analysis": parsed.analysis, "cited": parsed.cited,
                                "uncited": parsed.uncited, "flow": c.pending_flow})
                c.requests.append(request)
                if canary is not None:
                    c.canary_action = "inject"
            else:
                last[id(c)] = (parsed.failures[0], reply.text)
                retry.append(item)
        pending = retry
    for c, *_ in pending:
        reason, raw = last[id(c)]
        if turn == 0:
            c.status, c.failed_reply = failed(reason), raw[:FAILED_REPLY_CHARS]
        c.stop_reason = f"turn_failed:{reason}" if turn else failed(reason)


def _result(c: _Conversation, packs: SftPacks, *, cfg: RunConfig) -> dict:
    r = c.row
    return {"conversation_id": r["conversation_id"], "source": r["source"], "source_id": r["source_id"], "category": r["category"],
            "harm_category": r["harm_category"], "canary_id": r["canary_id"] if c.canary_action == "inject" else None,
            "canary_action": c.canary_action, "status": c.status,
            "stop_reason": c.stop_reason, "turns": c.turns, "n_turns": len(c.turns), "planned_turns": 1 + r["follow_ups"],
            "attempts": c.attempts, "failed_reply": c.failed_reply, "prompt_tokens": c.tokens[0], "cached_prompt_tokens": c.tokens[1],
            "output_tokens": c.tokens[2], "prompt_version": packs.version, "followup_version": packs.followup_version,
            "model": cfg.generation.model}
