"""The prompts of an SFT run: read from Parquet sources (local or through fsspec URLs such as
hf://datasets/...), filtered, drawn by weight with a seed and without duplicates, and written once
to `_work/prompts.parquet` so that a rerun (or a resumed run) answers exactly the same rows.

Each drawn row also carries what is decided per conversation before any engine runs: how many
follow-up turns it gets and which inject canary it is asked to weave in.
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from annotator.config import ConfigError, SftConfig, SftSourceConfig
from annotator.core.seeding import unit_hash

PROMPT_SCHEMA = pa.schema([
    ("conversation_id", pa.string()), ("source", pa.string()), ("source_id", pa.string()), ("user", pa.string()),
    ("category", pa.string()), ("harm_category", pa.string()), ("follow_ups", pa.int32()), ("canary_id", pa.string()),
])


def source_files(path: str) -> tuple[object, list[str]]:
    """(filesystem, sorted Parquet files) of a file, folder or glob, local or a URL."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if any(ch in root for ch in "*?["):
        files = fs.glob(root)
    elif fs.isdir(root):
        files = fs.glob(root.rstrip("/") + "/**/*.parquet")
    else:
        files = [root] if fs.exists(root) else []
    files = sorted(f for f in files if str(f).endswith(".parquet"))
    if not files:
        raise ConfigError(f"sft.sources: {path!r} holds no Parquet file")
    return fs, files


def _key(text: str) -> str:
    """Duplicate key of a prompt: NFKC, lower case, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def read_source(src: SftSourceConfig) -> list[dict]:
    """The usable rows of one source, in file and row order: `source_id`, `user`, `category`."""
    fs, files = source_files(src.path)
    columns = list(dict.fromkeys(c for c in (src.prompt_column, src.id_column, src.category_column, *src.where) if c))
    rows, position = [], 0
    for f in files:
        table = pq.read_table(f, filesystem=fs)
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ConfigError(f"sft.sources[{src.name}]: {f} has no column {missing} (columns: {table.column_names})")
        data = table.select(columns).to_pydict()
        for i in range(table.num_rows):
            sid = str(data[src.id_column][i]) if src.id_column else str(position + i)
            text = data[src.prompt_column][i]
            if not isinstance(text, str) or not text.strip() or len(text) > src.max_chars:
                continue
            if any(data[c][i] not in allowed for c, allowed in src.where.items()):
                continue
            category = data[src.category_column][i] if src.category_column else None
            rows.append({"source_id": sid, "user": text.strip(), "category": None if category in (None, "") else str(category)})
        position += table.num_rows
    return rows


def allocate(weights: dict[str, float], sizes: dict[str, int], *, total: int) -> dict[str, int]:
    """Prompts per source: `total` shared by weight (largest remainders), capped at each source's
    size; what a capped source cannot give goes to the others by weight."""
    alloc = {k: 0 for k in weights}
    open_ = [k for k in weights if sizes[k] > 0]
    left = min(total, sum(sizes.values()))
    while left > 0 and open_:
        w = sum(weights[k] for k in open_)
        exact = {k: left * weights[k] / w for k in open_}
        share = {k: math.floor(v) for k, v in exact.items()}
        for k in sorted(open_, key=lambda k: (share[k] - exact[k], open_.index(k)))[: left - sum(share.values())]:
            share[k] += 1
        for k in open_:
            take = min(share[k], sizes[k] - alloc[k])
            alloc[k] += take
            left -= take
        open_ = [k for k in open_ if alloc[k] < sizes[k]]
    return alloc


def draw_prompts(cfg: SftConfig, *, inject_canaries: list[str]) -> tuple[pa.Table, dict]:
    """The drawn prompts in conversation order, and the draw's record (pool sizes, counts, digest).

    A prompt seen in an earlier source (or earlier in the same one) is a duplicate and is left out
    of the pool. Within a source the rows with the smallest seeded hash of their id are drawn, so a
    draw does not depend on file order; the drawn rows are then interleaved by another hash."""
    if not cfg.sources:
        raise ConfigError("sft.sources: at least one prompt source is needed")
    seen: set[str] = set()
    pools: dict[str, list[dict]] = {}
    for src in cfg.sources:
        pool = []
        for row in read_source(src):
            key = _key(row["user"])
            if key not in seen:
                seen.add(key)
                pool.append(row)
        pools[src.name] = pool
    counts = allocate({s.name: s.weight for s in cfg.sources}, {k: len(v) for k, v in pools.items()}, total=cfg.prompts)
    drawn = []
    for src in cfg.sources:
        ranked = sorted(pools[src.name], key=lambda r: unit_hash("sft-draw", cfg.seed, src.name, r["source_id"]))
        for row in ranked[: counts[src.name]]:
            cid = f"{src.name}:{row['source_id']}"
            multi = unit_hash("sft-multi-turn", cfg.seed, cid) < cfg.multi_turn_fraction
            follow = 1 + int(unit_hash("sft-follow-ups", cfg.seed, cid) * cfg.max_followups) if multi else 0
            canary = None
            if inject_canaries and unit_hash("sft-canary", cfg.seed, cid) < cfg.canary_fraction:
                canary = inject_canaries[int(unit_hash("sft-canary-choice", cfg.seed, cid) * len(inject_canaries))]
            drawn.append({"conversation_id": cid, "source": src.name, "source_id": row["source_id"], "user": row["user"],
                          "category": row["category"], "harm_category": src.harm_category, "follow_ups": follow, "canary_id": canary})
    drawn.sort(key=lambda r: unit_hash("sft-order", cfg.seed, r["conversation_id"]))
    digest = hashlib.sha256()
    for r in drawn:
        digest.update(f"{r['conversation_id']}\x00{r['user']}\x00".encode())
    record = {"pool_sizes": {k: len(v) for k, v in pools.items()}, "drawn": counts, "rows": len(drawn),
              "sha256": digest.hexdigest()}
    return pa.Table.from_pylist(drawn, schema=PROMPT_SCHEMA), record


def materialise_prompts(path: Path, cfg: SftConfig, *, inject_canaries: list[str]) -> tuple[pa.Table, dict]:
    """The run's prompts: read from `path` when an earlier attempt wrote it, else drawn and written.
    The record is kept in the file's metadata; the caller compares it with the run's fingerprint."""
    from annotator.core.checkpoint import write_table

    if path.exists():
        table = pq.read_table(path)
        return table.replace_schema_metadata(None), _record(table)
    table, record = draw_prompts(cfg, inject_canaries=inject_canaries)
    write_table(path, table.replace_schema_metadata({b"spp_sft_draw": json.dumps(record, sort_keys=True).encode()}))
    return table, record


def _record(table: pa.Table) -> dict:
    meta = table.schema.metadata or {}
    return json.loads(meta.get(b"spp_sft_draw", b"{}"))
