"""Writing: the training text (reflection spliced between template tokens, annotations in front),
Parquet text shards and Megatron token shards under deterministic names (temporary name, then
rename), and per-shard statistics that the driver merges once at the end.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from annotator.checkpoint import write_table
from annotator.config import OutputConfig, TemplateConfig
from annotator.generation import OK
from annotator.reflection_prompt import CITATION, constitution_sections, unit_hash
from annotator.selection import DROPPED_BAD
from annotator.stats import merge_stats, shard_stats  # noqa: F401 - merge_stats is re-exported for callers
from annotator.stages import TIMING_PREFIX, Resources, Stage
from annotator.tokenized import charter_token, extend_tokenizer, special_tokens, tokenize_training_texts
from annotator.megatron import IndexedDatasetWriter, token_dtype

TEXT_DIR, TOKENS_DIR = "shards", "tokenized"
_TOKENIZE_SLICE = 512
MASK_SUFFIX = "_reflection_mask"


def splice_reflection(text: str, *, char_index: int, reflection: str, template: TemplateConfig) -> str:
    """The document with `reflection` wrapped in the template tokens at `char_index`."""
    return f"{text[:char_index]}{template.open}{reflection}{template.close}{text[char_index:]}"


def render_citations(reflection: str) -> str:
    """[X.Y] citations of real constitution sections become <charter_X.Y> special tokens."""
    valid = constitution_sections()
    return CITATION.sub(lambda m: charter_token(m.group(1)) if m.group(1) in valid else m.group(0), reflection)


def annotation_block(tags: list[str], template: TemplateConfig) -> str:
    return f"{template.annotation_open}{chr(10).join(tags)}{template.annotation_close}\n"


class SpliceReflections(Stage):
    """Builds the training `text`: annotations block in front (where present), the reflection
    spliced at its pause point; keeps the original as `source_text`."""

    name = "splice"
    reads = ("text", "reflection_status", "reflection_char_index", "reflection_1p", "reflection_3p", "annotations")
    adds = ("text", "source_text", "reflection_voice_used")

    def __init__(self, template: TemplateConfig):
        self.template = template
        self.resources = Resources(num_cpus=0.5, batch_size=1024)

    def training_text(self, text: str, *, status: str, char_index: int | None, reflection: str | None, tags: list[str] | None) -> str:
        if status == OK:
            if self.template.charter_tokens:
                reflection = render_citations(reflection)
            text = splice_reflection(text, char_index=char_index, reflection=reflection, template=self.template)
        if tags:
            text = annotation_block(tags, self.template) + text
        return text

    def process(self, batch: pa.Table) -> pa.Table:
        voice = "reflection_" + self.template.voice
        source = batch.column("text")
        rows = zip(
            source.to_pylist(),
            batch.column("reflection_status").to_pylist(),
            batch.column("reflection_char_index").to_pylist(),
            batch.column(voice).to_pylist(),
            batch.column("annotations").to_pylist(),
        )
        texts, used = [], []
        for text, status, char_index, reflection, tags in rows:
            texts.append(self.training_text(text, status=status, char_index=char_index, reflection=reflection, tags=tags))
            used.append(self.template.voice if status == OK else None)
        batch = batch.set_column(batch.column_names.index("text"), "text", pa.array(texts, pa.string()))
        return batch.append_column("source_text", source).append_column("reflection_voice_used", pa.array(used, pa.string()))


def shard_stem(source_file: str | None, doc_ids: list[str]) -> str:
    """Deterministic in the input shard and the documents it holds, so a rerun writes the same names."""
    digest = hashlib.blake2b("\n".join(doc_ids).encode(), digest_size=6).hexdigest()
    base = Path(source_file).name.split(".")[0] if source_file else "part"
    return f"{base}-{digest}"


def interleave_order(doc_ids: list[str], seed: int) -> np.ndarray:
    """A seeded order of the rows: annotated and plain documents mix evenly within every shard."""
    return np.argsort([unit_hash("order", seed, d) for d in doc_ids], kind="stable")


class ShardWriter(Stage):
    """Writes each incoming block as text shards (and token shards) of at most `rows_per_shard`
    rows, rows in a seeded interleaved order, and emits one stats row per block."""

    name = "write"
    reads = (
        "doc_id", "text", "safety_score", "selected", "selected_reason", "token_length", "reflection_status",
        "annotation_status", "canary_type", "citations", "citations_dropped",
    )
    adds = ("shard", "stats_json")

    def __init__(self, *, out_dir: str, output: OutputConfig, tokenizer: str):
        self.out_dir = out_dir
        self.output = output
        self.tokenizer_spec = tokenizer
        self.resources = Resources(num_cpus=0.5, batch_size=None)

    def setup(self) -> None:
        if self.output.tokenized:
            self._tokenizer, self._special = load_extended_tokenizer(self.tokenizer_spec, self.output)
            self._dtype = token_dtype(len(self._tokenizer))

    def _write_tokens(self, table: pa.Table, stem: str) -> None:
        tpl = self.output.template
        tokens = IndexedDatasetWriter(Path(self.out_dir) / TOKENS_DIR / stem, dtype=self._dtype)
        masks = IndexedDatasetWriter(Path(self.out_dir) / TOKENS_DIR / f"{stem}{MASK_SUFFIX}", dtype=np.uint8)
        texts = table.column("text")
        # In slices: token ids as Python lists cost ~36 bytes a token, too much for a whole unit at once.
        for start in range(0, len(texts), _TOKENIZE_SLICE):
            for ids, mask in tokenize_training_texts(self._tokenizer, texts.slice(start, _TOKENIZE_SLICE).to_pylist(),
                                                     open_id=self._special[tpl.open], close_id=self._special[tpl.close],
                                                     eod_id=self._tokenizer.eos_token_id):
                tokens.add_document(ids)
                masks.add_document(mask)
        masks.close()
        tokens.close()  # the token shard appears last: its presence means both are complete

    def process(self, batch: pa.Table) -> pa.Table:
        written = batch.filter(pc.not_equal(batch.column("selected_reason"), DROPPED_BAD))
        # Internal columns (`_unit`, timings, failed replies) are not part of the shard schema.
        written = written.drop_columns([c for c in written.column_names if c.startswith("_")])
        written = written.take(interleave_order(written.column("doc_id").to_pylist(), self.output.shuffle_seed))
        if "_unit" in batch.column_names and batch.num_rows:
            stem = batch.column("_unit")[0].as_py()  # one work unit per call: names follow the unit
        else:
            source = written.column("source_file")[0].as_py() if "source_file" in written.column_names and written.num_rows else None
            stem = shard_stem(source, batch.column("doc_id").to_pylist())
        for d in (TEXT_DIR, TOKENS_DIR) if self.output.tokenized else (TEXT_DIR,):
            (Path(self.out_dir) / d).mkdir(parents=True, exist_ok=True)
        names = []
        for part, start in enumerate(range(0, max(1, written.num_rows), self.output.rows_per_shard)):
            piece = written.slice(start, self.output.rows_per_shard)
            name = f"{stem}-{part:04d}"
            write_table(Path(self.out_dir) / TEXT_DIR / f"{name}.parquet", piece, compression=self.output.compression)
            if self.output.tokenized:
                self._write_tokens(piece, name)
            names.append(name)
        return pa.table({"shard": [json.dumps(names)], "stats_json": [json.dumps(shard_stats(batch, written=written, tokenizer=self.tokenizer_spec))]})


def load_extended_tokenizer(spec: str, output: OutputConfig) -> tuple[object, dict[str, int]]:
    """The target tokenizer with this output's special tokens added, and their ids."""
    from annotator.tokens import load_tokenizer

    tokenizer = load_tokenizer(spec)
    return tokenizer, extend_tokenizer(tokenizer, output_special_tokens(output))


def output_special_tokens(output: OutputConfig) -> list[str]:
    tpl = output.template
    return special_tokens(reflection_open=tpl.open, reflection_close=tpl.close, annotation_open=tpl.annotation_open,
                          annotation_close=tpl.annotation_close, charter_tokens=tpl.charter_tokens)
