"""Durable run state under the output directory, which is what makes a rerun resume exactly once:
the config fingerprint (run.json), pass 1's scored parts, the selection, the saved generations per
engine batch and each unit's manifest, written last (paths in annotator/core/layout.py).

Every file is written under a temporary name and renamed, so a file that exists is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from annotator.config import RunConfig
from annotator.core.layout import (
    DONE, REJECTED_DOCUMENTS, SCORED, generated_dir,
)
from annotator.score.reader import REJECT_COLUMNS
from annotator.core.stages import Resources, Stage
from annotator.core.units import Unit


# Settings that change how fast a run goes, not what it writes: a rerun may change them.
OPERATIONAL_FIELDS = {
    "classifier": {"batch_size", "concurrency", "num_cpus", "num_gpus", "micro_batch_size"},
    # generation.batch_size is not here: vLLM's numerics depend on what shares a batch, so the
    # engine batches (planned from it) are part of what decides the reflections.
    "generation": {"concurrency", "num_gpus", "num_cpus", "tensor_parallel_size", "max_batches_in_flight",
                   "gpu_memory_utilization", "enforce_eager", "batch_timeout_s", "max_replica_restarts"},
    "output": {"path", "overwrite", "keep_work"},
    "publish": None,
    "ray": None,
    # Read by other commands (audit, --plan, SFT data), never by the annotation run itself.
    "audit": None,
    "plan": None,
    "sft": None,
}


def output_settings(cfg: RunConfig) -> dict:
    """The part of the config that decides the output, plus the content of the files it names
    (the prompt pack's version, the canary file's hash); a resumed run must match it exactly."""
    tree = cfg.model_dump(mode="json")
    for section, fields in OPERATIONAL_FIELDS.items():
        if fields is None:
            tree.pop(section, None)
        else:
            for name in fields:
                tree[section].pop(name, None)
    tree["files"] = content_fingerprint(cfg)
    return tree


def content_fingerprint(cfg: RunConfig) -> dict:
    from annotator.method.prompt_packs import file_digest, load_pack

    canaries = cfg.generation.canaries.file
    return {"prompt_version": load_pack(cfg.generation.prompt_pack).version,
            "canary_file": file_digest(canaries) if canaries else None}


def config_differences(old: dict, new: dict, *, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_differences(a, b, prefix=f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def digest(*parts: object) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def write_atomically(path: Path, write) -> None:
    """`write(tmp_path)` then rename: the final name only ever holds a complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def write_table(path: Path, table: pa.Table, *, compression: str = "zstd") -> None:
    write_atomically(path, lambda tmp: pq.write_table(table, tmp, compression=compression))


def _counted(names) -> int:
    """Rows recorded in part names `<first>-<n>.parquet`."""
    return sum(int(Path(n).stem.rsplit("-", 1)[1]) for n in names)


def unit_scored(out_dir: Path, unit: Unit) -> bool:
    """Pass 1 finished this unit: its scored parts and rejected documents add up to its rows."""
    return _counted((out_dir / SCORED / unit.key).glob("*.parquet")) + rejected_count(out_dir, unit) == unit.rows


def unit_done(out_dir: Path, unit: Unit) -> bool:
    return (out_dir / DONE / f"{unit.key}.json").exists()


def clear_unit_scoring(out_dir: Path, unit: Unit) -> None:
    """Forget a unit's partial pass-1 output before it is scored again (no duplicates)."""
    shutil.rmtree(out_dir / SCORED / unit.key, ignore_errors=True)
    for p in (out_dir / REJECTED_DOCUMENTS).glob(f"{unit.key}-*.parquet"):
        p.unlink()


class WriteScored(Stage):
    """End of pass 1: per unit in the block, usable documents go to `_work/scored/<unit>/` and
    rejected ones to `rejects/documents/`; emits one count row per unit part."""

    name = "write_scored"
    reads = ("_unit", "source_row", "reject_reason", "text_preview")
    adds = ("unit", "scored", "rejected")

    def __init__(self, *, out_dir: str):
        self.out_dir = out_dir
        self.resources = Resources(num_cpus=0.25, batch_size=None)

    def process(self, batch: pa.Table) -> pa.Table:
        out = Path(self.out_dir)
        rows = {"unit": [], "scored": [], "rejected": []}
        for unit in sorted(set(batch.column("_unit").to_pylist())):
            part = batch.filter(pc.equal(batch.column("_unit"), unit))
            first = pc.min(part.column("source_row")).as_py()
            bad = pc.is_valid(part.column("reject_reason"))
            rejected = part.filter(bad)
            kept = part.filter(pc.invert(bad)).drop_columns(["reject_reason", "text_preview"])
            if rejected.num_rows:
                table = pa.table({"doc_id": rejected.column("doc_id"), "source_file": rejected.column("source_file"),
                                  "source_row": rejected.column("source_row"), "reason": rejected.column("reject_reason"),
                                  "text_preview": rejected.column("text_preview")}, schema=pa.schema(REJECT_COLUMNS))
                write_table(out / REJECTED_DOCUMENTS / f"{unit}-{first:09d}-{rejected.num_rows}.parquet", table)
            # Always written, even empty: the name carries the count that says the unit is complete.
            write_table(out / SCORED / unit / f"{first:09d}-{kept.num_rows}.parquet", kept)
            rows["unit"].append(unit)
            rows["scored"].append(kept.num_rows)
            rows["rejected"].append(rejected.num_rows)
        return pa.table(rows)


def read_unit_scored(out_dir: Path, unit: Unit, *, columns: list[str] | None = None) -> pa.Table:
    """All scored documents of a unit (all columns, or `columns` and `source_row`), in input order."""
    if columns is not None and "source_row" not in columns:
        columns = [*columns, "source_row"]
    parts = [pq.read_table(p, columns=columns) for p in sorted((out_dir / SCORED / unit.key).glob("*.parquet"))]
    table = pa.concat_tables(parts, promote_options="permissive") if parts else pa.table({c: [] for c in columns or ()})
    if not table.num_rows:
        return table
    return table.take(pc.sort_indices(table.column("source_row")))


def rejected_count(out_dir: Path, unit: Unit) -> int:
    return _counted(p.name.removeprefix(unit.key + "-") for p in (out_dir / REJECTED_DOCUMENTS).glob(f"{unit.key}-*.parquet"))


def generation_key(cfg: RunConfig) -> str:
    """What a cached generation depends on besides the document: the prompt pack's content, the
    sampling settings, the target tokenizer and the content a window keeps (pause points)."""
    g = cfg.generation.model_dump(mode="json")
    for name in OPERATIONAL_FIELDS["generation"] | {"enabled"}:
        g.pop(name, None)
    return digest(content_fingerprint(cfg), g, cfg.output.tokenizer, cfg.content_tokens)


def cached_generations(out_dir: Path, unit_key: str, *, key: str, pass_name: str | None = None) -> pa.Table | None:
    """The generation results already saved for a unit under generation key `key`."""
    parts = [pq.read_table(p) for p in sorted((generated_dir(out_dir, pass_name) / unit_key).glob("*.parquet"))]
    if not parts:
        return None
    table = pa.concat_tables(parts, promote_options="permissive")
    return table.filter(pc.equal(table.column("generation_key"), key))


def load_manifests(out_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out_dir / DONE).glob("*.json"))]
