"""Continuous batching inside a replica (`engine.stream`): batches from several threads share one
real engine at once, each gets its own replies, a bad request fails alone, host work takes turns,
and an engine that dies fails every caller instead of being recorded as failed replies."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from annotator.engine.stream import EngineStream, HostTurn
from tests.stream_probe import BATCHES, PER_BATCH
from tests.support import REPO


def test_a_host_turn_is_reentrant_and_given_up_while_waiting():
    turn, order = HostTurn(), []

    def other():
        with turn:
            order.append("other")

    with turn:
        with turn:  # re-entrant: a stage inside a stage
            t = threading.Thread(target=other)
            t.start()
            time.sleep(0.1)
            assert order == []  # the turn is held
            with turn.waiting():
                t.join(2)
                assert order == ["other"]  # given up while waiting
            order.append("back")
    assert order == ["other", "back"]
    with turn.waiting():  # outside any turn: nothing to give up
        pass


class _NeverSteps:
    """Stands in for an engine whose step never returns (a hang cannot be made on demand with the
    real engine; the real engine's streaming is tested below)."""

    def add_request(self, *args, **kwargs):
        pass

    def step(self):
        threading.Event().wait()


def test_a_stream_whose_requests_stop_finishing_is_declared_hung():
    from vllm import SamplingParams

    hung = threading.Event()
    stream = EngineStream(_NeverSteps(), timeout_s=0.4, on_hang=hung.set)
    assert not hung.wait(0.8)  # nothing in flight: idle is not hung
    stream.submit([[1, 2, 3]], [SamplingParams(max_tokens=1)])
    assert hung.wait(5)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "probe.json"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "stream_probe.py"), str(out)], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_batches_from_several_threads_run_together_and_get_their_own_replies(probe):
    assert probe["streaming"]
    batches = {int(b): v for b, v in probe["batches"].items()}
    assert sorted(batches) == list(range(BATCHES))
    for b, batch in batches.items():
        for i, (reply, expected) in enumerate(zip(batch["replies"], batch["expected_prompt_tokens"])):
            if b == 1 and i == 2:
                # Longer than the context: vLLM refuses this request alone, saying why.
                assert reply["error"] == "VLLMValidationError" and "3022" in reply["message"], reply
                continue
            # Each reply answers its own request: prompts differ in length, and each reply's prompt is its request's.
            assert reply["prompt_tokens"] == expected and 0 < reply["output_tokens"] <= 24 + 8 * b and reply["text"].strip()
    # More sequences ran at once than one batch holds: the engine did not drain between batches.
    assert probe["peak_running"] > PER_BATCH
    spans = sorted(tuple(v["seconds"]) for v in batches.values())
    assert all(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))  # the calls overlapped in time
    assert max(probe["in_host"]) == 1  # host work never ran in two threads at once


@pytest.mark.slow
def test_an_engine_that_dies_fails_every_caller(probe):
    assert probe["engine_core_found"]
    assert probe["died_running"] and "engine stopped" in probe["died_running"]
    assert probe["died_after"] and "engine stopped" in probe["died_after"]
