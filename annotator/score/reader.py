"""Reading the corpus: Parquet work units (see `units.py`) from local paths, globs or fsspec URLs.

Every row leaves here with a string `doc_id`, a string `text`, where it came from
(`source_file`, `source_row`) and, for a document that cannot be used, its `reject_reason`.
"""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from annotator.config import InputConfig
from annotator.core.ray_adapter import items_dataset
from annotator.core.stages import Resources, UnitStage
from annotator.core.units import Unit, open_parquet, unit_json


class InputError(ValueError):
    """The input as a whole cannot be used."""


def expand_paths(paths: list[str]) -> list[str]:
    """Input files, in a stable order: globs expanded, directories listed recursively for
    `*.parquet`; the same for fsspec URLs. A pattern or directory that yields nothing is an error."""
    out: list[str] = []
    for p in paths:
        if "://" in p:
            matches = _expand_url(p)
        elif any(ch in p for ch in "*?["):
            matches = sorted(glob.glob(p, recursive=True))
        elif Path(p).is_dir():
            matches = sorted(str(f) for f in Path(p).rglob("*.parquet") if not f.name.startswith((".", "_")))
        elif Path(p).exists():
            matches = [p]
        else:
            raise InputError(f"input.paths: {p!r} does not exist")
        if not matches:
            raise InputError(f"input.paths: {p!r} matches no Parquet file")
        out.extend(matches)
    return out


def _expand_url(url: str) -> list[str]:
    import fsspec

    fs, _, found = fsspec.get_fs_token_paths(url)
    protocol = url.split("://", 1)[0]
    files: list[str] = []
    for path in found:
        if fs.isdir(path):
            files.extend(sorted(f for f in fs.find(path) if f.endswith(".parquet")))
        else:
            files.append(path)
    return [f if "://" in f else f"{protocol}://{f}" for f in files]


def content_id(text: str) -> str:
    """A stable id for documents without one: the same text always gets the same id."""
    return "sha1-" + hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def decode_text_column(column: pa.ChunkedArray) -> tuple[pa.Array, list[str | None]]:
    """A string column and a note per row: null text becomes "" (noted), bytes that are not
    UTF-8 are decoded with U+FFFD replacements (noted)."""
    notes: list[str | None] = []
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        texts = []
        for raw in column.to_pylist():
            if raw is None:
                texts.append("")
                notes.append("null_text")
                continue
            try:
                texts.append(raw.decode("utf-8"))
                notes.append(None)
            except UnicodeDecodeError:
                texts.append(raw.decode("utf-8", errors="replace"))
                notes.append("invalid_utf8_replaced")
        return pa.array(texts, pa.string()), notes
    if not _is_string(column.type):
        raise InputError(f"input.text_column has type {column.type}, expected string (or binary holding UTF-8)")
    column, invalid = utf8_checked(column)
    notes = ["null_text" if v is None else None for v in column.to_pylist()] if column.null_count else [None] * len(column)
    if invalid:
        notes = ["invalid_utf8_replaced" if bad else note for note, bad in zip(notes, invalid)]
    return pc.fill_null(column.cast(pa.string()), "").combine_chunks(), notes


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def utf8_checked(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, list[bool] | None]:
    """A string column whose values are all valid UTF-8, and which rows were not (None when all
    were). pyarrow does not validate string columns read from Parquet (apache/arrow#29635), and
    the first kernel or conversion that meets a bad value stops the run; so every chunk is checked
    in full (lone surrogates, over-long forms and stray bytes fail), and a chunk that fails is
    decoded value by value, bad values with U+FFFD replacements (their row is rejected, the
    replacement is its preview)."""
    chunks, invalid, found = [], [], False
    for chunk in column.chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            found = True
            raw = chunk.view(pa.large_binary() if pa.types.is_large_string(chunk.type) else pa.binary()).to_pylist()
            values = []
            for b in raw:
                try:
                    values.append(None if b is None else b.decode("utf-8"))
                    invalid.append(False)
                except UnicodeDecodeError:
                    values.append(b.decode("utf-8", errors="replace"))
                    invalid.append(True)
            chunks.append(pa.array(values, chunk.type))
            continue
        chunks.append(chunk)
        invalid.extend([False] * len(chunk))
    return pa.chunked_array(chunks, column.type), (invalid if found else None)


def checked_columns(table: pa.Table, *, skip: str) -> tuple[pa.Table, pa.Array | None]:
    """`table` with every other top-level string column UTF-8-checked (`utf8_checked`), and per
    row `invalid_utf8:<column>` for the first column that held a bad value (None when none did)."""
    reasons: list[str | None] | None = None
    for i, field in enumerate(table.schema):
        if field.name == skip or not _is_string(field.type):
            continue
        column, invalid = utf8_checked(table.column(i))
        if invalid:
            table = table.set_column(i, field, column)
            reasons = reasons or [None] * table.num_rows
            reasons = [r or (f"invalid_utf8:{field.name}" if bad else None) for r, bad in zip(reasons, invalid)]
    return table, (pa.array(reasons, pa.string()) if reasons else None)


# C0 control characters other than tab, newline, vertical tab, form feed and carriage return,
# plus DEL: in web text they mark binary junk or a broken decoder, not prose. (RE2 syntax.)
CONTROL_PATTERN = r"[\x00-\x08\x0e-\x1f\x7f]"
REJECT_COLUMNS = {"doc_id": pa.string(), "source_file": pa.string(), "source_row": pa.int64(),
                  "reason": pa.string(), "text_preview": pa.string()}
PREVIEW_CHARS = 1000
_NOTE_REASONS = {"null_text": "null_text", "invalid_utf8_replaced": "invalid_utf8"}


def reject_reasons(text: pa.Array, notes: list[str | None], *, max_chars: int) -> pa.Array:
    """Why each document cannot be used as it is, or null; in order of precedence: null_text,
    invalid_utf8, empty_text (nothing but whitespace), too_long:<n>_chars, control_characters
    (then, in `normalize`, invalid_utf8:<column> for the id or a carried column).
    Arrow kernels over the whole column: no Python work per document."""
    from_notes = pa.array([_NOTE_REASONS.get(n) if n else None for n in notes], pa.string())
    length = pc.utf8_length(text)
    empty = pc.or_(pc.equal(length, 0), pc.utf8_is_space(text))
    too_long = pc.greater(length, max_chars)
    control = pc.match_substring_regex(text, CONTROL_PATTERN)
    long_reason = pc.binary_join_element_wise("too_long:", pc.cast(length, pa.string()), "_chars", "")
    found = pc.case_when(pc.make_struct(empty, too_long, control, field_names=["e", "l", "c"]),
                         pa.scalar("empty_text"), long_reason, pa.scalar("control_characters"))
    return pc.coalesce(from_notes, found)


class ReadUnits(UnitStage):
    """Reads whole work units (one per input row) and emits their documents: `doc_id`, `text`,
    the other input columns, `source_file`/`source_row`, and `reject_reason` for documents that
    go to `rejects/` (their `text` is emptied so later stages spend nothing on them)."""

    name = "read"
    reads = ("unit",)
    adds = ("doc_id", "text", "input_note", "reject_reason", "text_preview", "source_file", "source_row", "_unit")

    def __init__(self, cfg: InputConfig, *, extra_columns: dict[str, str]):
        self.text_column = cfg.text_column
        self.id_column = cfg.id_column
        self.max_chars = cfg.max_document_chars
        self.extra_columns = extra_columns  # input name -> output name
        # One unit per call. Run it in the same task as the stages after it (`stages.InProcess`),
        # not as a Ray Data operator fused with them: a fused operator takes the next stage's batch
        # size as its input bundle size, so a batch of 1,024 documents became 1,024 units in one task.
        self.resources = Resources(batch_size=1)

    def read_unit(self, unit: Unit) -> pa.Table:
        wanted = [self.text_column, *self.extra_columns]
        if self.id_column:
            wanted.append(self.id_column)
        try:
            pf = open_parquet(unit.path)
            names = pf.schema_arrow.names
            table = pf.read_row_groups(list(unit.row_groups), columns=[c for c in dict.fromkeys(wanted) if c in names])
            return table.slice(0, unit.rows)
        except Exception as err:  # noqa: BLE001 - a bad row group is quarantined, not fatal
            reason = f"unreadable_rows: {type(err).__name__}: {err}"[:300]
            return pa.table({self.text_column: pa.nulls(unit.rows, pa.string()), "_read_error": [reason] * unit.rows})

    def process_unit(self, unit: Unit, row: dict) -> pa.Table:
        return self.normalize(self.read_unit(unit), unit)

    def normalize(self, table: pa.Table, unit: Unit) -> pa.Table:
        n = table.num_rows
        text, notes = decode_text_column(table.column(self.text_column))
        reasons = reject_reasons(text, notes, max_chars=self.max_chars)
        table, column_reasons = checked_columns(table, skip=self.text_column)
        if column_reasons is not None:
            reasons = pc.coalesce(reasons, column_reasons)
        if "_read_error" in table.column_names:
            reasons = pc.coalesce(table.column("_read_error").combine_chunks(), reasons)
        if self.id_column and self.id_column in table.column_names:
            ids = pc.cast(table.column(self.id_column), pa.string()).combine_chunks()
        else:
            ids = pa.nulls(n, pa.string())
        if ids.null_count:
            # Rows without an id: a content hash (a stable id), or the row's place when unreadable.
            missing = pc.is_null(ids).to_pylist()
            texts, unreadable = text.to_pylist(), "_read_error" in table.column_names
            ids = pa.array([
                ids[i].as_py() if not missing[i] else (f"{unit.key}:{unit.row_start + i}" if unreadable else content_id(texts[i]))
                for i in range(n)
            ], pa.string())
        rejected = pc.is_valid(reasons)
        columns = {
            "doc_id": ids,
            # A rejected document's text is emptied so later stages spend nothing on it.
            "text": pc.if_else(rejected, pa.scalar("", pa.string()), text),
            "input_note": pa.array(notes, pa.string()),
            "reject_reason": reasons,
            "text_preview": pc.if_else(rejected, pc.utf8_slice_codeunits(text, 0, PREVIEW_CHARS), pa.scalar(None, pa.string())),
            "source_file": pa.array([unit.path] * n, pa.string()),
            "source_row": pa.array(range(unit.row_start, unit.row_start + n), pa.int64()),
            "_unit": pa.array([unit.key] * n, pa.string()),
        }
        for src, dst in self.extra_columns.items():
            columns[dst] = table.column(src) if src in table.column_names else pa.nulls(n)
        return pa.table(columns)


def input_columns(files: list[str], *, text_column: str, id_column: str | None, reserved: set[str]) -> dict[str, str]:
    """Input columns carried to the output: those every usable file has with the same type
    (so blocks of different files concatenate), renamed `input_<name>` where they would clash
    with a column this pipeline adds."""
    common: dict[str, pa.DataType] | None = None
    for path in files:
        schema = open_parquet(path).schema_arrow
        fields = {f.name: f.type for f in schema}
        common = fields if common is None else {k: t for k, t in common.items() if fields.get(k) == t}
    out = {}
    for name in common or {}:
        if name in (text_column, id_column):
            continue
        out[name] = f"input_{name}" if name in reserved or name.startswith("_") else name
    return out


def units_dataset(units: list[Unit]):
    """A Ray Dataset with one row per unit; `ReadUnits` turns each into its documents."""
    return items_dataset([{"unit": unit_json(u)} for u in units])
