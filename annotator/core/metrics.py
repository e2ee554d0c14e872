"""Live metrics of a run, for the dashboard of a multi-day job: per stage (score, generate,
finalize, add) documents in/out/rejected, prompt and generated tokens, prefix-cache hit rate,
replicas alive, batches retried, rate and ETA. They are Ray metrics (`ray.util.metrics`) set by
the driver as its `Progress` counts result rows, so Ray's dashboard charts them and every node's
Prometheus endpoint serves them (as `ray_spp_*`, tagged `stage` and `output`).
"""

from __future__ import annotations

import time

# name -> description; every one is a gauge holding the stage's running total (or current value).
METRICS = {
    "spp_documents_total": "Documents the stage will take (unknown: not set)",
    "spp_documents_in": "Documents the stage has taken so far",
    "spp_documents_out": "Documents the stage has passed on so far (in minus rejected or failed)",
    "spp_documents_rejected": "Documents the stage rejected or whose generation failed",
    "spp_generated_tokens": "Tokens generated so far",
    "spp_prompt_tokens": "Prompt tokens sent to the engine so far",
    "spp_cached_prompt_tokens": "Prompt tokens served from the engine's prefix cache so far",
    "spp_prefix_cache_hit_rate": "Cached prompt tokens over prompt tokens, so far",
    "spp_replicas_alive": "Engine replicas alive now",
    "spp_batches_retried": "Engine batches started again after an earlier attempt of them started (a replica lost, a resumed run)",
    "spp_documents_per_second": "Documents per second over the recent window",
    "spp_eta_seconds": "Seconds left at the recent rate",
}
# The replica stage's actors, as Ray's state API names them (Ray Data's actor pool of a stateful stage).
REPLICA_ACTOR = "MapWorker(MapBatches(_StageActor))"
REPLICA_POLL_S = 10.0


class RunMetrics:
    """The gauges of one stage of a run; `publish` sets them. Without Ray (a unit test, a plain
    function call) nothing is exported and nothing fails."""

    def __init__(self, *, stage: str, output: str, count_replicas: bool = False, log=print):
        # Ray's metric tags are ASCII: a folder named `café` is tagged `caf\xe9`.
        self.tags = {"stage": stage, "output": output.encode("ascii", "backslashreplace").decode()}
        self.log = log
        self.count_replicas = count_replicas
        self._gauges: dict | None = None
        self._replicas: int | None = None
        self._replicas_at = 0.0

    def _ensure(self) -> dict:
        if self._gauges is None:
            import ray
            from ray.util.metrics import Gauge

            self._gauges = {} if not ray.is_initialized() else {
                name: Gauge(name, description=text, tag_keys=tuple(self.tags)) for name, text in METRICS.items()}
        return self._gauges

    def publish(self, values: dict[str, float | None]) -> None:
        gauges = self._ensure()
        if not gauges:
            return
        if self.count_replicas:
            values = {**values, "spp_replicas_alive": self.replicas_alive()}
        try:
            for name, value in values.items():
                if value is not None:
                    gauges[name].set(float(value), tags=self.tags)
        except Exception as err:  # noqa: BLE001 - a metric is never a reason to stop a run: say so once, stop exporting
            self._gauges = {}
            self.log(f"[spp] warning: live metrics off for this pass: {type(err).__name__}: {err}")

    def replicas_alive(self) -> int | None:
        """Alive replica actors (Ray's state API, asked at most every `REPLICA_POLL_S`); None
        where the state API is not served (no dashboard)."""
        now = time.monotonic()
        if now - self._replicas_at >= REPLICA_POLL_S:
            self._replicas_at = now
            try:
                from ray.util.state import list_actors

                actors = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False)
                self._replicas = sum(a.class_name == REPLICA_ACTOR for a in actors)
            except Exception:  # noqa: BLE001 - a metric, never a reason to stop the run
                self._replicas = None
        return self._replicas


def endpoint() -> str | None:
    """This node's Prometheus endpoint (`http://<node>:<port>/metrics`), where the run's metrics are
    served, or None."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == here and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None
