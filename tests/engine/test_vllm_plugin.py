"""The vLLM plugin that compiles reply grammars in step: registered where vLLM looks for general
plugins, inert without `SPP_SYNC_GRAMMAR=1`, and with it every new StructuredOutputManager
compiles synchronously (vLLM's own switch, `_use_async_grammar_compilation`)."""

from __future__ import annotations

from importlib.metadata import entry_points

from annotator.engine import vllm_plugin


def test_registered_as_a_vllm_general_plugin():
    found = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert found["spp_sync_grammar"] == "annotator.engine.vllm_plugin:register"


def test_inert_without_the_variable_and_synchronous_with_it(monkeypatch):
    from vllm.v1.structured_output import StructuredOutputManager

    original = StructuredOutputManager.__init__
    monkeypatch.setattr(StructuredOutputManager, "__init__", original)
    monkeypatch.delenv(vllm_plugin.ENV, raising=False)
    vllm_plugin.register()
    assert StructuredOutputManager.__init__ is original and not getattr(StructuredOutputManager, "_spp_sync", False)

    monkeypatch.setenv(vllm_plugin.ENV, "1")
    monkeypatch.setattr(StructuredOutputManager, "_spp_sync", False, raising=False)
    seen = {}

    def fake_init(self, *args, **kwargs):  # what vLLM's own __init__ decides for a normal executor
        self._use_async_grammar_compilation = True
        seen["args"] = args

    monkeypatch.setattr(StructuredOutputManager, "__init__", fake_init)
    vllm_plugin.register()
    vllm_plugin.register()  # loaded once per process by vLLM, but safe twice
    manager = StructuredOutputManager.__new__(StructuredOutputManager)
    manager.__init__("config")
    assert manager._use_async_grammar_compilation is False and seen["args"] == ("config",)
