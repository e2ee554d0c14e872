"""Seeded choices: every random choice of a run is a pure function of its parts (a salt, the run's
seed, a document or item id, an attempt), so it does not depend on batch order, worker count or
restarts. `sampling_seed` is the one rule for an engine request's sampling seed.
"""

from __future__ import annotations

import hashlib


def unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) fixed by `parts`; order- and worker-independent."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def sampling_seed(*parts: object) -> int:
    """The sampling seed of one engine request (e.g. task, run seed, item id, attempt): a retry
    gets a new seed, a rerun the same one."""
    return int(unit_hash(*parts) * 2**31)
