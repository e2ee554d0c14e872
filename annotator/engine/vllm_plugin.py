"""A vLLM general plugin (entry point `vllm.general_plugins`): reply grammars compiled in step.

vLLM compiles (or fetches from its cache) each structured request's grammar on a thread pool, and
the scheduler takes a request only once its grammar is ready, so which engine step a request
joins depends on thread timing: under load the same requests shared steps differently and sampled
other text. In a process that `Engine.load` started (it sets `SPP_SYNC_GRAMMAR=1`, which vLLM's
engine and worker processes inherit), grammars are compiled when the request is added instead,
as vLLM itself does for its `external_launcher` executor. Other users of vLLM in the same
environment are untouched: without the variable the plugin does nothing."""

from __future__ import annotations

import os

ENV = "SPP_SYNC_GRAMMAR"


def register() -> None:
    if os.environ.get(ENV) != "1":
        return
    from vllm.v1.structured_output import StructuredOutputManager

    if getattr(StructuredOutputManager, "_spp_sync", False):
        return
    original = StructuredOutputManager.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._use_async_grammar_compilation = False

    StructuredOutputManager.__init__ = __init__
    StructuredOutputManager._spp_sync = True
