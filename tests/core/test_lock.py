"""The output folder's lock: one command at a time, the holder named to the next; a dead or
silent holder's lock taken over with a warning; the heartbeat; the check before finalizing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from annotator.core.layout import LOCK_FILE
from annotator.core.lock import OutputLock, OutputLockedError


def held_by(folder, **fields) -> dict:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": "other", "command": "spp_reflections.py (run)",
              "started_at": time.time() - 60, "heartbeat_at": time.time(), **fields}
    (folder / LOCK_FILE).write_text(json.dumps(record))
    return record


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_command_is_refused_naming_the_holder(tmp_path):
    with OutputLock(tmp_path, command="spp_reflections.py (run)") as first:
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["command"] == "spp_reflections.py (run)"
        t0 = time.monotonic()
        with pytest.raises(OutputLockedError, match=rf"is in use by `spp_reflections.py \(run\)` \(host .*, pid {os.getpid()}, "
                                                    rf"run {record['run_id']}, started .*, last heartbeat \d+s ago\)"):
            OutputLock(tmp_path, command="audit.py").acquire()
        with pytest.raises(OutputLockedError, match="is in use by"):
            OutputLock.check_free(tmp_path)
        assert time.monotonic() - t0 < 1
        first.check()   # still the holder
    assert not (tmp_path / LOCK_FILE).exists()   # released
    OutputLock.check_free(tmp_path)


def test_a_dead_or_silent_holder_is_taken_over_with_a_warning(tmp_path):
    said = []
    held_by(tmp_path, pid=dead_pid())        # a SIGKILLed run on this host
    with OutputLock(tmp_path, command="rerun", log=said.append):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["command"] == "rerun"
    assert "taking over the lock" in said[0] and "its process is gone" in said[0]
    held_by(tmp_path, host="node-7", heartbeat_at=time.time() - 600)   # another node, silent for 10 minutes
    with OutputLock(tmp_path, command="rerun", log=said.append, stale_after_s=120):
        pass
    assert "no heartbeat for 600s" in said[1]
    held_by(tmp_path, host="node-7", pid=1)   # another node, alive: its pid means nothing here
    with pytest.raises(OutputLockedError, match="host node-7, pid 1"):
        OutputLock(tmp_path, command="rerun").acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "node-7"   # a refused command leaves the lock alone


def test_the_heartbeat_refreshes_and_a_lost_lock_stops_the_holder(tmp_path):
    lock = OutputLock(tmp_path, command="run", heartbeat_s=0.05)
    lock.acquire()
    first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat_at"]
    time.sleep(0.3)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat_at"] > first
    held_by(tmp_path, run_id="taker", command="audit.py")   # taken over while this holder stalled
    with pytest.raises(OutputLockedError, match="this command's lock was taken over by `audit.py`"):
        lock.check()
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["run_id"] == "taker"   # the taker's lock is not removed
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
