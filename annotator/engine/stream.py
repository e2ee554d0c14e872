"""Continuous batching inside a replica (`generation.reproducible: false`).

Several planned batches run in one replica at once, each in its own thread (Ray Data calls the
actor concurrently). Their requests go to one `EngineStream`, whose driver thread alone touches
vLLM's `LLMEngine`: it adds each request the moment it comes and steps the engine, so vLLM's
scheduler keeps up to `max_num_seqs` sequences running across batch boundaries and a retry joins
the running sequences at once. Each caller waits only for its own requests.

The host side of a replica (building prompts, reading replies, saving a batch) runs one thread at
a time (`HOST`): a thread gives its turn up while it waits for the engine.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager


class HostTurn:
    """A re-entrant turn for a replica's host work; `waiting()` gives it up while the engine works."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self):
        me = threading.get_ident()
        if self._owner != me:
            self._lock.acquire()
            self._owner = me
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if not self._depth:
            self._owner = None
            self._lock.release()

    @contextmanager
    def waiting(self):
        if self._owner != threading.get_ident():  # a caller outside any turn (one thread)
            yield
            return
        depth, self._depth, self._owner = self._depth, 0, None
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            self._owner, self._depth = threading.get_ident(), depth


HOST = HostTurn()  # one replica per actor process


class EngineDied(RuntimeError):
    """The engine failed outside any one request: every request in flight is lost."""


class EngineStream:
    """Feeds one vLLM `LLMEngine` from any number of threads (see the module docstring).

    `on_hang` is called when requests are in the engine and none has finished for `timeout_s`,
    `on_dead` when the engine's process died (vLLM's client then waits forever: `engine_dead`
    tells); in a replica both exit, so Ray restarts it and its unsaved batches run again. Every
    caller still waiting gets `EngineDied` first."""

    def __init__(self, engine, *, timeout_s: float, on_hang, on_dead=None, engine_dead=None, drive_on=None):
        self._engine = engine
        self._cond = threading.Condition()
        self._queue: list[tuple[str, list[int], object, Future]] = []
        self._active: dict[str, Future] = {}
        self._dead: BaseException | None = None
        self._ids = itertools.count()
        self._last_finish = time.monotonic()
        self.timeout_s = timeout_s
        self.on_hang = on_hang
        self.on_dead = on_dead
        self.engine_dead = engine_dead or (lambda: False)
        self.peak_running = 0  # most requests in the engine at once (tests, benchmark)
        if drive_on is not None:  # an inline engine's own thread (`vllm_engine.EngineThread`)
            drive_on(self._drive)
        else:
            threading.Thread(target=self._drive, daemon=True, name="engine-stream").start()
        threading.Thread(target=self._watch, daemon=True, name="engine-stream-watchdog").start()

    def submit(self, prompts: list[list[int]], params: list) -> list[Future]:
        """Queue requests (token ids, SamplingParams); each future gives its `RequestOutput`."""
        futures = [Future() for _ in prompts]
        with self._cond:
            if self._dead is not None:
                raise EngineDied(f"the engine stopped: {self._dead!r}") from self._dead
            for prompt, sp, fut in zip(prompts, params, futures):
                self._queue.append((f"spp-s{next(self._ids)}", prompt, sp, fut))
            self._cond.notify()
        return futures

    def run(self, prompts: list[list[int]], params: list) -> list:
        """Each request's `RequestOutput`, or the exception that request alone raised. Raises
        `EngineDied` when the engine itself failed."""
        futures = self.submit(prompts, params)
        with HOST.waiting():
            for fut in futures:
                fut.exception()  # wait for all
        results = [fut.exception() or fut.result() for fut in futures]
        dead = next((r for r in results if isinstance(r, EngineDied)), None)
        if dead is not None:
            raise dead
        return results

    def _drive(self) -> None:
        from vllm.sampling_params import RequestOutputKind

        engine = self._engine
        while True:
            with self._cond:
                while not self._queue and not self._active:
                    self._cond.wait()
                new, self._queue = self._queue, []
            for rid, prompt, sp, fut in new:
                sp.output_kind = RequestOutputKind.FINAL_ONLY
                try:
                    engine.add_request(rid, {"prompt_token_ids": prompt}, sp)
                except Exception as err:  # noqa: BLE001 - this request alone (e.g. too long a prompt)
                    fut.set_exception(err)
                    continue
                if not self._active:
                    self._last_finish = time.monotonic()  # the clock starts when work arrives
                self._active[rid] = fut
            self.peak_running = max(self.peak_running, len(self._active))
            if not self._active:
                continue
            try:
                outputs = engine.step()
            except BaseException as err:  # noqa: BLE001 - the engine process died or broke
                self._fail_all(err)
                if self.on_dead is not None:
                    self.on_dead(err)
                return
            for out in outputs:
                if out.finished:
                    fut = self._active.pop(out.request_id, None)
                    if fut is not None:
                        fut.set_result(out)
                        self._last_finish = time.monotonic()

    def _fail_all(self, err: BaseException) -> None:
        died = EngineDied(f"the engine stopped: {err!r}")
        died.__cause__ = err
        with self._cond:
            if self._dead is not None:
                return
            self._dead = err
            pending = [fut for *_, fut in self._queue] + list(self._active.values())
            self._queue, self._active = [], {}
        for fut in pending:
            fut.set_exception(died)

    def _watch(self) -> None:
        while self._dead is None:
            time.sleep(min(1.0, self.timeout_s / 4))
            if self.engine_dead():
                err = RuntimeError("the engine process exited")
                self._fail_all(err)
                if self.on_dead is not None:
                    self.on_dead(err)
                return
            if self._active and time.monotonic() - self._last_finish > self.timeout_s:
                self._last_finish = time.monotonic()
                self.on_hang()
