"""Real Ray clusters for tests, started with the `ray` CLI as a user would, with token auth.

Each node is its own `ray start` process with its own ports, so a head and workers can share
this machine; every cluster gets a scratch token file and temp dir and is stopped afterwards.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from annotator.engine.models import cache_dir
from tests.support import REPO

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def token_auth_env(home: Path) -> dict:
    """The environment for `ray` commands against a token-auth cluster, with a fresh token."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        # Workers see the same model cache as the test process.
        "SPP_CACHE": str(cache_dir()),
    }
    env.pop("RAY_ADDRESS", None)
    # `--generate` writes ~/.ray/auth_token; a scratch HOME keeps the user's own token untouched.
    token = ray_cli("get-auth-token", "--generate", env={**env, "HOME": str(home)}, timeout=60)
    assert token.returncode == 0, token.stderr
    token_file = home / ".ray" / "auth_token"
    assert token_file.read_text().strip()
    env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    return env


def _node_ports() -> list[str]:
    """Ports that default to fixed numbers (or shared ranges) and so would collide between two
    nodes on one host, or with other Ray instances on this machine."""
    return [
        f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        "--min-worker-port=0", "--max-worker-port=0",  # 0/0: each worker takes a random free port
    ]


class LocalRayCluster:
    """A head started here and, optionally, worker nodes on the same machine."""

    def __init__(self, env: dict, *, temp_root: Path):
        self.env = env
        self.temp_root = temp_root
        self.gcs_address: str | None = None
        self.dashboard: str | None = None

    def start_head(self, *, num_cpus: int, resources: dict | None = None, object_store_bytes: int | None = None) -> None:
        gcs_port, dash_port = free_port(), free_port()
        args = [
            "start", "--head", f"--num-cpus={num_cpus}", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}", "--include-dashboard=true", f"--temp-dir={self.temp_root / 'head'}",
            "--disable-usage-stats", *_node_ports(),
        ]
        self._start(args, resources, object_store_bytes)
        self.gcs_address = f"127.0.0.1:{gcs_port}"
        self.dashboard = f"http://127.0.0.1:{dash_port}"

    def add_worker(self, *, name: str, num_cpus: int, resources: dict | None = None, object_store_bytes: int | None = None,
                   node_local: Path | None = None) -> None:
        """A worker node; with `node_local`, that folder is the node's own disk: the node runs in a
        mount namespace of its own with a private tmpfs there, as a second machine would have."""
        assert self.gcs_address, "start the head first"
        args = [
            "start", f"--address={self.gcs_address}", f"--num-cpus={num_cpus}",
            f"--temp-dir={self.temp_root / name}", "--disable-usage-stats", *_node_ports(),
        ]
        self._start(args, resources, object_store_bytes, node_local=node_local)

    def _start(self, args: list[str], resources: dict | None, object_store_bytes: int | None, *, node_local: Path | None = None) -> None:
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        if object_store_bytes:
            args.append(f"--object-store-memory={object_store_bytes}")
        if node_local is None:
            started = ray_cli(*args, env=self.env)
        else:
            node_local.mkdir(parents=True, exist_ok=True)
            script = f"mount -t tmpfs spp-node-local {shlex.quote(str(node_local))} && exec {shlex.quote(str(BIN / 'ray'))} {shlex.join(args)}"
            started = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=self.env,
                                     capture_output=True, text=True, timeout=300, cwd=REPO)
        assert started.returncode == 0, started.stdout + started.stderr

    def list_state(self, kind: str, *filters: str) -> list[dict]:
        """`ray list <kind>` as JSON (detail, so tasks carry their node_id)."""
        args = ["list", kind, f"--address={self.dashboard}", "--detail", "--format=json", "--limit=10000"]
        for f in filters:
            args += ["--filter", f]
        proc = ray_cli(*args, env=self.env, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return json.loads(proc.stdout)

    def processes(self) -> list:
        """Every process of this cluster: those started with our temp dir on their command line
        (gcs, raylets, dashboard, agents), and their descendants (workers, job drivers), whose
        command lines Ray rewrites to `ray::...`."""
        import psutil

        roots = []
        for proc in psutil.process_iter(["cmdline"]):
            if any(str(self.temp_root) in arg for arg in proc.info["cmdline"] or ()):
                roots.append(proc)
        found = {p.pid: p for p in roots}
        for proc in roots:
            try:
                found.update({c.pid: c for c in proc.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        return list(found.values())

    def stop(self) -> None:
        """Ends this cluster's processes by their ids. Not `ray stop --force`: that ends every
        Ray process of the user on the machine, other people's runs included."""
        import psutil

        for _ in range(3):  # a dying raylet can still start a worker; sweep until none is left
            procs = self.processes()
            if not procs:
                break
            for proc in procs:
                try:
                    proc.terminate()
                except psutil.NoSuchProcess:
                    pass
            # A short grace period, then SIGKILL as `ray stop --force` does: waiting for every
            # process to act on SIGTERM took 10 s here, and nothing needs an orderly shutdown.
            for proc in _wait_gone(procs, timeout=3):
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            _wait_gone(procs, timeout=10)
        shutil.rmtree(self.temp_root, ignore_errors=True)


def _wait_gone(procs: list, *, timeout: float) -> list:
    """The processes still running after up to `timeout` s. A zombie counts as gone: where no
    init process reaps orphans (containers), it would otherwise never disappear."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in procs:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)
