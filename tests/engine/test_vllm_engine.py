"""The engine's lifecycle around vLLM: the watchdog that declares an engine call hung (the engine
itself runs in the generation, SFT and audit tests)."""

from __future__ import annotations

import threading
import time

from annotator.engine.vllm_engine import EngineWatchdog


def test_watchdog_declares_a_hung_engine_call():
    fired = threading.Event()
    watchdog = EngineWatchdog(timeout_s=0.3, on_hang=fired.set)
    with watchdog:
        time.sleep(0.1)  # a call well inside the limit
    assert not fired.wait(0.6)
    with watchdog:
        assert fired.wait(3), "a call that outlives batch_timeout_s was not declared hung"


def test_watchdog_declares_an_engine_whose_process_died_during_a_call():
    fired, dead = threading.Event(), threading.Event()
    watchdog = EngineWatchdog(timeout_s=600, on_hang=fired.set, engine_dead=dead.is_set)
    dead.set()
    assert not fired.wait(0.5)  # between calls nothing waits on the engine
    with watchdog:
        assert fired.wait(3), "vLLM's client waits forever once its engine process is gone"
