"""One output across nodes: before any work, every node that will run stages proves it sees the
run's output location. Each writes a probe file there; the driver reads them all back. A node
that writes where the driver cannot read (a node-local disk at the same path, a mount missing on
one machine) would otherwise scatter the run over several disks without a word; here the run is
refused naming that node, with nothing but the probes written (and those removed).
"""

from __future__ import annotations

import json
import socket
import uuid

from annotator.core import storage
from annotator.core.errors import OutputDirError
from annotator.core.layout import NODE_PROBES


def _write_probe(out: str, token: str) -> str:
    """On a node: its probe under the output location; returns the probe's name."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    path = storage.location(out) / NODE_PROBES / f"{node}-{token}.json"
    storage.write_atomically(path, lambda tmp: tmp.write_text(json.dumps({"node_id": node, "host": socket.gethostname(), "token": token})))
    return path.name


def blind_nodes(answers: dict[str, tuple[str, object]], probes, *, token: str) -> list[str]:
    """What is wrong with each node whose probe this driver cannot read back (`answers`: node id ->
    (address, the probe's name or the error of its write), as `on_every_node` returns them)."""
    blind = []
    for node_id, (address, result) in sorted(answers.items()):
        if isinstance(result, BaseException):
            blind.append(f"node {address} ({node_id[:12]}) could not write there: {type(result).__name__}: {str(result)[-300:]}")
            continue
        try:
            seen = json.loads((probes / result).read_text())
        except (OSError, ValueError):
            seen = None
        if not seen or seen.get("token") != token or seen.get("node_id") != node_id:
            blind.append(f"node {address} ({node_id[:12]}) wrote its probe where this driver cannot read it "
                         "(a node-local disk at the same path?)")
    return blind


def check_nodes_see_output(out_dir, *, log=print) -> int:
    """Every CPU/GPU node of the cluster writes a probe into `out_dir`; each must be readable here
    with its node's token. Returns how many nodes were checked (0 on a one-node cluster)."""
    from annotator.core.ray_adapter import on_every_node

    token = uuid.uuid4().hex[:12]
    probes = storage.location(out_dir) / NODE_PROBES
    try:
        answers = on_every_node(_write_probe, str(out_dir), token)
        blind = blind_nodes(answers, probes, token=token)
    finally:
        storage.remove_tree(probes)
    if blind:
        raise OutputDirError(f"output.path {str(out_dir)!r} is not one location for the whole cluster: " + "; ".join(blind)
                             + ". Every node must see the same output: a shared filesystem mounted at the same path on "
                             "every node, or object storage (s3://bucket/prefix)")
    if answers:
        log(f"[spp] output {out_dir}: seen by all {len(answers)} nodes of the cluster")
    return len(answers)
