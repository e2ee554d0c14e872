"""Live metrics: what a pass's `Progress` publishes as it counts result rows (the Ray gauges
themselves are scraped from a real run's Prometheus endpoint in
`tests/behaviour/test_object_storage.py`)."""

from __future__ import annotations

from annotator.core.metrics import METRICS, RunMetrics
from annotator.core.progress import Progress


class Recorder:
    """Stands where `RunMetrics` goes: keeps what was published."""

    def __init__(self):
        self.values: list[dict] = []

    def publish(self, values: dict) -> None:
        self.values.append(values)


def test_a_pass_publishes_its_counts_rate_eta_and_cache_hit_rate():
    clock = [100.0]
    sink = Recorder()
    progress = Progress(total_documents=10, interval_s=1e9, interactive=True, log=lambda line: None, clock=lambda: clock[0],
                        metrics=sink)
    with progress:
        assert sink.values[0]["spp_documents_in"] == 0 and sink.values[0]["spp_prefix_cache_hit_rate"] is None
        clock[0] = 104.0
        progress.update(documents=4, selected=4, generated_tokens=300, failures=1, prompt_tokens=1000, cached_prompt_tokens=750,
                        batches_retried=1)
        last = sink.values[-1]
        assert set(last) <= set(METRICS)
        assert (last["spp_documents_total"], last["spp_documents_in"], last["spp_documents_out"], last["spp_documents_rejected"]) == (10, 4, 3, 1)
        assert (last["spp_generated_tokens"], last["spp_prompt_tokens"], last["spp_cached_prompt_tokens"]) == (300, 1000, 750)
        assert last["spp_prefix_cache_hit_rate"] == 0.75 and last["spp_batches_retried"] == 1
        assert last["spp_documents_per_second"] == 1.0 and last["spp_eta_seconds"] == 6.0   # 6 documents left at 1/s
        clock[0] = 110.0
        progress.update(documents=6)
    assert sink.values[-1]["spp_documents_in"] == 10 and sink.values[-1]["spp_eta_seconds"] == 0.0


def test_without_ray_the_metrics_are_not_exported_and_nothing_fails():
    metrics = RunMetrics(stage="score", output="/runs/exp #2 café", count_replicas=True)
    metrics.publish({"spp_documents_in": 3})
    assert metrics._gauges == {}   # no Ray in this process: nothing to export to
    assert metrics.tags == {"stage": "score", "output": "/runs/exp #2 caf\\xe9"}   # Ray's tags are ASCII
