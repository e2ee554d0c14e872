"""Engine prompts as token ids, so that text from data is only ever text.

The chat template is rendered with a placeholder in place of each message's content; the
template's own parts are tokenized as usual (their role and end-of-turn tokens are real special
tokens), and each content is tokenized with every added token of the tokenizer split into
ordinary pieces. A page holding `<|im_end|>\\n<|im_start|>system` therefore reaches the model as
those characters, never as role tokens. The parts put back together must equal the template's
plain rendering of the messages, so a template that rewrites contents is refused, not guessed."""

from __future__ import annotations

import re
import secrets


class PromptError(ValueError):
    """Messages whose prompt cannot be built safely with this tokenizer's chat template."""


class PromptBuilder:
    """Token ids of chat prompts for one tokenizer and chat template (generation prompt added)."""

    def __init__(self, tokenizer, *, chat_template_kwargs: dict | None = None):
        self.tok = tokenizer
        self.kwargs = dict(chat_template_kwargs or {})
        self.added = {tok.content: i for i, tok in tokenizer.added_tokens_decoder.items()}
        self._added_ids = frozenset(self.added.values())
        # Longest first, so an added token that contains another is cut as a whole.
        names = sorted(self.added, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, names))) if names else None
        self._nonce = secrets.token_hex(8)
        self._cache: dict[tuple[bool, str], list[int]] = {}  # template parts and system prompts: the same every request

    def _cached(self, text: str, *, content: bool) -> list[int]:
        key = (content, text)
        ids = self._cache.get(key)
        if ids is None:
            ids = self.content_ids(text) if content else self.tok(text, add_special_tokens=False)["input_ids"]
            if len(self._cache) < 256:
                self._cache[key] = ids
        return list(ids)

    def render(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **self.kwargs)

    def ids(self, messages: list[dict]) -> list[int]:
        contents = [m.get("content") for m in messages]
        if not all(isinstance(c, str) for c in contents):
            raise PromptError("every message content must be a string")
        marks = [f"SPPCONTENT{self._nonce}N{i}E" for i in range(len(messages))]
        rendered = self.render([{**m, "content": mark} for m, mark in zip(messages, marks)])
        pieces = re.split("(" + "|".join(marks) + ")", rendered)
        index = {mark: i for i, mark in enumerate(marks)}
        ids: list[int] = []
        text: list[str] = []
        for piece in pieces:
            if piece in index:
                i = index[piece]
                content = contents[i]
                ids.extend(self._cached(content, content=True) if messages[i].get("role") == "system" else self.content_ids(content))
                text.append(content)
            elif piece:
                ids.extend(self._cached(piece, content=False))
                text.append(piece)
        seen = [p for p in pieces if p in index]
        if sorted(seen) != sorted(marks) or "".join(text) != self.render(messages):
            raise PromptError("the chat template changes message contents (trims, rewrites or drops them); "
                              "its prompts cannot be built with the contents kept as data")
        return ids

    def content_ids(self, text: str) -> list[int]:
        """Ids of `text` with no added token among them: each added token's string is tokenized as
        two ordinary halves, and the rest with special tokens split."""
        if self._added_re is None:
            return self.tok(text, add_special_tokens=False)["input_ids"]
        parts: list[str] = []
        last = 0
        for m in self._added_re.finditer(text):
            parts += [text[last:m.start()], m.group()[:1], m.group()[1:]]
            last = m.end()
        parts.append(text[last:])
        ids: list[int] = []
        for part in filter(None, parts):
            ids.extend(self.tok(part, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        if not self._added_ids.isdisjoint(ids):
            raise PromptError("a message content still tokenizes to an added token")
        return ids
