"""The budget guard: stops a run whose generator spends far more tokens per reply than the
budget keeps (a model that reasons before it answers), after a replica's first requests.
"""

from __future__ import annotations

from annotator.config import GenerationConfig


class GenerationGuardError(RuntimeError):
    """The generator spends far more tokens per reply than it keeps (it is 'thinking')."""


class BudgetGuard:
    """Generated tokens per budgeted request over a replica's first requests, against the budget."""

    def __init__(self, cfg: GenerationConfig):
        self.cfg = cfg
        self.requests = 0
        self.tokens = 0
        self.judged = False

    def observe(self, generated: list[int]) -> None:
        self.requests += len(generated)
        self.tokens += sum(generated)
        if self.judged or self.requests < self.cfg.guard.min_requests:
            return
        self.judged = True
        mean = self.tokens / self.requests
        limit = self.cfg.guard.max_generated_multiple * self.cfg.max_reflection_tokens
        if mean > limit:
            raise GenerationGuardError(
                f"generation guard: {self.cfg.model} generated {mean:.0f} tokens per reflection request over its first "
                f"{self.requests} requests, {mean / self.cfg.max_reflection_tokens:.1f}x the {self.cfg.max_reflection_tokens}-token "
                f"budget (limit generation.guard.max_generated_multiple = {self.cfg.guard.max_generated_multiple}); it is probably "
                "reasoning before it answers. Turn thinking off (e.g. --set 'generation.chat_template_kwargs={enable_thinking: false}'), "
                "lower generation.max_output_tokens, or raise generation.guard.max_generated_multiple.")
