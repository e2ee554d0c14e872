"""Writing a unit: the training text of each document (its reflection spliced at the pause point,
its annotation block in front), Parquet text shards in the published schema, and the token streams
of the chosen layout (`windows`: one annotated stream per voice, its sidecar, and a dense-packed
compact stream; `documents`: one sequence per document), all under names that depend on the unit
alone (`layout.py`), written under temporary names and renamed; plus the unit's statistics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from annotator import layout
from annotator.checkpoint import write_atomically, write_table
from annotator.config import OutputConfig
from annotator.megatron import IndexedDatasetWriter, token_dtype
from annotator.pause import clip_at_char, unit_hash
from annotator.replies import OK
from annotator.selection import DROPPED_BAD
from annotator.stages import Resources, Stage
from annotator.stats import shard_stats
from annotator.tokenized import (
    DensePacker, annotation_block, assemble, reflection_ids, render_citations, training_tokenizer, window,
)

_TOKENIZE_SLICE = 512
# The published dataset's columns come first in every text shard, in its order.
PUBLISHED_COLUMNS = ("doc_id", "text", "token_length", "safety_score", "is_bad", "reflection_1p", "reflection_3p",
                     "reflection_position", "reflection_token_index", "canary_type")
SIDECAR_EXTRA = ("window", "reflection_status", "citations", "prompt_version", "source_file", "source_row",
                 "source_token_length", "clipped_tokens", "training_text")
# Statuses of documents that were chosen for a reflection (they go to the annotated windows).
NOT_CHOSEN = ("not_selected", "generation_disabled")


def chosen(status: str | None) -> bool:
    return status is not None and status not in NOT_CHOSEN


def splice_reflection(text: str, *, char_index: int, reflection: str, open: str, close: str) -> str:
    """The document with `reflection` wrapped in the template tokens at `char_index`."""
    return f"{text[:char_index]}{open}{reflection}{close}{text[char_index:]}"


class SpliceReflections(Stage):
    """Builds `training_text` (the annotation block in front, the first voice's reflection spliced
    at its pause point), and the content each document keeps: `token_length` (an annotated
    document in the windows layout keeps at most `content_tokens`, cut on a character boundary),
    `source_token_length` (the whole document) and `clipped_tokens`."""

    name = "splice"
    reads = ("text", "token_length", "reflection_status", "reflection_position", "reflection_1p", "reflection_3p", "annotations")
    adds = ("training_text", "source_token_length", "clipped_tokens", "reflection_voice_used")

    def __init__(self, output: OutputConfig, *, content_tokens: int, sections: list[str], annotation_tokens: int):
        self.output = output
        self.content_tokens = content_tokens
        self.sections = list(sections)
        self.annotation_tokens = annotation_tokens
        self.resources = Resources(num_cpus=0.5, batch_size=1024)

    def process(self, batch: pa.Table) -> pa.Table:
        tok = training_tokenizer(self.output, self.sections)
        tpl, voice = self.output.template, self.output.voices[0]
        valid = frozenset(self.sections)
        rows = zip(batch.column("text").to_pylist(), batch.column("token_length").to_pylist(),
                   batch.column("reflection_status").to_pylist(), batch.column("reflection_position").to_pylist(),
                   batch.column(f"reflection_{voice}").to_pylist(), batch.column("annotations").to_pylist())
        texts, kept, sources, clipped, used = [], [], [], [], []
        for text, n, status, position, reflection, tags in rows:
            _, block = annotation_block(tok, tags, output=self.output, max_tokens=self.annotation_tokens)
            keep = n
            if chosen(status) and self.output.layout == "windows" and n > self.content_tokens:
                keep = clip_at_char(tok.offsets(text), self.content_tokens)
            if status == OK:
                if tpl.charter_tokens:
                    reflection = render_citations(reflection, valid)
                text = splice_reflection(text, char_index=position, reflection=reflection, open=tpl.open, close=tpl.close)
            texts.append(block + text)
            kept.append(keep)
            sources.append(n)
            clipped.append(n - keep)
            used.append(voice if status == OK else None)
        batch = batch.set_column(batch.column_names.index("token_length"), "token_length", pa.array(kept, pa.int32()))
        return (batch.append_column("training_text", pa.array(texts, pa.string()))
                .append_column("source_token_length", pa.array(sources, pa.int32()))
                .append_column("clipped_tokens", pa.array(clipped, pa.int32()))
                .append_column("reflection_voice_used", pa.array(used, pa.string())))


def interleave_order(doc_ids: list[str], seed: int) -> np.ndarray:
    """A seeded order of the rows: annotated and plain documents mix evenly within every shard."""
    return np.argsort([unit_hash("order", seed, d) for d in doc_ids], kind="stable")


def shard_columns(table: pa.Table) -> pa.Table:
    """The published columns first (in their order), then ours; internal ones (`_...`) dropped."""
    names = [c for c in table.column_names if not c.startswith("_")]
    ordered = [c for c in PUBLISHED_COLUMNS if c in names] + [c for c in names if c not in PUBLISHED_COLUMNS]
    return table.select(ordered)


class StreamWriter:
    """The token streams of one unit, in the configured layout; returns their sizes for stats."""

    def __init__(self, *, out_dir: str, output: OutputConfig, sections: list[str], annotation_tokens: int):
        self.out = Path(out_dir)
        self.output = output
        self.sections = list(sections)
        self.valid = frozenset(sections)
        self.annotation_tokens = annotation_tokens
        self.tok = training_tokenizer(output, self.sections)
        self.dtype = token_dtype(len(self.tok))
        tpl = output.template
        self.open_id, self.close_id = self.tok.added_ids[tpl.open], self.tok.added_ids[tpl.close]
        self.eos_id = self.tok.eos_id
        self.pad_id = output.pad_token_id if output.pad_token_id is not None else self.eos_id
        self.size = output.seq_length + 1

    def _reflection(self, text: str | None) -> list[int] | None:
        if text is None:
            return None
        return reflection_ids(self.tok, text, open_id=self.open_id, close_id=self.close_id,
                              charter=self.output.template.charter_tokens, valid=self.valid)

    def _parts(self, row: dict) -> tuple[list[int], list[int]]:
        block, _ = annotation_block(self.tok, row.get("annotations"), output=self.output, max_tokens=self.annotation_tokens)
        return block, self.tok.encode(row["text"])

    def write_documents(self, table: pa.Table, name: str) -> dict:
        """documents layout: one sequence per document (EOS appended), aligned with text shard `name`."""
        prefix = layout.stream_prefix(self.out, layout.DOCUMENTS, name)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        tokens, masks = IndexedDatasetWriter(prefix, dtype=self.dtype), IndexedDatasetWriter(layout.mask_prefix(prefix), dtype=np.uint8)
        voice = self.output.voices[0]
        total = 0
        for start in range(0, table.num_rows, _TOKENIZE_SLICE):
            for row in table.slice(start, _TOKENIZE_SLICE).to_pylist():
                block, doc = self._parts(row)
                ok = row["reflection_status"] == OK
                doc_tokens = assemble(block=block, doc=doc, keep=len(doc), pause=row["reflection_token_index"] if ok else None,
                                      reflection=self._reflection(row[f"reflection_{voice}"]) if ok else None)
                ids = np.asarray([*doc_tokens.ids, self.eos_id], dtype=np.int64)
                tokens.add_document(ids)
                masks.add_document(doc_tokens.mask(len(ids)))
                total += len(ids)
        masks.close()
        tokens.close()  # the token file appears last: its presence means both are complete
        return {layout.DOCUMENTS: {"files": 1, "sequences": table.num_rows, "tokens": total, "padding": 0}}

    def write_windows(self, table: pa.Table, unit: str, *, compression: str) -> dict:
        """windows layout: the unit's annotated documents (those chosen for a reflection) one per
        window, per voice, with a sidecar row each; all others dense-packed into the compact stream."""
        status = table.column("reflection_status").to_pylist()
        annotated = table.filter(pa.array([chosen(s) for s in status], pa.bool_()))
        plain = table.filter(pa.array([not chosen(s) for s in status], pa.bool_()))
        sizes: dict[str, dict] = {}
        tails: list[list[int]] = []
        if annotated.num_rows:
            sizes.update(self._annotated(annotated, unit, tails, compression=compression))
        if plain.num_rows or tails:
            sizes[layout.COMPACT] = self._compact(plain, unit, tails)
        return sizes

    def _annotated(self, table: pa.Table, unit: str, tails: list, *, compression: str) -> dict:
        voices = self.output.voices
        writers = {}
        for voice in voices:
            prefix = layout.stream_prefix(self.out, layout.annotated_stream(voice), unit)
            prefix.parent.mkdir(parents=True, exist_ok=True)
            writers[voice] = (prefix, IndexedDatasetWriter(prefix, dtype=self.dtype),
                              IndexedDatasetWriter(layout.mask_prefix(prefix), dtype=np.uint8), [])
        rows = table.to_pylist()
        for row in rows:
            block, doc = self._parts(row)
            keep = row["token_length"]
            ok = row["reflection_status"] == OK
            if self.output.clipped_tail == "compact" and keep < len(doc):
                tails.append(doc[keep:])
            for voice in voices:
                _, ids_w, mask_w, lengths = writers[voice]
                assembled = assemble(block=block, doc=doc, keep=keep, pause=row["reflection_token_index"] if ok else None,
                                     reflection=self._reflection(row[f"reflection_{voice}"]) if ok else None)
                ids, mask = window(assembled, size=self.size, eos_id=self.eos_id, pad_id=self.pad_id)
                ids_w.add_document(ids)
                mask_w.add_document(mask)
                lengths.append(len(assembled.ids))
        sizes = {}
        for voice, (prefix, ids_w, mask_w, lengths) in writers.items():
            arr = np.asarray(lengths, dtype=np.int32)
            write_atomically(layout.token_lengths_path(prefix), lambda tmp, a=arr: np.save(open(tmp, "wb"), a))
            mask_w.close()
            ids_w.close()
            sizes[layout.annotated_stream(voice)] = {"files": 1, "sequences": len(rows), "tokens": int(arr.sum()) + len(rows),
                                                     "padding": int(len(rows) * self.size - arr.sum() - len(rows))}
        self._sidecar(table, unit, {v: w[3] for v, w in writers.items()}, compression=compression)
        return sizes

    def _sidecar(self, table: pa.Table, unit: str, lengths: dict[str, list[int]], *, compression: str) -> None:
        side = table.select([c for c in (*PUBLISHED_COLUMNS, *SIDECAR_EXTRA) if c in table.column_names])
        side = side.add_column(0, "window", pa.array(np.arange(table.num_rows), pa.int32()))
        for voice, values in lengths.items():
            side = side.append_column(f"window_tokens_{voice}", pa.array(values, pa.int32()))
        order = [c for c in (*PUBLISHED_COLUMNS, *SIDECAR_EXTRA) if c in side.column_names]
        side = side.select(order + [c for c in side.column_names if c not in order])
        write_table(layout.sidecar_path(self.out, unit), side, compression=compression)

    def _compact(self, table: pa.Table, unit: str, tails: list[list[int]]) -> dict:
        prefix = layout.stream_prefix(self.out, layout.COMPACT, unit)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        writer = IndexedDatasetWriter(prefix, dtype=self.dtype)
        packer = DensePacker(size=self.size, eos_id=self.eos_id, pad_id=self.pad_id)
        windows = 0
        texts, tags = table.column("text"), table.column("annotations")
        for start in range(0, table.num_rows, _TOKENIZE_SLICE):
            piece_tags = tags.slice(start, _TOKENIZE_SLICE).to_pylist()
            encoded = self.tok.encode_batch(texts.slice(start, _TOKENIZE_SLICE).to_pylist())
            for doc, t in zip(encoded, piece_tags):
                block, _ = annotation_block(self.tok, t, output=self.output, max_tokens=self.annotation_tokens)
                for w in packer.add([*block, *doc]):
                    writer.add_document(w)
                    windows += 1
        for tail in tails:
            for w in packer.add(tail):
                writer.add_document(w)
                windows += 1
        for w in packer.finish():
            writer.add_document(w)
            windows += 1
        writer.close()
        return {"files": 1, "sequences": windows, "tokens": packer.tokens, "padding": packer.padding}


class ShardWriter(Stage):
    """Writes one unit: text shards of at most `rows_per_shard` rows (rows in a seeded interleaved
    order) and, when `output.tokenized`, its token streams; emits one row with the shard names and
    the unit's statistics."""

    name = "write"
    reads = (
        "doc_id", "text", "training_text", "safety_score", "selected", "selected_reason", "token_length", "source_token_length",
        "reflection_status", "annotation_status", "canary_type", "citations", "citations_dropped", "annotations",
    )
    adds = ("shard", "stats_json")

    def __init__(self, *, out_dir: str, output: OutputConfig, sections: list[str], annotation_tokens: int):
        self.out_dir = out_dir
        self.output = output
        self.sections = list(sections)
        self.annotation_tokens = annotation_tokens
        self.resources = Resources(num_cpus=0.5, batch_size=None)

    def process(self, batch: pa.Table) -> pa.Table:
        written = batch.filter(pc.not_equal(batch.column("selected_reason"), DROPPED_BAD))
        written = shard_columns(written)
        written = written.take(interleave_order(written.column("doc_id").to_pylist(), self.output.shuffle_seed))
        if not batch.num_rows:  # every row of the unit was rejected: no shard, no stream
            return pa.table({"shard": [json.dumps([])], "stats_json": [json.dumps({**shard_stats(batch, written=written), "streams": {}})]})
        stem = batch.column("_unit")[0].as_py()  # one work unit per call: names follow the unit
        out = Path(self.out_dir)
        streams: dict[str, dict] = {}
        names = []
        streams_writer = StreamWriter(out_dir=self.out_dir, output=self.output, sections=self.sections,
                                      annotation_tokens=self.annotation_tokens) if self.output.tokenized else None
        for part, start in enumerate(range(0, written.num_rows, self.output.rows_per_shard)):
            piece = written.slice(start, self.output.rows_per_shard)
            name = f"{stem}-{part:04d}"
            write_table(layout.text_shard(out, name), piece, compression=self.output.compression)
            if streams_writer is not None and self.output.layout == "documents":
                for k, v in streams_writer.write_documents(piece, name).items():
                    streams[k] = {f: streams.get(k, {}).get(f, 0) + v[f] for f in v}
            names.append(name)
        if streams_writer is not None and self.output.layout == "windows" and written.num_rows:
            streams = streams_writer.write_windows(written, stem, compression=self.output.compression)
        stats = shard_stats(batch, written=written, tokenizer=training_tokenizer(self.output, self.sections))
        stats["streams"] = streams
        return pa.table({"shard": [json.dumps(names)], "stats_json": [json.dumps(stats)]})
