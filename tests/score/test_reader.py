"""Reading the corpus: string columns that hold bytes which are not UTF-8 (pyarrow does not check
them on read) are rejected row by row, and every other row of the unit is read as it was."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotator.config import InputConfig
from annotator.core.units import Unit, file_key
from annotator.score.reader import ReadUnits, utf8_checked

# Latin-1 "é", a CESU-8-encoded lone surrogate (U+D800), an over-long "/" and a truncated sequence.
BAD = {"latin1": b"caf\xe9 au lait", "surrogate": b"half a pair \xed\xa0\x80 here", "overlong": b"a \xc0\xaf b",
       "truncated": b"ends mid-character \xe2\x82"}


def as_string(values: list[bytes | None]) -> pa.Array:
    """A string array holding exactly these bytes, as a Parquet writer that does not check would."""
    return pa.array(values, pa.binary()).view(pa.string())


@pytest.fixture
def hostile_file(tmp_path):
    texts = [b"plain text", *BAD.values(), None, "caf\u00e9 ok".encode()]
    ids = [f"d{i}".encode() for i in range(len(texts))]
    ids[-1] = b"id-\xff"                    # a valid text under an id that is not UTF-8
    urls = [b"u"] * len(texts)
    urls[0] = b"http://x/\xfe"               # a carried column that is not UTF-8
    path = tmp_path / "data[1].parquet"
    pq.write_table(pa.table({"id": as_string(ids), "text": as_string(texts), "url": as_string(urls)}), path)
    return path, len(texts)


def test_pyarrow_reads_invalid_utf8_into_string_columns_unchecked(hostile_file):
    path, _ = hostile_file
    column = pq.read_table(path).column("text")
    with pytest.raises(pa.ArrowInvalid):
        column.validate(full=True)
    with pytest.raises(UnicodeDecodeError):
        column.to_pylist()


def test_invalid_utf8_rows_are_rejected_and_the_rest_read(hostile_file):
    path, n = hostile_file
    stage = ReadUnits(InputConfig(paths=[str(path)], id_column="id"), extra_columns={"url": "url"})
    unit = Unit(key=f"{file_key(str(path))}-000000000", path=str(path), row_groups=(0,), row_start=0, rows=n)
    out = stage.process_unit(unit, {}).to_pylist()          # converts every value: nothing invalid is left
    reasons = [r["reject_reason"] for r in out]
    assert reasons == ["invalid_utf8:url", "invalid_utf8", "invalid_utf8", "invalid_utf8", "invalid_utf8", "null_text", "invalid_utf8:id"]
    assert [r["text_preview"] for r in out[1:5]] == [b.decode("utf-8", errors="replace") for b in BAD.values()]
    assert all(r["text"] == "" for r in out)                 # rejected rows carry no text to later stages
    assert out[-1]["doc_id"] == "id-\ufffd" and out[0]["url"] == "http://x/\ufffd"
    assert [r["source_row"] for r in out] == list(range(n)) and {r["source_file"] for r in out} == {str(path)}


def test_a_valid_column_is_passed_through_unchanged():
    column = pa.chunked_array([pa.array(["a", None, "caf\u00e9"]), pa.array(["\U0001f600"])])
    checked, invalid = utf8_checked(column)
    assert invalid is None and checked.equals(column)
    mixed = pa.chunked_array([pa.array(["fine"]), as_string([b"ok", b"\xff"])])
    checked, invalid = utf8_checked(mixed)
    assert invalid == [False, False, True] and checked.to_pylist() == ["fine", "ok", "\ufffd"]


def test_unit_keys_hold_no_glob_or_path_characters():
    # A file named with glob characters: its unit's files are found by `<key>-*` globs.
    for name in ("data[1].parquet", "exp #2/part?.parquet", "caf\u00e9 *.parquet", "web-sample-00000.parquet"):
        stem = file_key(f"/corpus/{name}").rsplit("-", 1)[0]
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in stem), stem
    assert file_key("/corpus/web-sample-00000.parquet").startswith("web-sample-00000-")   # ordinary names keep their key
