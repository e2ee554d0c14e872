"""Training token ids, assembled from ids: the target tokenizer extended with the template tokens,
a document's ids with its reflection spliced at its token index and its annotation block in front,
windows (one annotated document, EOS, padding) and dense packing, and the reflection masks.

Template tokens are only ever inserted as ids, and source text is encoded with special-token
matching off (`tokens.TargetTokenizer`), so a page that contains the text `<assistant>` or
`<|endoftext|>` never becomes a fake reflection or an early end of document.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from annotator.config import OutputConfig
from annotator.generate.replies import CITATION_GROUP, SECTION_ID
from annotator.core.tokens import TargetTokenizer, target_tokenizer
from annotator.method.recipes import Placement


def charter_token(section: str) -> str:
    return f"<charter_{section}>"


def special_tokens(output: OutputConfig, sections: list[str] = ()) -> tuple[str, ...]:
    """The template tokens in their fixed order after the base vocabulary: `<assistant>` (49152
    for SmolLM2), `</assistant>`, the annotation pair, then charter tokens in section order."""
    tpl = output.template
    tokens = [tpl.open, tpl.close, tpl.annotation_open, tpl.annotation_close]
    if tpl.charter_tokens:
        tokens += [charter_token(s) for s in sections]
    return tuple(dict.fromkeys(tokens))


def training_tokenizer(output: OutputConfig, sections: list[str] = ()) -> TargetTokenizer:
    return target_tokenizer(output.tokenizer, output.eos_token, added=special_tokens(output, sections))


def render_citations(reflection: str, valid: frozenset[str]) -> str:
    """[X.Y] citations of real sections become <charter_X.Y> tokens (as text)."""
    def sub(m):
        ids = SECTION_ID.findall(m.group(1))
        return "".join(charter_token(i) for i in ids) if all(i in valid for i in ids) else m.group(0)

    return CITATION_GROUP.sub(sub, reflection)


def reflection_ids(tok: TargetTokenizer, reflection: str, *, open_id: int, close_id: int, charter: bool,
                   valid: frozenset[str]) -> list[int]:
    """`<assistant>` + the reflection + `</assistant>` as ids; with charter tokens each real
    citation becomes its <charter_X.Y> id."""
    if not charter:
        return [open_id, *tok.encode(reflection), close_id]
    ids, last = [open_id], 0
    for m in CITATION_GROUP.finditer(reflection):
        sections = SECTION_ID.findall(m.group(1))
        if not all(s in valid for s in sections):
            continue
        ids += tok.encode(reflection[last:m.start()])
        ids += [tok.added_ids[charter_token(s)] for s in sections]
        last = m.end()
    return ids + tok.encode(reflection[last:]) + [close_id]


def annotation_block(tok: TargetTokenizer, tags: list[str] | None, *, output: OutputConfig, max_tokens: int) -> tuple[list[int], str]:
    """The `<annotations>tag\\ntag</annotations>\\n` block as ids and as text; tags that do not fit
    in `max_tokens` are left out from the end."""
    if not tags:
        return [], ""
    tpl = output.template
    open_id, close_id = tok.added_ids[tpl.annotation_open], tok.added_ids[tpl.annotation_close]
    kept = list(tags)
    while kept:
        body = "\n".join(kept)
        ids = [open_id, *tok.encode(body), close_id, *tok.encode("\n")]
        if len(ids) <= max_tokens:
            return ids, f"{tpl.annotation_open}{body}{tpl.annotation_close}\n"
        kept.pop()
    return [], ""


@dataclass
class Assembled:
    """One document's training ids (EOS not included) and where its reflection block sits."""

    ids: list[int]
    reflection_start: int | None = None
    reflection_end: int | None = None

    def mask(self, length: int) -> np.ndarray:
        mask = np.zeros(length, dtype=np.uint8)
        if self.reflection_start is not None:
            mask[self.reflection_start:self.reflection_end] = 1
        return mask


def window(assembled: Assembled, *, size: int, eos_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One window: the document, EOS, then padding to `size` tokens; and its reflection mask."""
    n = len(assembled.ids)
    if n + 1 > size:
        raise ValueError(f"a document of {n} tokens plus EOS does not fit a {size}-token window")
    ids = np.full(size, pad_id, dtype=np.int64)
    ids[:n] = assembled.ids
    ids[n] = eos_id
    return ids, assembled.mask(size)


class DensePacker:
    """Documents (EOS after each) concatenated and cut into `size`-token windows; `finish()` pads
    the last window. Windows come out as they fill, so memory holds at most one window of tail."""

    def __init__(self, *, size: int, eos_id: int, pad_id: int):
        self.size, self.eos_id, self.pad_id = size, eos_id, pad_id
        self._tail: list[int] = []
        self.tokens = 0
        self.padding = 0

    def add(self, ids: list[int]) -> list[np.ndarray]:
        self._tail.extend(ids)
        self._tail.append(self.eos_id)
        self.tokens += len(ids) + 1
        out, start = [], 0
        while len(self._tail) - start >= self.size:
            out.append(np.asarray(self._tail[start:start + self.size], dtype=np.int64))
            start += self.size
        del self._tail[:start]
        return out

    def finish(self) -> list[np.ndarray]:
        if not self._tail:
            return []
        self.padding = self.size - len(self._tail)
        last = np.asarray(self._tail + [self.pad_id] * self.padding, dtype=np.int64)
        self._tail = []
        return [last]


def place(doc: list[int], *, keep: int, placement: Placement | None, point: int | None, inserted: list[int] | None) -> Assembled:
    """A window's content for one stream: the document's first `keep` ids with the recipe's text
    `inserted` (already wrapped in its template ids) placed as the recipe says: at token `point`
    (pause, end), before the document (before, prefix), or instead of it (replace). No text:
    the kept content alone."""
    if inserted is None or placement is None:
        return Assembled(list(doc[:keep]))
    if placement.at_point:
        if point is None or point > keep:
            raise ValueError(f"text placed at token {point} lies past the {keep} content tokens kept")
        return Assembled([*doc[:point], *inserted, *doc[point:keep]], point, point + len(inserted))
    if placement.replaces:
        return Assembled(list(inserted), 0, len(inserted))
    return Assembled([*inserted, *doc[:keep]], 0, len(inserted))
