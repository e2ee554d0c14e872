"""Work units: the input split into deterministic pieces (runs of row groups of one Parquet file).

A unit is the grain of resume and of output naming: it is scored, generated for and written as
a whole, its output shards are named after it, and a manifest marks it done. Planning reads only
Parquet footers, so an unreadable file or one without a usable text column is found before any
model loads, and the number of input documents is known up front.
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from annotator.config import InputConfig

TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)


@dataclass(frozen=True)
class Unit:
    """Rows [row_start, row_start + rows) of `path`, made of the row groups in `row_groups`;
    `take` < the row groups' total only for the last unit under `input.limit`."""

    key: str
    path: str
    row_groups: tuple[int, ...]
    row_start: int
    rows: int


@dataclass(frozen=True)
class RejectedFile:
    path: str
    reason: str


@dataclass
class InputPlan:
    units: list[Unit]
    rejected_files: list[RejectedFile]

    @property
    def documents(self) -> int:
        return sum(u.rows for u in self.units)

    def to_json(self) -> dict:
        return {"units": [asdict(u) for u in self.units], "rejected_files": [asdict(r) for r in self.rejected_files]}


def file_key(path: str) -> str:
    """Readable and unique: the file's stem plus a hash of its full path. The stem keeps ASCII
    letters, digits, `.`, `_` and `-` (others become `_`): keys name output files and are found
    again by `<key>-*` globs, which a name like `data[1]` would turn into a pattern."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(path.rstrip("/")).name.split(".")[0])[:80] or "part"
    return f"{stem}-{hashlib.blake2b(path.encode(), digest_size=4).hexdigest()}"


def open_parquet(path: str):
    """A `pyarrow.parquet.ParquetFile` for a local path or an fsspec URL (s3://, gs://, hf://)."""
    import pyarrow.parquet as pq

    if "://" in path:
        import fsspec

        return pq.ParquetFile(fsspec.open(path, "rb").open())
    return pq.ParquetFile(path)


@dataclass(frozen=True)
class _Footer:
    path: str
    row_groups: tuple[int, ...] = ()   # rows per row group
    group_bytes: tuple[int, ...] = ()  # uncompressed bytes per row group
    error: str | None = None


def _read_footer(path: str, text_column: str) -> _Footer:
    try:
        meta = open_parquet(path)
        schema = meta.schema_arrow
    except Exception as err:  # noqa: BLE001 - any unreadable footer is the same verdict
        return _Footer(path, error=f"unreadable_parquet: {type(err).__name__}: {err}"[:500])
    if text_column not in schema.names:
        return _Footer(path, error=f"missing_text_column: {text_column!r} not in {schema.names}")
    text_type = schema.field(text_column).type
    if not any(check(text_type) for check in TEXT_TYPES):
        return _Footer(path, error=f"text_column_type: {text_column!r} is {text_type}, expected string or binary")
    md = meta.metadata
    groups = [md.row_group(i) for i in range(md.num_row_groups)]
    return _Footer(path, row_groups=tuple(g.num_rows for g in groups), group_bytes=tuple(g.total_byte_size for g in groups))


def _oversized_group(footer: _Footer, cap: int | None) -> str | None:
    for index, size in enumerate(footer.group_bytes):
        if cap is not None and size > cap:
            return (f"row_group_too_large: row group {index} holds {size:,} bytes uncompressed, over input.max_row_group_bytes = "
                    f"{cap:,}; a row group is read whole: rewrite the file with smaller row groups")
    return None


def plan_input(files: list[str], cfg: InputConfig, *, max_workers: int = 16) -> InputPlan:
    """Units of about `cfg.rows_per_unit` rows, or fewer when their row groups reach
    `cfg.unit_bytes` uncompressed (whole row groups, never across files), in file order, cut at
    `cfg.limit`; files that cannot be used (unreadable, no text column, a row group over
    `cfg.max_row_group_bytes`) are listed with the reason."""
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(files)))) as pool:
        footers = list(pool.map(lambda p: _read_footer(p, cfg.text_column), files))
    units: list[Unit] = []
    rejected: list[RejectedFile] = []
    budget = cfg.limit if cfg.limit else None
    seen: set[str] = set()
    for footer in footers:
        error = footer.error or _oversized_group(footer, cfg.max_row_group_bytes)
        if error:
            rejected.append(RejectedFile(footer.path, error))
            continue
        base = file_key(footer.path)
        if base in seen:
            continue  # the same file named twice (a glob and a path) is read once
        seen.add(base)
        start, groups, rows, size = 0, [], 0, 0
        for index, n in enumerate(footer.row_groups):
            if budget is not None and budget <= 0:
                break
            groups.append(index)
            rows += n
            size += footer.group_bytes[index]
            last = index == len(footer.row_groups) - 1
            full = rows >= cfg.rows_per_unit or (cfg.unit_bytes is not None and size >= cfg.unit_bytes)
            if full or last or (budget is not None and rows >= budget):
                take = min(rows, budget) if budget is not None else rows
                units.append(Unit(key=f"{base}-{start:09d}", path=footer.path, row_groups=tuple(groups),
                                  row_start=start, rows=take))
                if budget is not None:
                    budget -= take
                start += rows
                groups, rows, size = [], 0, 0
    return InputPlan(units=units, rejected_files=rejected)


def units_from_json(data: dict) -> list[Unit]:
    return [Unit(**{**u, "row_groups": tuple(u["row_groups"])}) for u in data["units"]]


def units_in(batch: pa.Table) -> list[Unit]:
    """The units a batch of a unit dataset names (its `unit` column of `unit_json` strings): the one
    decoder every per-unit stage uses."""
    return units_from_json({"units": [json.loads(u) for u in batch.column("unit").to_pylist()]})


def unit_json(unit: Unit) -> str:
    return json.dumps(asdict(unit), sort_keys=True)
