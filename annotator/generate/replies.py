"""Reply handling, apart from the engine: reasoning text stripped, the JSON object parsed, inline
`[X.Y]` citations extracted (the only source of truth for what a reflection cites), each voice cut
to its token budget, and the pack's reply checks run. Pure functions over strings, unit-tested on
crafted replies.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache

from annotator.method.prompt_packs import PromptPack

# A bracket group of section ids: [2.3], [1.2,1.4], [1.2, 1.4]; [1.2][1.4] is two groups.
CITATION_GROUP = re.compile(r"\[\s*(\d+\.\d+(?:\s*,\s*\d+\.\d+)*)\s*\]")
SECTION_ID = re.compile(r"\d+\.\d+")
# What is left of a marker the token cut split in two ("... [2." at the very end), after its "[".
_PARTIAL_TAIL = re.compile(r"[\d.,\s]*")
# Replies are cut to this many characters before any pattern reads them: far above any budget
# (1,024 tokens), and every pattern below is linear, so a hostile or runaway reply costs little.
MAX_REPLY_CHARS = 32_768
_FIRST_PERSON_CASED = re.compile(r"\bI\b(?![-–])|\bI['’](?:m|ve|d|ll)\b|\b(?:[Mm]e|[Mm]y|[Mm]ine|[Mm]yself)\b")
_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”|«[^»]*»")
_CUTOFF = re.compile(
    r"\b(?:cut|cuts|breaks|broke|trails|trailed)\s+off\b"
    r"|\b(?:text|passage|excerpt|document|article|post|page|story|it)\s+(?:is|was|seems|appears)\s+(?:cut|truncated|incomplete|unfinished)\b"
    r"|\b(?:truncated|unfinished)\s+(?:text|passage|excerpt|document|sentence)\b"
    r"|\b(?:ends|stops|ended|stopped)\s+(?:abruptly|mid[- ]\w+|short)\b"
    r"|\bmid-sentence\b",
    re.IGNORECASE,
)
# A reply holding this many consecutive words of its system prompt is echoing the prompt (a page
# asked it to, or the model parroted its instructions), not writing a reflection.
ECHO_WORDS = 12
_WORD = re.compile(r"\w+")


@dataclass
class ParsedReply:
    """The fields of one reply after the cut, the sections its voices cite, and what failed."""

    fields: dict[str, str] = field(default_factory=dict)
    citations: dict[str, list[str]] = field(default_factory=dict)  # voice field -> ids, in order
    citations_dropped: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def cited(self) -> list[str]:
        return list(dict.fromkeys(c for ids in self.citations.values() for c in ids))


def strip_reasoning(raw: str) -> tuple[str | None, bool]:
    """The reply without reasoning text: everything up to the last `</think>` goes, closed
    `<think>` blocks go; an unclosed `<think>` means the answer never came (None)."""
    raw = raw[:MAX_REPLY_CHARS]
    low = raw.lower()
    had = "<think>" in low or "</think>" in low
    if "</think>" in low:   # after the last closing tag no closed block is left
        raw = raw[low.rindex("</think>") + len("</think>"):]
    if "<think>" in raw.lower():
        return None, had
    return raw.strip(), had


def json_object(text: str) -> dict | None:
    """The reply's JSON object: the whole text, else inside a code fence, else the first balanced
    `{...}` (a model that talks around its JSON still counts)."""
    candidates = [text]
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fence:
        candidates.append(fence.group(1))
    start = text.find("{")
    if start >= 0:
        candidates.append(_balanced(text, start))
    for c in candidates:
        if not c:
            continue
        try:
            obj = json.loads(c)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _balanced(text: str, start: int) -> str | None:
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return None


def extract_citations(text: str, valid: frozenset[str]) -> tuple[str, list[str], int]:
    """Inline markers: returns the text with unknown ids removed (a group left empty goes with the
    space before it), the known ids in order of appearance, and how many unknown ids were dropped."""
    cited: list[str] = []
    dropped = 0

    pieces, pos = [], 0
    for m in CITATION_GROUP.finditer(text):   # linear: the space before a group is trimmed, not matched
        ids = SECTION_ID.findall(m.group(1))
        known = [i for i in ids if i in valid]
        cited.extend(known)
        if len(known) == len(ids):
            continue
        dropped += len(ids) - len(known)
        before = text[pos:m.start()]
        pieces.append(f"{before}[{','.join(known)}]" if known else before.rstrip())
        pos = m.end()
    out = "".join(pieces) + text[pos:]
    return out, list(dict.fromkeys(cited)), dropped


def cited_sections(text: str) -> list[str]:
    return list(dict.fromkeys(i for g in CITATION_GROUP.findall(text) for i in SECTION_ID.findall(g)))


def cut_to_tokens(text: str, tokenizer, *, max_tokens: int) -> str:
    """`text` cut at a token boundary of `tokenizer` to at most `max_tokens` tokens (a marker the cut
    splits is removed). `tokenizer`: a `tokenizers.Tokenizer` or a transformers tokenizer."""
    if max_tokens <= 0:
        return ""
    offsets = token_offsets(tokenizer, text)
    if len(offsets) <= max_tokens:
        return text
    cut = text[: offsets[max_tokens - 1][1]].rstrip()
    bracket = cut.rfind("[")
    if bracket >= 0 and _PARTIAL_TAIL.fullmatch(cut, bracket + 1):
        cut = cut[:bracket]
    return cut.rstrip()


def token_offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character offsets of `text`'s tokens, special-token strings counted as ordinary text."""
    if hasattr(tokenizer, "offsets"):  # tokens.TargetTokenizer
        return tokenizer.offsets(text)
    if hasattr(tokenizer, "encode_batch_fast"):  # tokenizers.Tokenizer
        return list(tokenizer.encode(text, add_special_tokens=False).offsets)
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)["offset_mapping"]


def first_person(text: str) -> list[str]:
    """First-person pronouns outside quotations (a third-person voice may quote the text)."""
    return _FIRST_PERSON_CASED.findall(_QUOTED.sub(" ", text))


def mentions_charter(text: str, *, terms: tuple[str, ...], source: str) -> list[str]:
    """Terms that name the value framework, unless the document itself uses them (a text about a
    country's constitution may be discussed as such)."""
    lowered = source.lower()
    return [t for t in terms if re.search(rf"\b{re.escape(t)}s?\b", text, re.IGNORECASE) and t.lower() not in lowered]


def mentions_cutoff(text: str) -> list[str]:
    return [m.group(0) for m in _CUTOFF.finditer(text)]


def leaked_keys(text: str, keys) -> list[str]:
    """JSON key names inside a value: a sign the model wrote the object into a string."""
    return [k for k in keys if re.search(rf'(?<![A-Za-z0-9]){re.escape(k)}(?![A-Za-z0-9])', text) and ("_" in k or f'"{k}"' in text)]


@lru_cache(maxsize=64)
def _prompt_runs(prompt: str) -> frozenset[tuple[str, ...]]:
    words = _WORD.findall(prompt.lower())
    return frozenset(tuple(words[i:i + ECHO_WORDS]) for i in range(len(words) - ECHO_WORDS + 1))


def echoes_prompt(text: str, prompt: str) -> bool:
    """Whether `text` repeats `ECHO_WORDS` consecutive words of `prompt` (case and punctuation aside)."""
    runs = _prompt_runs(prompt)
    words = _WORD.findall(text[:MAX_REPLY_CHARS].lower())
    return any(tuple(words[i:i + ECHO_WORDS]) in runs for i in range(len(words) - ECHO_WORDS + 1))


def trivial(text: str) -> bool:
    return sum(ch.isalnum() for ch in text) < 3


def parse_reply(raw: str, *, pack: PromptPack, tokenizer, voice_tokens: int, analysis_tokens: int,
                source: str = "") -> ParsedReply:
    """One reply of a reflection-type pack: fields cut to their budgets, citations from the
    voices, and every enabled check run (all of them, so stats count each check's failures)."""
    reply = ParsedReply()
    text, _ = strip_reasoning(raw)
    if text is None:
        reply.failures.append("unclosed_reasoning")
        return reply
    obj = json_object(text)
    if obj is None:
        reply.failures.append("unparseable_json")
        return reply
    valid = pack.sections
    for name in pack.fields:
        value = obj.get(name)
        value = value.strip() if isinstance(value, str) else ""
        if name in pack.voices:
            value, _, dropped = extract_citations(value, valid)
            reply.citations_dropped += dropped
            value = cut_to_tokens(value, tokenizer, max_tokens=voice_tokens)
            reply.citations[name] = cited_sections(value)
        else:
            value = cut_to_tokens(value, tokenizer, max_tokens=analysis_tokens)
        reply.fields[name] = value
    reply.failures = run_checks(reply, pack=pack, source=source)
    return reply


def run_checks(reply: ParsedReply, *, pack: PromptPack, source: str) -> list[str]:
    failures = []
    voices = [(f, reply.fields.get(f, "")) for f in pack.voice_fields]
    required = [f for f in pack.fields if f not in pack.voices] + [f for f, _ in voices]
    missing = any(trivial(reply.fields.get(f, "")) for f in required)
    if pack.check_enabled("voices_present") and missing:
        failures.append("voices_present")
    if pack.check_enabled("no_key_leak") and any(leaked_keys(v, pack.fields) for _, v in voices):
        failures.append("no_key_leak")
    if pack.check_enabled("voice_pairing") and len(voices) > 1 and not missing:
        sets = {frozenset(reply.citations.get(f, ())) for f, _ in voices}
        if len(sets) > 1:
            failures.append("voice_pairing")
    third = [v for f, v in voices if pack.voices[f] == "3p"]
    if pack.check_enabled("third_person") and any(first_person(v) for v in third):
        failures.append("third_person")
    if pack.check_enabled("no_charter_mention") and any(mentions_charter(v, terms=pack.charter_terms, source=source) for _, v in voices):
        failures.append("no_charter_mention")
    if pack.check_enabled("no_cutoff_mention") and any(mentions_cutoff(v) for _, v in voices):
        failures.append("no_cutoff_mention")
    if pack.check_enabled("no_prompt_echo") and any(echoes_prompt(v, pack.system_prompt()) for v in reply.fields.values()):
        failures.append("no_prompt_echo")
    return failures
