"""One output across nodes: what the driver makes of the nodes' answers and the probes it reads
back. The whole check on a real two-node cluster, whose worker's disk is its own, is in
`tests/behaviour/test_multinode.py`."""

from __future__ import annotations

import json

from annotator.core.layout import NODE_PROBES
from annotator.run.shared_output import blind_nodes


def test_each_node_whose_probe_is_not_read_back_is_named(tmp_path):
    probes = tmp_path / NODE_PROBES
    probes.mkdir(parents=True)
    (probes / "aaaa-t1.json").write_text(json.dumps({"node_id": "a" * 40, "token": "t1"}))
    (probes / "cccc-old.json").write_text(json.dumps({"node_id": "c" * 40, "token": "an earlier run's"}))
    answers = {"a" * 40: ("10.0.0.1", "aaaa-t1.json"),          # seen: fine
               "b" * 40: ("10.0.0.2", "bbbb-t1.json"),          # written on its own disk: not here
               "c" * 40: ("10.0.0.3", "cccc-old.json"),         # a stale probe is not this run's
               "d" * 40: ("10.0.0.4", PermissionError("read-only file system"))}
    blind = blind_nodes(answers, probes, token="t1")
    assert blind == [f"node 10.0.0.2 ({'b' * 12}) wrote its probe where this driver cannot read it (a node-local disk at the same path?)",
                     f"node 10.0.0.3 ({'c' * 12}) wrote its probe where this driver cannot read it (a node-local disk at the same path?)",
                     f"node 10.0.0.4 ({'d' * 12}) could not write there: PermissionError: read-only file system"]
    assert blind_nodes({"a" * 40: ("10.0.0.1", "aaaa-t1.json")}, probes, token="t1") == []
