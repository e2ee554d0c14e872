"""One command per output folder: a lock file taken at start by every command that writes into a
run's folder (a run, `--add-recipe`, `--plan`, an audit, a publish, an SFT run) and refreshed by a
heartbeat; checked again before anything is finalized or deleted.

A second command on a folder in use fails at once, naming the holder. A lock whose holder is gone
(a dead process on this host, or a heartbeat older than `stale_after_s` from any host) is taken
over with a warning: a SIGKILLed run is resumed by running its command again. On object storage
the lock is an object created by a conditional PUT (`If-None-Match: *`), the S3 form of O_EXCL.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from annotator.core import storage
from annotator.core.storage import write_atomically
from annotator.core.errors import OutputDirError
from annotator.core.layout import LOCK_FILE

HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0


class OutputLockedError(OutputDirError):
    """The output folder is in use by another command (or this command lost its lock)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """`with OutputLock(folder, command="run"):` holds the folder's lock for the block."""

    def __init__(self, out_dir: Path, *, command: str, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S,
                 log=print):
        self.path = storage.location(out_dir) / LOCK_FILE
        self.command = command
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.log = log
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": uuid.uuid4().hex, "command": command,
                       "started_at": time.time(), "heartbeat_at": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @classmethod
    def check_free(cls, out_dir: Path) -> None:
        """Fails at once, naming the holder, when a live command holds `out_dir` (before a
        command starts Ray or loads anything); takes nothing."""
        probe = cls(out_dir, command="(check)")
        holder = probe._read()
        if holder is not None and not probe._stale_reason(holder):
            raise OutputLockedError(probe._in_use(holder))

    def _in_use(self, holder: dict) -> str:
        age = time.time() - float(holder.get("heartbeat_at", 0))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started_at", 0))))
        return (f"{self.path.parent} is in use by `{holder.get('command')}` (host {holder.get('host')}, pid {holder.get('pid')}, "
                f"run {holder.get('run_id')}, started {started}, last heartbeat {age:.0f}s ago); wait for it to end. "
                f"If it is not running, remove {self.path}")

    def acquire(self) -> None:
        storage.mkdirs(self.path.parent)
        while not storage.create_exclusive(self.path, json.dumps(self.record).encode()):
            holder = self._read()
            if holder is None:          # removed (or half-written) just now: try again
                time.sleep(0.05)
                continue
            stale = self._stale_reason(holder)
            if not stale:
                raise OutputLockedError(self._in_use(holder))
            self.log(f"[spp] warning: taking over the lock of {self.path.parent} from `{holder.get('command')}` "
                     f"(host {holder.get('host')}, pid {holder.get('pid')}): {stale}")
            self._replace_if_unchanged(holder)
        self._thread = threading.Thread(target=self._beat, name="spp-lock-heartbeat", daemon=True)
        self._thread.start()

    def _read(self) -> dict | None:
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _stale_reason(self, holder: dict) -> str | None:
        if holder.get("host") == self.record["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            return "its process is gone"
        age = time.time() - float(holder.get("heartbeat_at", 0))
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f}s"
        return None

    def _replace_if_unchanged(self, holder: dict) -> None:
        """Removes the stale lock only if it is still the one judged stale (another taker may
        have replaced it meanwhile); the next exclusive create decides who holds the folder."""
        if self._read() == holder:
            storage.remove_tree(self.path)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self._read() != self.record:
                return  # lost (taken over after a long stall): `check` says so before the next write
            self.record["heartbeat_at"] = time.time()
            write_atomically(self.path, lambda tmp: tmp.write_text(json.dumps(self.record)))

    def check(self) -> None:
        """Before anything is finalized or deleted: the lock is still this command's."""
        holder = self._read()
        if holder is None or holder.get("run_id") != self.record["run_id"]:
            raise OutputLockedError(f"{self.path.parent}: this command's lock was taken over by "
                                    f"`{(holder or {}).get('command')}` (pid {(holder or {}).get('pid')}); stopping before writing more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder is not None and holder.get("run_id") == self.record["run_id"]:
            storage.remove_tree(self.path)
