"""Writing: splice reflections into the text between template tokens, write Parquet shards
under deterministic names (temporary name, then rename), and return per-shard statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from annotator.config import TemplateConfig
from annotator.generation import OK
from annotator.selection import DROPPED_BAD
from annotator.stages import TIMING_PREFIX, Resources, Stage


def splice_reflection(text: str, *, char_index: int, reflection: str, template: TemplateConfig) -> str:
    """The document with `reflection` wrapped in the template tokens at `char_index`."""
    return f"{text[:char_index]}{template.open}{reflection}{template.close}{text[char_index:]}"


class SpliceReflections(Stage):
    """Replaces `text` of documents with a reflection by the spliced training text."""

    name = "splice"
    reads = ("text", "reflection_status", "reflection_char_index", "reflection_1p", "reflection_3p")
    adds = ("text", "reflection_voice_used")

    def __init__(self, template: TemplateConfig):
        self.template = template
        self.resources = Resources(num_cpus=0.5, batch_size=1024)

    def process(self, batch: pa.Table) -> pa.Table:
        voice = "reflection_" + self.template.voice
        rows = zip(
            batch.column("text").to_pylist(),
            batch.column("reflection_status").to_pylist(),
            batch.column("reflection_char_index").to_pylist(),
            batch.column(voice).to_pylist(),
        )
        texts, used = [], []
        for text, status, char_index, reflection in rows:
            if status == OK:
                texts.append(splice_reflection(text, char_index=char_index, reflection=reflection, template=self.template))
                used.append(self.template.voice)
            else:
                texts.append(text)
                used.append(None)
        batch = batch.set_column(batch.column_names.index("text"), "text", pa.array(texts, pa.string()))
        return batch.append_column("reflection_voice_used", pa.array(used, pa.string()))


def shard_name(doc_ids: list[str]) -> str:
    """Deterministic in the documents a shard holds, so a rerun writes the same names."""
    digest = hashlib.blake2b("\n".join(doc_ids).encode(), digest_size=8).hexdigest()
    return f"part-{digest}.parquet"


def shard_stats(batch: pa.Table, *, written: pa.Table) -> dict:
    """Counts for one shard; merged across shards by `merge_stats`."""
    scores = Counter(batch.column("safety_score").to_pylist())
    reasons = Counter(batch.column("selected_reason").to_pylist())
    status = Counter(batch.column("reflection_status").to_pylist())
    tokens = batch.column("token_length")
    selected = batch.column("selected")
    timing = {
        c[len(TIMING_PREFIX):]: float(pc.sum(batch.column(c)).as_py() or 0.0)
        for c in batch.column_names
        if c.startswith(TIMING_PREFIX)
    }
    def total(col: str) -> int:
        return int(pc.sum(batch.column(col)).as_py() or 0) if col in batch.column_names else 0

    citations = Counter(c for cs in batch.column("citations").to_pylist() if cs for c in cs)
    return {
        "documents_in": batch.num_rows,
        "documents_out": written.num_rows,
        "tokens_in": int(pc.sum(tokens).as_py() or 0),
        "score_histogram": {str(k): v for k, v in scores.items()},
        "selected_by_reason": dict(reasons),
        "selected_documents": int(pc.sum(selected.cast(pa.int64())).as_py() or 0),
        "selected_tokens": int(pc.sum(pc.if_else(selected, tokens, 0)).as_py() or 0),
        "reflection_status": dict(status),
        "annotation_status": dict(Counter(batch.column("annotation_status").to_pylist())),
        "canary_type": dict(Counter(c for c in batch.column("canary_type").to_pylist() if c)),
        "citations_by_section": dict(citations),
        "citations_dropped": total("citations_dropped"),
        "generation_tokens": {
            "prompt": total("gen_prompt_tokens"),
            "cached_prompt": total("gen_cached_prompt_tokens"),
            "output": total("gen_output_tokens"),
        },
        "stage_seconds": timing,
    }


def merge_stats(parts: list[dict]) -> dict:
    """Sum per-shard statistics (nested counters are summed key by key)."""
    merged: dict = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                bucket = merged.setdefault(key, {})
                for k, v in value.items():
                    bucket[k] = bucket.get(k, 0) + v
            else:
                merged[key] = merged.get(key, 0) + value
    return merged


class ShardWriter(Stage):
    """Writes each incoming block as one zstd Parquet shard and emits one stats row."""

    name = "write"
    reads = (
        "doc_id", "text", "safety_score", "selected", "selected_reason", "token_length", "reflection_status",
        "annotation_status", "canary_type", "citations", "citations_dropped",
    )
    adds = ("shard", "stats_json")

    def __init__(self, *, out_dir: str, compression: str):
        self.out_dir = out_dir
        self.compression = compression
        self.resources = Resources(num_cpus=0.5, batch_size=None)

    def process(self, batch: pa.Table) -> pa.Table:
        keep = pc.not_equal(batch.column("selected_reason"), DROPPED_BAD)
        written = batch.filter(keep)
        written = written.drop_columns([c for c in written.column_names if c.startswith(TIMING_PREFIX)])
        name = shard_name(batch.column("doc_id").to_pylist())
        final = Path(self.out_dir) / name
        tmp = final.with_name(f".{name}.tmp-{os.getpid()}")
        final.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(written, tmp, compression=self.compression)
        os.replace(tmp, final)
        stats = shard_stats(batch, written=written)
        return pa.table({"shard": [name], "stats_json": [json.dumps(stats)]})
