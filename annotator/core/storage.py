"""Where a run's files live: a local (or mounted) folder, or object storage (`s3://bucket/prefix`,
or any filesystem fsspec knows). Every write and read of an output goes through this one layer,
which `layout.py` owns; the rest of the code handles `Path`-like locations and never asks which.

The commit protocol fits both. A local file is written under a temporary name and renamed. An
object is written to a local temporary file, then uploaded in one PUT (a multipart upload appears
only when it completes): an object that exists is whole, and nothing half-written is ever visible
under a final name. Completeness beyond one file is the unit manifest's job, written last: readers
go by manifests, never by listing. Credentials come from the provider's usual chain (for S3: the
`AWS_*` variables, `AWS_ENDPOINT_URL` included, profiles, instance roles), never from a config file.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path, PurePath

import pyarrow as pa
import pyarrow.parquet as pq

from annotator.core.errors import OutputDirError

# Read-only or not a folder: an output there is refused at config time.
NOT_WRITABLE = ("http", "https", "hf")
TMP_MARK = ".tmp-"


def location(spec):
    """A `Path` for a local folder (resolved), else a `UPath` on its fsspec filesystem. A location
    passes through unchanged, so stages may hold either a string or a location."""
    from upath import UPath

    if isinstance(spec, UPath):
        return spec if is_remote(spec) else Path(spec.path)
    if isinstance(spec, PurePath):
        return Path(spec).expanduser().resolve()
    spec = str(spec)
    if spec.startswith("file://"):
        return Path(spec[len("file://"):]).expanduser().resolve()
    if "://" not in spec:
        return Path(spec).expanduser().resolve()
    protocol = spec.split("://", 1)[0]
    # Listings are never cached: the driver lists what workers on other nodes wrote after it last looked.
    options = {"use_listings_cache": False} if protocol in ("s3", "s3a", "gs", "gcs") else {}
    return UPath(spec.rstrip("/"), **options)


class StorageError(OutputDirError):
    """A location that cannot be reached or written with the credentials this process has."""


CREDENTIALS_HINT = ("credentials come from the environment and the provider's usual chain (for S3: AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL, or an instance role)")


def reachable(spec):
    """`location(spec)`, checked before a command starts anything: for object storage, its bucket
    exists and these credentials may see it. Nothing is written."""
    loc = location(spec)
    if is_remote(loc):
        bucket = loc.path.split("/", 1)[0]
        try:
            loc.fs.info(bucket)
        except FileNotFoundError as e:
            raise StorageError(f"{spec}: bucket {bucket!r} does not exist or is not visible ({e})") from e
        except (PermissionError, OSError) as e:
            raise StorageError(f"{spec}: cannot reach it: {type(e).__name__}: {e}; {CREDENTIALS_HINT}") from e
    return loc


def is_remote(path) -> bool:
    return not isinstance(path, Path) and getattr(path, "protocol", "") not in ("", "file", "local")


def url_protocol(spec: str) -> str | None:
    return spec.split("://", 1)[0].lower() if "://" in spec else None


def check_writable_url(spec: str) -> None:
    """Config-time: an output URL names a filesystem fsspec can write (its package installed)."""
    import fsspec

    protocol = url_protocol(spec)
    if protocol is None:
        return
    if protocol in NOT_WRITABLE:
        raise ValueError(f"{spec!r}: {protocol}:// cannot hold a run's output; write to a folder or an object store (s3://bucket/prefix)")
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:
        raise ValueError(f"{spec!r}: no filesystem for {protocol}:// ({e}); for S3 install s3fs") from e


def mkdirs(path) -> None:
    """A folder and its parents (object stores have no folders: nothing to do)."""
    if not is_remote(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def _upload_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"spp-upload-{os.getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def temp_path(path) -> Path:
    """A local file to write `path` into before `commit`: beside it for a local folder (hidden,
    with this host, process and a random part: nodes share the filesystem, pids repeat across
    them); in this process's upload folder for object storage."""
    tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if is_remote(path):
        return _upload_dir() / f"{tag}-{path.name}"
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{tag}")


def commit(tmp: Path, path) -> None:
    """`tmp` becomes `path`: flushed and renamed on disk (the rename flushed too, where the
    filesystem allows a folder to be synced), or uploaded in one PUT and removed."""
    if is_remote(path):
        try:
            path.fs.put_file(str(tmp), path.path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:
        dfd = os.open(Path(path).parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def write_atomically(path, write) -> None:
    """`write(tmp_path)` then `commit`: the final name only ever holds a complete file."""
    mkdirs(path.parent)
    tmp = temp_path(path)
    try:
        write(tmp)
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def create_exclusive(path, data: bytes) -> bool:
    """Writes `path` only if it does not exist (O_EXCL on disk, a conditional PUT, `If-None-Match:
    *`, on object storage); False when it exists."""
    if is_remote(path):
        try:
            path.fs.pipe_file(path.path, data, mode="create")
        except FileExistsError:
            return False
        except PermissionError as e:
            raise StorageError(f"cannot write {path}: {e}; {CREDENTIALS_HINT}") from e
        return True
    mkdirs(Path(path).parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def read_table(path, **kwargs) -> pa.Table:
    if is_remote(path):
        with path.open("rb") as f:
            return pq.read_table(f, **kwargs)
    return pq.read_table(path, **kwargs)


def parquet_file(path) -> pq.ParquetFile:
    return pq.ParquetFile(path.open("rb") if is_remote(path) else path)


def read_schema(path) -> pa.Schema:
    return parquet_file(path).schema_arrow


def remove_tree(path) -> None:
    """Deletes a folder (every object under a prefix) or a file; nothing when it is not there."""
    if is_remote(path):
        fs = path.fs
        if fs.exists(path.path):
            fs.rm(path.path, recursive=True)
        return
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def copy_in(local: Path, dest) -> None:
    """A local file copied to `dest` (any location), atomically."""
    write_atomically(dest, lambda tmp: shutil.copyfile(local, tmp))


def copy_out(src, local: Path) -> None:
    """A file of any location copied to a local path."""
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    if is_remote(src):
        src.fs.get_file(src.path, str(local))
    else:
        shutil.copy2(src, local)


def dataset_files(paths) -> tuple[list[str], object | None]:
    """Files for `pyarrow.dataset`: their paths in name order and the filesystem they are on
    (None: local)."""
    paths = sorted(paths, key=str)
    if paths and is_remote(paths[0]):
        return [p.path for p in paths], paths[0].fs
    return [str(p) for p in paths], None


def relative(path, root) -> str:
    """`path` relative to `root`, '/'-separated, for either kind of location."""
    full, base = str(path), str(root).rstrip("/") + "/"
    if not full.startswith(base):
        raise ValueError(f"{full} is not under {root}")
    return full[len(base):]
