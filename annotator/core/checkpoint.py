"""Durable run state under the output directory, which is what makes a rerun resume exactly once:
the config fingerprint (run.json) and each unit's manifest, written last (paths in
`core/layout.py`; pass 1's scored parts are `score/store.py`, saved generations `generate/cache.py`).

Every file is written under a temporary name and renamed (uploaded in one PUT on object storage,
`core/storage.py`), so a file that exists is complete.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from annotator.config import RunConfig
from annotator.core import storage
from annotator.core.layout import DONE, RUN_FILE, TOOL
from annotator.core.storage import TMP_MARK, write_atomically
from annotator.core.units import Unit


# Settings that change how fast a run goes, not what it writes: a rerun may change them.
OPERATIONAL_FIELDS = {
    "classifier": {"batch_size", "concurrency", "num_cpus", "num_gpus", "micro_batch_size"},
    # generation.batch_size is not here: vLLM's numerics depend on what shares a batch, so the
    # engine batches (planned from it) are part of what decides the reflections.
    "generation": {"concurrency", "num_gpus", "num_cpus", "tensor_parallel_size", "engine_process", "max_batches_in_flight",
                   "reproducible", "max_num_seqs", "gpu_memory_utilization", "enforce_eager", "batch_timeout_s", "max_replica_restarts"},
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
    tree["files"] = {**content_fingerprint(cfg), "classifier": classifier_fingerprint(cfg)}
    return tree


def content_fingerprint(cfg: RunConfig) -> dict:
    """The content of the files the generation reads, by digest: every recipe's pack version
    (name@content hash), the recipe files given by path, and the canaries file. A change between a crash and the resume is a
    different method: the resume is refused with the difference, and cached generations are not
    reused (they are keyed on this)."""
    from annotator.method.prompt_packs import file_digest
    from annotator.method.resolved import resolve_run

    resolved = resolve_run(cfg.generation, voices=cfg.output.voices)
    packs = resolved.packs
    canaries = cfg.generation.canaries.file
    out = {"prompt_version": packs[next(iter(packs))].version if packs else None,
           "prompt_versions": {name: pack.version for name, pack in packs.items()},
           "canary_file": file_digest(canaries) if canaries else None}
    files = {r.name: r.version for r in resolved.recipes if not r.builtin}  # a built-in recipe is the code's
    if files:
        out["recipe_files"] = files
    return out


def classifier_fingerprint(cfg: RunConfig) -> dict:
    """The safety scorer's model files by digest (a fastText file with its calibration beside it,
    a local transformers folder file by file); a Hub id is named, not hashed: its files are not
    read here (pin a revision by downloading it to a folder)."""
    c = cfg.classifier
    models = {"model": c.model, **({"precision": c.precision.model} if c.backend == "fasttext" and c.precision.model else {}),
              **({"cascade": c.cascade.model} if c.cascade.model else {})}
    return {role: model_fingerprint(spec) for role, spec in models.items()}


def model_fingerprint(spec: str) -> str:
    path = Path(spec).expanduser()
    if path.is_file():
        calibration = path.with_suffix(".calibration.json")
        return _file_hash(path) + (f"+{_file_hash(calibration)}" if calibration.is_file() else "")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return digest([(str(p.relative_to(path)), _file_hash(p)) for p in files])
    return f"hub:{spec}"


@lru_cache(maxsize=256)
def _hash_of(path: str, *, size: int, mtime_ns: int) -> str:
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _file_hash(path: Path) -> str:
    """A file's content hash, computed once per process for a file that did not change."""
    st = path.stat()
    return _hash_of(str(path.resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns)


def as_recorded(settings: dict, previous: dict) -> dict:
    """`settings` as a run written by an earlier version recorded them: file fingerprints it did
    not take yet, and settings it did not have that are off (null), are left out of the
    comparison. Such a run resumes; what it did record must match."""
    old = previous.get("output_settings") or {}
    out = dict(settings["output_settings"])
    for section, values in out.items():
        if isinstance(values, dict) and isinstance(old.get(section), dict):
            out[section] = {k: v for k, v in values.items() if k in old[section] or (v is not None and section != "files")}
    return {**settings, "output_settings": out}


# Settings a run written before them did not have; such a run is resumed with them off, as it was planned.
SINCE_RECORDED = {"input": {"unit_bytes": None, "max_row_group_bytes": None}}


def config_as_recorded(cfg: RunConfig, out_dir: Path) -> RunConfig:
    """`cfg` with the settings of `SINCE_RECORDED` off when the run in `out_dir` (resumed, not
    overwritten) was written before they existed: its units were planned without them."""
    previous = our_run_record(out_dir)
    if previous is None or cfg.output.overwrite:
        return cfg
    old = previous.get("output_settings") or {}
    update = {}
    for section, fields in SINCE_RECORDED.items():
        missing = {k: v for k, v in fields.items() if isinstance(old.get(section), dict) and k not in old[section]}
        if missing:
            update[section] = getattr(cfg, section).model_copy(update=missing)
    return cfg.model_copy(update=update) if update else cfg


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


def sweep_temporaries(out_dir: Path, names: tuple[str, ...]) -> int:
    """Deletes the temporary files a killed writer left under the named entries of `out_dir`
    (under the folder's lock, on resume: no writer of this run has started); returns how many."""
    if storage.is_remote(out_dir):
        return 0    # temporaries of object storage are local files of the writer, never objects
    swept = 0
    for name in names:
        root = Path(out_dir) / name
        if root.is_dir():
            for p in root.rglob(f"*{TMP_MARK}*"):
                if p.is_file() and p.name.startswith("."):
                    p.unlink()
                    swept += 1
    return swept


def write_json(path: Path, data: dict) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def write_table(path: Path, table: pa.Table, *, compression: str = "zstd") -> None:
    write_atomically(path, lambda tmp: pq.write_table(table, tmp, compression=compression))


def read_json(path) -> dict:
    return json.loads(path.read_text())


def unit_done(out_dir: Path, unit: Unit) -> bool:
    return (out_dir / DONE / f"{unit.key}.json").exists()


def load_manifests(out_dir: Path) -> list[dict]:
    return [read_json(p) for p in sorted((out_dir / DONE).glob("*.json"), key=lambda p: p.name)]


def our_run_record(out_dir: Path) -> dict | None:
    """run.json of `out_dir` when this tool wrote it (its `tool` field; a run written before the
    field existed is known by its `output_settings`, an SFT run by `kind`), else None."""
    try:
        record = read_json(storage.location(out_dir) / RUN_FILE)
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and (record.get("tool") == TOOL or "output_settings" in record or record.get("kind") == "sft"):
        return record
    return None


def remove_entries(out_dir: Path, names: tuple[str, ...]) -> None:
    """Deletes the named top-level entries of `out_dir` (this tool's outputs) and nothing else."""
    for name in names:
        storage.remove_tree(storage.location(out_dir) / name)
