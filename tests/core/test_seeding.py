"""Seeded choices (`core/seeding.py`): pure functions of their parts, uniform, and one rule for an
engine request's sampling seed."""

from __future__ import annotations

from annotator.core.seeding import sampling_seed, unit_hash


def test_unit_hash_is_fixed_by_its_parts_and_uniform():
    assert unit_hash("pause", 0, "doc-1") == unit_hash("pause", 0, "doc-1")
    assert unit_hash("pause", 0, "doc-1") != unit_hash("pause", 1, "doc-1") != unit_hash("select", 1, "doc-1")
    # The separator keeps ("a", "bc") and ("ab", "c") apart.
    assert unit_hash("a", "bc") != unit_hash("ab", "c")
    values = [unit_hash("u", 7, i) for i in range(20_000)]
    assert all(0.0 <= v < 1.0 for v in values)
    deciles = [sum(int(v * 10) == d for v in values) for d in range(10)]
    assert all(1_800 < n < 2_200 for n in deciles), deciles


def test_sampling_seed_changes_with_the_attempt_not_with_the_call():
    seeds = [sampling_seed("reflection", 0, "doc-1", attempt) for attempt in range(4)]
    assert len(set(seeds)) == 4 and all(0 <= s < 2**31 for s in seeds)
    assert seeds[2] == sampling_seed("reflection", 0, "doc-1", 2)
    assert seeds[0] == int(unit_hash("reflection", 0, "doc-1", 0) * 2**31)
