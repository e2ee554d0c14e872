"""Writing a unit: the training text of each document (the run's first recipe placed as it says),
Parquet text shards in the published schema, and one training stream per recipe and placed field
(`recipes.stream_name`) in the chosen layout: `windows` (every document chosen for annotation in
its own window, the same windows in every stream, a sidecar row per window, the rest dense-packed
into `compact`), or `documents` (one sequence per document). Names depend on the unit alone
(`layout.py`); files are written under temporary names and renamed; plus the unit's statistics.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from annotator.core import layout, storage
from annotator.core.checkpoint import write_atomically, write_table
from annotator.config import OutputConfig
from annotator.output.megatron import IndexedDatasetWriter, token_dtype
from annotator.core.seeding import unit_hash
from annotator.generate.pause import clip_at_char
from annotator.method.prompt_packs import PromptPack
from annotator.method.recipes import Placed, Recipe
from annotator.score.selection import DROPPED_BAD
from annotator.core.stages import Resources, Stage
from annotator.output.tokenized import DensePacker, annotation_block, place, reflection_ids, render_citations, training_tokenizer, window
from annotator.core.statuses import OK

_TOKENIZE_SLICE = 512
# The published dataset's columns come first in every text shard, in its order.
PUBLISHED_COLUMNS = ("doc_id", "text", "token_length", "safety_score", "is_bad", "reflection_1p", "reflection_3p",
                     "reflection_position", "reflection_token_index", "canary_type")
SIDECAR_EXTRA = ("window", "reflection_status", "citations", "prompt_version", "source_file", "source_row",
                 "source_token_length", "clipped_tokens", "training_text")


def chosen_mask(table: pa.Table, *, generation_enabled: bool) -> list[bool]:
    """Documents chosen for annotation: selected, with generation on. They get the windows."""
    return [bool(s) and generation_enabled for s in table.column("selected").to_pylist()]


class TrainingText(Stage):
    """Builds `training_text` (the first stream's text placed into the document) and the content
    each document keeps: `token_length` (a document chosen for annotation keeps at most
    `content_tokens` in the windows layout, cut on a character boundary), `source_token_length`
    (the whole document) and `clipped_tokens`."""

    name = "splice"
    reads = ("text", "token_length", "selected")
    adds = ("training_text", "source_token_length", "clipped_tokens", "training_stream")

    def __init__(self, output: OutputConfig, *, content_tokens: int, sections: list[str], annotation_tokens: int,
                 streams: list[Placed], generation_enabled: bool = True):
        self.output = output
        self.generation_enabled = generation_enabled
        self.content_tokens = content_tokens
        self.sections = list(sections)
        self.annotation_tokens = annotation_tokens
        self.streams = streams
        self.resources = Resources(num_cpus=0.5, batch_size=1024)
        first = streams[0] if streams else None
        if first is not None:
            self.reads = (*self.reads, first.recipe.column("status"), first.recipe.column(first.field),
                          *((first.recipe.column("position"),) if first.recipe.place.at_point else ()))

    def inserted_text(self, placed: Placed, row: dict, *, tok) -> str | None:
        """The text the stream inserts for `row`, as it reads in training text (template tokens and
        charter tokens as their strings), or None."""
        r = placed.recipe
        if row.get(r.column("status")) != OK:
            return None
        value = row[r.column(placed.field)]
        tpl = self.output.template
        if r.place.text == "block":
            _, block = annotation_block(tok, value, output=self.output, max_tokens=self.annotation_tokens)
            return block or None
        if r.place.replaces:
            return value
        if tpl.charter_tokens:
            value = render_citations(value, frozenset(self.sections))
        return f"{tpl.open}{value}{tpl.close}"

    def place_text(self, placed: Placed, row: dict, *, tok) -> str:
        text = row["text"]
        inserted = self.inserted_text(placed, row, tok=tok)
        if inserted is None:
            return text
        place_ = placed.recipe.place
        if place_.at_point:
            pos = row[placed.recipe.column("position")]
            return text[:pos] + inserted + text[pos:]
        if place_.replaces:
            return inserted
        return inserted + text

    def process(self, batch: pa.Table) -> pa.Table:
        tok = training_tokenizer(self.output, self.sections)
        rows = batch.to_pylist()
        chosen = chosen_mask(batch, generation_enabled=self.generation_enabled)
        texts, kept, sources, clipped, used = [], [], [], [], []
        first = self.streams[0] if self.streams else None
        for row, pick in zip(rows, chosen):
            n = row["token_length"]
            keep = n
            if pick and self.output.layout == "windows" and n > self.content_tokens:
                keep = clip_at_char(tok.offsets(row["text"]), self.content_tokens)
            placed_here = first is not None and pick and row.get(first.recipe.column("status")) == OK
            texts.append(self.place_text(first, row, tok=tok) if placed_here else row["text"])
            kept.append(keep)
            sources.append(n)
            clipped.append(n - keep)
            used.append(first.stream if placed_here else None)
        batch = batch.set_column(batch.column_names.index("token_length"), "token_length", pa.array(kept, pa.int32()))
        return (batch.append_column("training_text", pa.array(texts, pa.string()))
                .append_column("source_token_length", pa.array(sources, pa.int32()))
                .append_column("clipped_tokens", pa.array(clipped, pa.int32()))
                .append_column("training_stream", pa.array(used, pa.string())))


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

    def __init__(self, *, out_dir: str, output: OutputConfig, sections: list[str], annotation_tokens: int, streams: list[Placed],
                 generation_enabled: bool = True):
        self.out = storage.location(out_dir)
        self.generation_enabled = generation_enabled
        self.output = output
        self.sections = list(sections)
        self.valid = frozenset(sections)
        self.annotation_tokens = annotation_tokens
        self.streams = streams
        self.tok = training_tokenizer(output, self.sections)
        self.dtype = token_dtype(len(self.tok))
        tpl = output.template
        self.open_id, self.close_id = self.tok.added_ids[tpl.open], self.tok.added_ids[tpl.close]
        self.eos_id = self.tok.eos_id
        self.pad_id = output.pad_token_id if output.pad_token_id is not None else self.eos_id
        self.size = output.seq_length + 1

    def inserted(self, placed: Placed, row: dict) -> list[int] | None:
        """The ids the stream places for `row` (its template ids included), or None."""
        r = placed.recipe
        if row.get(r.column("status")) != OK:
            return None
        value = row[r.column(placed.field)]
        if r.place.text == "block":
            ids, _ = annotation_block(self.tok, value, output=self.output, max_tokens=self.annotation_tokens)
            return ids or None
        if r.place.replaces:
            return self.tok.encode(value)[: self.output.seq_length]
        return reflection_ids(self.tok, value, open_id=self.open_id, close_id=self.close_id,
                              charter=self.output.template.charter_tokens, valid=self.valid)

    def content(self, placed: Placed, row: dict, *, doc: list[int], keep: int):
        r = placed.recipe
        point = row.get(r.column("token_index")) if r.place.at_point else None
        if r.place.point == "end" and point is None:
            point = keep
        return place(doc, keep=keep, placement=r.place, point=point, inserted=self.inserted(placed, row))

    def write_documents(self, table: pa.Table, name: str) -> dict:
        """documents layout: per stream, one sequence per document (EOS appended), aligned with
        text shard `name`."""
        sizes = {}
        chosen = chosen_mask(table, generation_enabled=self.generation_enabled)
        for placed in self.streams:
            prefix = layout.stream_prefix(self.out, placed.stream, name=name)
            storage.mkdirs(prefix.parent)
            tokens, masks = IndexedDatasetWriter(prefix, dtype=self.dtype), IndexedDatasetWriter(layout.mask_prefix(prefix), dtype=np.uint8)
            total = 0
            for start in range(0, table.num_rows, _TOKENIZE_SLICE):
                piece = table.slice(start, _TOKENIZE_SLICE)
                encoded = self.tok.encode_batch(piece.column("text").to_pylist())
                for row, doc, pick in zip(piece.to_pylist(), encoded, chosen[start:start + _TOKENIZE_SLICE]):
                    assembled = self.content(placed, row, doc=doc, keep=len(doc)) if pick else place(doc, keep=len(doc), placement=None, point=None, inserted=None)
                    ids = np.asarray([*assembled.ids, self.eos_id], dtype=np.int64)
                    tokens.add_document(ids)
                    masks.add_document(assembled.mask(len(ids)))
                    total += len(ids)
            masks.close()
            tokens.close()  # the token file appears last: its presence means both are complete
            sizes[placed.stream] = {"files": 1, "sequences": table.num_rows, "tokens": total, "padding": 0}
        return sizes

    def write_windows(self, table: pa.Table, unit: str, *, compression: str) -> dict:
        """windows layout: the unit's chosen documents one per window in every stream, with a
        sidecar row each; all others dense-packed into the compact stream (and, for a recipe that
        applies to every document, into that recipe's own compact stream)."""
        pick = pa.array(chosen_mask(table, generation_enabled=self.generation_enabled), pa.bool_())
        annotated, plain = table.filter(pick), table.filter(pc.invert(pick))
        sizes: dict[str, dict] = {}
        tails: list[list[int]] = []
        if annotated.num_rows:
            sizes.update(self._annotated(annotated, unit, tails=tails, compression=compression))
        if plain.num_rows or tails:
            sizes[layout.COMPACT] = self._compact(plain, unit, tails=tails, placed=None)
            for placed in self.streams:
                if placed.recipe.applies_to == "all" and plain.num_rows:
                    name = f"{placed.stream}-{layout.COMPACT}"
                    sizes[name] = self._compact(plain, unit, tails=tails, placed=placed, stream=name)
        return sizes

    def _annotated(self, table: pa.Table, unit: str, *, tails: list | None, compression: str) -> dict:
        sizes, lengths = self.window_streams(table, unit, tails=tails)
        self._sidecar(table, unit, lengths=lengths, compression=compression)
        return sizes

    def write_added(self, table: pa.Table, unit: str, *, compression: str) -> dict:
        """For recipes added to a finished run: their streams over the unit's windows (`table` is
        its sidecar, without `window`, with the new recipes' columns), and the sidecar rewritten
        with those columns; every other file stays as it is."""
        return self._annotated(table, unit, tails=None, compression=compression)

    def window_streams(self, table: pa.Table, unit: str, *, tails: list | None) -> tuple[dict, dict[str, list[int]]]:
        """Every stream's windows for the chosen documents of `table`; clipped tails go to `tails`
        (None: not collected)."""
        writers = {}
        for placed in self.streams:
            prefix = layout.stream_prefix(self.out, placed.stream, name=unit)
            storage.mkdirs(prefix.parent)
            writers[placed.stream] = (placed, prefix, IndexedDatasetWriter(prefix, dtype=self.dtype),
                                      IndexedDatasetWriter(layout.mask_prefix(prefix), dtype=np.uint8), [])
        rows = table.to_pylist()
        for row in rows:
            doc = self.tok.encode(row["text"])
            keep = row["token_length"]
            if tails is not None and self.output.clipped_tail == "compact" and keep < len(doc):
                tails.append(doc[keep:])
            for placed, _, ids_w, mask_w, lengths in writers.values():
                assembled = self.content(placed, row, doc=doc, keep=keep)
                ids, mask = window(assembled, size=self.size, eos_id=self.eos_id, pad_id=self.pad_id)
                ids_w.add_document(ids)
                mask_w.add_document(mask)
                lengths.append(len(assembled.ids))
        sizes = {}
        for name, (_, prefix, ids_w, mask_w, lengths) in writers.items():
            arr = np.asarray(lengths, dtype=np.int32)
            write_atomically(layout.token_lengths_path(prefix), lambda tmp, a=arr: np.save(open(tmp, "wb"), a))
            mask_w.close()
            ids_w.close()
            sizes[name] = {"files": 1, "sequences": len(rows), "tokens": int(arr.sum()) + len(rows),
                           "padding": int(len(rows) * self.size - arr.sum() - len(rows))}
        return sizes, {name: w[4] for name, w in writers.items()}

    def _sidecar(self, table: pa.Table, unit: str, *, lengths: dict[str, list[int]], compression: str) -> None:
        side = table.add_column(0, "window", pa.array(np.arange(table.num_rows), pa.int32()))
        for name, values in lengths.items():
            side = side.append_column(f"window_tokens_{name}", pa.array(values, pa.int32()))
        first = [c for c in (*PUBLISHED_COLUMNS, *SIDECAR_EXTRA) if c in side.column_names]
        side = side.select(first + [c for c in side.column_names if c not in first])
        write_table(layout.sidecar_path(self.out, unit), side, compression=compression)

    def _compact(self, table: pa.Table, unit: str, *, tails: list[list[int]], placed: Placed | None, stream: str = layout.COMPACT) -> dict:
        prefix = layout.stream_prefix(self.out, stream, name=unit)
        storage.mkdirs(prefix.parent)
        writer = IndexedDatasetWriter(prefix, dtype=self.dtype)
        packer = DensePacker(size=self.size, eos_id=self.eos_id, pad_id=self.pad_id)
        windows = 0

        def emit(ws):
            nonlocal windows
            for w in ws:
                writer.add_document(w)
                windows += 1

        for start in range(0, table.num_rows, _TOKENIZE_SLICE):
            piece = table.slice(start, _TOKENIZE_SLICE)
            encoded = self.tok.encode_batch(piece.column("text").to_pylist())
            for row, doc in zip(piece.to_pylist() if placed is not None else [None] * piece.num_rows, encoded):
                ids = self.content(placed, row, doc=doc, keep=len(doc)).ids if placed is not None else doc
                emit(packer.add(ids))
        for tail in tails:
            emit(packer.add(tail))
        emit(packer.finish())
        writer.close()
        return {"files": 1, "sequences": windows, "tokens": packer.tokens, "padding": packer.padding}


class ShardWriter(Stage):
    """Writes one unit: text shards of at most `rows_per_shard` rows (rows in a seeded interleaved
    order) and, when `output.tokenized`, its token streams; emits one row with the shard names and
    the unit's statistics."""

    name = "write"
    reads = ("doc_id", "text", "training_text", "safety_score", "selected", "selected_reason", "token_length", "source_token_length")
    adds = ("shard", "stats_json")

    def __init__(self, *, out_dir: str, output: OutputConfig, sections: list[str], annotation_tokens: int, streams: list[Placed],
                 recipes: list[tuple[Recipe, PromptPack]], generation_enabled: bool = True):
        self.out_dir = out_dir
        self.generation_enabled = generation_enabled
        self.output = output
        self.sections = list(sections)
        self.annotation_tokens = annotation_tokens
        self.streams = streams
        self.recipes = recipes
        self.resources = Resources(num_cpus=0.5, batch_size=None)

    def process(self, batch: pa.Table) -> pa.Table:
        from annotator.output.stats import shard_stats

        written = batch.filter(pc.not_equal(batch.column("selected_reason"), DROPPED_BAD))
        written = shard_columns(written)
        if not batch.num_rows:  # every row of the unit was rejected: no shard, no stream
            return pa.table({"shard": [json.dumps([])], "stats_json": [json.dumps({**shard_stats(batch, written=written), "streams": {}})]})
        written = written.take(interleave_order(written.column("doc_id").to_pylist(), self.output.shuffle_seed))
        stem = batch.column("_unit")[0].as_py()  # one work unit per call: names follow the unit
        out = storage.location(self.out_dir)
        streams: dict[str, dict] = {}
        names = []
        writer = StreamWriter(out_dir=self.out_dir, output=self.output, sections=self.sections, annotation_tokens=self.annotation_tokens,
                              streams=self.streams, generation_enabled=self.generation_enabled) if self.output.tokenized else None
        for part, start in enumerate(range(0, written.num_rows, self.output.rows_per_shard)):
            piece = written.slice(start, self.output.rows_per_shard)
            name = f"{stem}-{part:04d}"
            write_table(layout.text_shard(out, name), piece, compression=self.output.compression)
            if writer is not None and self.output.layout == "documents":
                for k, v in writer.write_documents(piece, name).items():
                    streams[k] = {f: streams.get(k, {}).get(f, 0) + v[f] for f in v}
            names.append(name)
        if writer is not None and self.output.layout == "windows" and written.num_rows:
            streams = writer.write_windows(written, stem, compression=self.output.compression)
        recipes = [(r, p, [s.field for s in self.streams if s.recipe.name == r.name]) for r, p in self.recipes]
        stats = shard_stats(batch, written=written, tokenizer=training_tokenizer(self.output, self.sections), recipes=recipes)
        stats["streams"] = streams
        return pa.table({"shard": [json.dumps(names)], "stats_json": [json.dumps(stats)]})
