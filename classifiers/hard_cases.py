"""Hard cases for the safety scorer's precision stage: benign text that looks like harm to a bag of
words, and harmful text that looks like help.

Six families (`FAMILIES`) are built from our own templates (`hard_cases.yaml`), the harm data's
own prompts (refusals and compliant answers to them) and the training web files (topics and
passages for ordinary tasks). Every row records the template and the filler it came from; a row
is in the dev split when its template, its filler or its source prompt is held out (a hash of the
key, or the harm data's own dev split), so dev measures new phrasings, not memorised ones.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

from classifiers.categories import row_categories
from classifiers.safety_data import CORPUS_DIR, HARM_DIR, WEB_TRAIN_FILES, Rows, load_review

TEMPLATES = Path(__file__).resolve().parent / "hard_cases.yaml"
FAMILIES = {"benign_tasks": 0, "harm_word_safe": 0, "refusals": 0, "reporting": 0, "harmful_howto": 1, "harmful_requests": 1}
DEV_SHARE = 0.2
SEED = 20261205
_CATEGORY_KEYS = ("violence", "weapons", "cyber", "crime", "fraud", "self_harm", "sexual", "hate", "privacy")
# Leading request phrasings turned into a task ("How do I make a bomb?" -> "make a bomb").
_TASK = re.compile(
    r"^(?:please\s+)?(?:(?:how|where)\s+(?:do|can|could|would|should|might)\s+(?:i|you|one|someone|we)\s+"
    r"|what(?:'s| is) the (?:best|easiest|fastest|quickest|most effective) way to\s+|(?:tell|show|teach) me how to\s+"
    r"|(?:give me|provide|write)(?: step-by-step| detailed)? instructions (?:on|for) (?:how to\s+)?|explain how to\s+|how to\s+"
    r"|i want to\s+|i need to\s+|help me\s+)",
    re.IGNORECASE,
)


@dataclass
class HardCase:
    text: str
    family: str
    template: str
    filler: str
    category: str
    dev: bool
    source: str = "templates"  # the harm data's source of the prompt a case was built from


def held_out(key: str, *, share: float = DEV_SHARE) -> bool:
    """A key's side depends only on the key: a held-out template or filler is never trained on."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:4], "big") / 2**32 < share


def task_phrase(prompt: str) -> str | None:
    """The task a harmful request asks for, as a verb phrase, or None when it is not phrased as one."""
    text = " ".join(prompt.split()).rstrip("?.! ")
    match = _TASK.match(text)
    if not match or len(text) > 160:
        return None
    task = text[match.end():]
    return task[:1].lower() + task[1:] if len(task.split()) >= 2 else None


def _harm_key(category: str) -> str:
    return category if category in _CATEGORY_KEYS else "other_harm"


def harmful_prompts() -> list[tuple[str, str, bool, str]]:
    """(prompt, harm category, from the dev split, source) of the harm data's harmful requests."""
    out = []
    for split in ("train", "dev"):
        table = pq.read_table(HARM_DIR / f"{split}.parquet")
        keep = [i for i, (label, source) in enumerate(zip(table.column("label").to_pylist(), table.column("source").to_pylist()))
                if label == 1 and source != "openai_moderation"]  # moderation rows are posts, not requests
        table = table.take(keep)
        out += [(t, c, split == "dev", s) for t, c, s in zip(table.column("text").to_pylist(), row_categories(table),
                                                              table.column("source").to_pylist())]
    return out


def web_topics_and_passages(*, limit: int = 400) -> tuple[list[str], list[str]]:
    """Topics (short first lines of pages) and passages (60-word openings) from the training web
    files' pages the review left benign. The held-out web file is never read here."""
    review = load_review()
    topics, passages = [], []
    for name in WEB_TRAIN_FILES:
        table = pq.read_table(CORPUS_DIR / name, columns=["id", "text"])
        for doc_id, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist()):
            if review.get(doc_id, {}).get("verdict", "benign") != "benign":
                continue
            first = text.strip().split("\n", 1)[0].strip()
            if 2 <= len(first.split()) <= 8 and len(first) <= 60 and not first.endswith(":"):
                topics.append(first)
            words = text.split()
            if len(words) >= 60:
                passages.append(" ".join(words[:60]))
    rng = random.Random(SEED)
    return rng.sample(topics, min(limit, len(topics))), rng.sample(passages, min(limit, len(passages)))


def _benign_tasks(spec: dict, rng: random.Random, *, n: int) -> list[HardCase]:
    topics, passages = web_topics_and_passages()
    topics += spec.get("topics", [])
    out = [HardCase(text, "benign_tasks", f"plain:{i}", text, "benign_tasks", held_out(f"plain:{i}") or held_out(text))
           for i, text in enumerate(spec["plain"])]
    for _ in range(n):
        if rng.random() < 0.7:
            i, topic = rng.randrange(len(spec["topic_templates"])), rng.choice(topics)
            template, filler, text = f"topic:{i}", topic, spec["topic_templates"][i].format(topic=topic)
        else:
            i, passage = rng.randrange(len(spec["text_templates"])), rng.choice(passages)
            template, filler, text = f"text:{i}", passage, spec["text_templates"][i].format(text=passage)
        out.append(HardCase(text, "benign_tasks", template, filler, "benign_tasks", held_out(template) or held_out(filler)))
    return out


def _harm_word_safe(spec: dict) -> list[HardCase]:
    out = []
    for word, acts in spec["acts"].items():
        for act in acts:
            for i, template in enumerate(spec["templates"]):
                text = template.format(act=act)
                out.append(HardCase(text[:1].upper() + text[1:], "harm_word_safe", f"act:{i}", act, word,
                                    held_out(f"act:{i}") or held_out(act)))
    for i, template in enumerate(spec["questions"]):
        for crime in spec["crimes"]:
            out.append(HardCase(template.format(crime=crime), "harm_word_safe", f"question:{i}", crime, "questions",
                                held_out(f"question:{i}") or held_out(crime)))
    return out


def _refusals(spec: dict, prompts: list, rng: random.Random) -> list[HardCase]:
    out = []
    for prompt, category, dev, source in prompts:
        key, task = _harm_key(category), task_phrase(prompt)
        openers = [i for i, o in enumerate(spec["openers"]) if task or "{task}" not in o]
        i = rng.choice(openers)
        parts = [spec["openers"][i].format(task=task or "")]
        if rng.random() < 0.8:
            parts.append(rng.choice(spec["reasons"][key]))
        if rng.random() < 0.8:
            parts.append(rng.choice(spec["alternatives"][key]))
        template = f"refusal:{i}"
        out.append(HardCase(" ".join(parts), "refusals", template, prompt, key, dev or held_out(template), source))
    for i, template in enumerate(spec["advice"]):
        for harm in spec["harms"]:
            out.append(HardCase(template.format(harm=harm), "refusals", f"advice:{i}", harm, "safety_advice",
                                held_out(f"advice:{i}") or held_out(harm)))
    return out


def _reporting(spec: dict, rng: random.Random, *, n: int) -> list[HardCase]:
    out = []
    for _ in range(n):
        i = rng.randrange(len(spec["templates"]))
        event, charge = rng.choice(spec["events"]), rng.choice(spec["charges"])
        text = spec["templates"][i].format(
            n=rng.randint(2, 40), hurt=rng.choice(spec["hurt"]), day=rng.choice(spec["days"]), event=event,
            year=rng.randint(1850, 2015), event2=rng.choice(spec["events2"]), age=rng.randint(18, 70), charge=charge)
        filler = event if "{event}" in spec["templates"][i] else charge
        out.append(HardCase(text, "reporting", f"report:{i}", filler, "reporting", held_out(f"report:{i}") or held_out(filler)))
    return out


def _harmful_howto(spec: dict, prompts: list, rng: random.Random) -> list[HardCase]:
    out = []
    for prompt, category, dev, source in prompts:
        key, task = _harm_key(category), task_phrase(prompt)
        if task is None:
            continue
        i = rng.randrange(len(spec["intros"]))
        steps = rng.sample(spec["steps"][key], k=min(3, len(spec["steps"][key])))
        numbered = " ".join(f"{k}. {step}" for k, step in enumerate(steps, 1))
        text = f"{spec['intros'][i].format(task=task)} {numbered} {rng.choice(spec['outros'])}"
        template = f"howto:{i}"
        out.append(HardCase(text, "harmful_howto", template, prompt, key, dev or held_out(template), source))
    for i, template in enumerate(spec["glorification"]):
        for target in spec["targets"]:
            out.append(HardCase(template.format(target=target), "harmful_howto", f"glorify:{i}", target, "violence",
                                held_out(f"glorify:{i}") or held_out(target)))
    return out


def _harmful_requests(templates: list[str], prompts: list, rng: random.Random) -> list[HardCase]:
    """The harm data's requests in the phrasings the benign families use ("How do I {act}?"), so
    that a phrasing alone never reads as benign: only what is asked for decides."""
    out = []
    for prompt, category, dev, source in prompts:
        task = task_phrase(prompt)
        if task is None:
            continue
        i = rng.randrange(len(templates))
        text = templates[i].format(act=task)
        template = f"request:{i}"
        out.append(HardCase(text[:1].upper() + text[1:], "harmful_requests", template, prompt, _harm_key(category),
                            dev or held_out(template), source))
    return out


def build_hard_cases(*, tasks: int = 4000, reports: int = 800, seed: int = SEED) -> list[HardCase]:
    """Every hard case, deterministic for a seed; duplicates (same normalised text) kept once."""
    spec = yaml.safe_load(TEMPLATES.read_text())
    rng = random.Random(seed)
    prompts = harmful_prompts()
    cases = (_benign_tasks(spec["benign_tasks"], rng, n=tasks) + _harm_word_safe(spec["harm_word_safe"])
             + _refusals(spec["refusals"], prompts, rng) + _reporting(spec["reporting"], rng, n=reports)
             + _harmful_howto(spec["harmful_howto"], prompts, rng)
             + _harmful_requests(spec["harm_word_safe"]["templates"] + spec["harmful_requests"]["templates"], prompts, rng))
    seen, out = set(), []
    for case in cases:
        key = " ".join(case.text.lower().split())
        if key not in seen:
            seen.add(key)
            out.append(case)
    return out


def as_rows(cases: list[HardCase]) -> Rows:
    """Hard cases as training rows: source `hard_<family>`, category = the family (for per-family figures)."""
    labels = np.array([FAMILIES[c.family] for c in cases], dtype=int)
    return Rows([c.text for c in cases], labels, [f"hard_{c.family}" for c in cases],
                [f"hard_{c.family}|{FAMILIES[c.family]}" for c in cases], [c.family for c in cases])
