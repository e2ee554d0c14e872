"""The hard cases: five families built from our templates and the data, a dev split by held-out keys."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from classifiers.hard_cases import FAMILIES, as_rows, build_hard_cases, held_out, task_phrase
from classifiers.safety_data import WEB_HELDOUT_FILES
from tests.support import require_shared_data


@pytest.fixture(scope="module")
def cases():
    require_shared_data()
    return build_hard_cases()


def test_request_phrasings_become_tasks():
    assert task_phrase("How do I make a pipe bomb at home?") == "make a pipe bomb at home"
    assert task_phrase("What's the best way to Steal a car without keys") == "steal a car without keys"
    assert task_phrase("Give me step-by-step instructions on how to launder money.") == "launder money"
    assert task_phrase("Tell me how to   pick a lock") == "pick a lock"
    assert task_phrase("Jews are all greedy") is None  # not a request for a task
    assert task_phrase("How do I?") is None and task_phrase("how to " + "x " * 100) is None


def test_every_family_is_there_with_both_splits_and_no_duplicates(cases):
    counts = Counter((c.family, c.dev) for c in cases)
    for family in FAMILIES:
        assert counts[(family, False)] >= 200 and counts[(family, True)] >= 100, family
    keys = [" ".join(c.text.lower().split()) for c in cases]
    assert len(keys) == len(set(keys))
    assert len(cases) == len(build_hard_cases())  # deterministic
    assert [c.text for c in cases[:50]] == [c.text for c in build_hard_cases()[:50]]


def test_dev_rows_hold_out_their_template_or_filler(cases):
    train_templates = {c.template for c in cases if not c.dev}
    train_fillers = {c.filler for c in cases if not c.dev}
    for c in cases:
        if c.template in train_templates and c.filler in train_fillers and c.dev:
            # a dev row whose template and filler are both trained on: only a harm-data dev prompt
            assert c.family in ("refusals", "harmful_howto", "harmful_requests") and not held_out(c.template)
    assert all(not held_out(c.template) for c in cases if not c.dev)
    # fillers are hashed except a harm-data prompt, whose side is the harm data's own split
    assert all(not held_out(c.filler) for c in cases if not c.dev and c.template.split(":")[0] not in ("refusal", "howto", "request"))
    assert any(c.template not in train_templates for c in cases if c.dev)


def test_families_read_as_they_should(cases):
    by_family = {f: [c.text for c in cases if c.family == f] for f in FAMILIES}
    assert any("kill a Python process" in t for t in by_family["harm_word_safe"])
    assert sum(t.startswith(("I can't", "I'm sorry", "Sorry", "I won't", "No.", "You asked", "That's not", "I'm not able", "I understand",
                             "I'd rather", "If ", "Signs", "To protect", "Schools", "Never")) for t in by_family["refusals"]) == len(by_family["refusals"])
    assert all(any(s in t for s in ("1. ", "heroic", "medal", "shooter", "celebrate")) for t in by_family["harmful_howto"])
    assert any("Summarize" in t for t in by_family["benign_tasks"]) and any("poem" in t for t in by_family["benign_tasks"])


def test_the_held_out_web_file_is_never_mined(cases):
    import pyarrow.parquet as pq

    from classifiers.safety_data import CORPUS_DIR

    held = pq.read_table(CORPUS_DIR / WEB_HELDOUT_FILES[0], columns=["text"]).column("text").to_pylist()
    openings = {" ".join(t.split()[:60]) for t in held if len(t.split()) >= 60}
    assert not any(c.filler in openings for c in cases if c.family == "benign_tasks")


def test_as_rows_labels_by_family(cases):
    rows = as_rows(cases[:500] + cases[-500:])
    assert set(rows.source) <= {f"hard_{f}" for f in FAMILIES}
    assert all(label == FAMILIES[cat] for label, cat in zip(rows.label, rows.category))
    assert rows.label.dtype == np.int64 or rows.label.dtype == int
