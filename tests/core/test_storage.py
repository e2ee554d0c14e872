"""The one filesystem layer under the output layout: a local folder and an S3 prefix on a real
S3 API on loopback (`tests/s3_server.py`), through the same calls."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

from annotator.core import layout, storage
from annotator.core.checkpoint import write_json, write_table


@pytest.fixture(scope="module")
def s3():
    from tests.s3_server import start_s3_server

    server = start_s3_server()
    server.client().create_bucket(Bucket="store")
    old = dict(os.environ)
    os.environ.update(server.env())
    yield server
    os.environ.clear()
    os.environ.update(old)
    server.stop()


def test_locations_local_and_remote(tmp_path):
    assert storage.location(str(tmp_path / "a" / ".." / "b")) == tmp_path / "b"
    assert storage.location(f"file://{tmp_path}/x") == tmp_path / "x" and not storage.is_remote(tmp_path)
    remote = storage.location("s3://bucket/runs/one/")
    assert storage.is_remote(remote) and str(remote) == "s3://bucket/runs/one"
    assert storage.location(remote) is remote and str(layout.text_shard(remote, "u-0000")) == "s3://bucket/runs/one/shards/u-0000.parquet"
    assert storage.relative(remote / "tokenized" / "compact" / "u", remote) == "tokenized/compact/u"
    with pytest.raises(ValueError, match="is not under"):
        storage.relative(tmp_path, remote)
    with pytest.raises(TypeError):
        Path(remote)   # a remote location never turns into a local folder named `s3:` by accident


def test_local_writes_are_atomic_and_exclusive(tmp_path):
    path = tmp_path / "deep" / "file.json"
    write_json(path, {"a": 1})
    assert path.read_text().startswith("{") and not [p for p in path.parent.iterdir() if storage.TMP_MARK in p.name]
    assert storage.temp_path(path).name.startswith(".file.json.tmp-")
    assert storage.create_exclusive(tmp_path / "new" / "lock", b"one") and not storage.create_exclusive(tmp_path / "new" / "lock", b"two")
    assert (tmp_path / "new" / "lock").read_bytes() == b"one"
    storage.remove_tree(tmp_path / "deep")
    storage.remove_tree(tmp_path / "not-there")
    assert not (tmp_path / "deep").exists()


def test_an_s3_prefix_through_the_same_calls(s3, tmp_path):
    run = storage.location("s3://store/run")
    table = pa.table({"doc_id": ["a", "b"], "n": [1, 2]})
    write_table(run / "shards" / "u-0000.parquet", table)
    write_json(run / "stats.json", {"documents": 2})
    assert s3.objects("store").keys() == {"run/shards/u-0000.parquet", "run/stats.json"}
    assert storage.read_table(run / "shards" / "u-0000.parquet").equals(table)
    assert storage.parquet_file(run / "shards" / "u-0000.parquet").metadata.num_rows == 2
    assert [p.name for p in layout.text_shards(run)] == ["u-0000.parquet"]
    # The upload went from a local temporary file that is gone; no temporary object ever existed.
    assert not list(storage._upload_dir().iterdir())
    # Listings are never cached: an object another process wrote is seen at once.
    s3.client().put_object(Bucket="store", Key="run/shards/u-0001.parquet", Body=s3.read("store", "run/shards/u-0000.parquet"))
    assert [p.name for p in layout.text_shards(run)] == ["u-0000.parquet", "u-0001.parquet"]
    files, fs = storage.dataset_files(layout.text_shards(run))
    assert files == ["store/run/shards/u-0000.parquet", "store/run/shards/u-0001.parquet"] and fs is not None
    # The lock's primitive: a conditional PUT that only the first caller wins.
    assert storage.create_exclusive(run / ".spp-lock.json", b"first")
    assert not storage.create_exclusive(run / ".spp-lock.json", b"second") and s3.read("store", "run/.spp-lock.json") == b"first"
    local = tmp_path / "copy.parquet"
    storage.copy_out(run / "shards" / "u-0000.parquet", local)
    assert local.read_bytes() == s3.read("store", "run/shards/u-0000.parquet")
    storage.copy_in(local, run / "copied.parquet")
    assert s3.read("store", "run/copied.parquet") == local.read_bytes()
    storage.remove_tree(run / "shards")
    assert not [k for k in s3.objects("store") if k.startswith("run/shards/")] and "run/stats.json" in s3.objects("store")


def test_an_unreachable_location_is_said_before_anything_is_written(s3, monkeypatch):
    import s3fs

    assert str(storage.reachable("s3://store/new")) == "s3://store/new"
    with pytest.raises(storage.StorageError, match=r"s3://nothere/x: bucket 'nothere' does not exist"):
        storage.reachable("s3://nothere/x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(storage.StorageError, match=r"s3://store/new: cannot reach it: PermissionError.*AWS_ACCESS_KEY_ID"):
            storage.reachable("s3://store/new")
        with pytest.raises(storage.StorageError, match=r"cannot write s3://store/new/lock"):
            storage.create_exclusive(storage.location("s3://store/new") / "lock", b"x")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert not [k for k in s3.objects("store") if k.startswith("new/")]
