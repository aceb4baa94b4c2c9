"""AsyncEngine: one background thread drives the synchronous Engine; asyncio callers stream.

The Engine is not thread-safe, so every call into it (construction included) happens on one
dedicated thread. Callers on an asyncio loop send "add" and "abort" commands through a
thread-safe queue and receive their RequestOutputs through a per-request asyncio queue; the
thread hands each step's outputs to each caller's loop in one `call_soon_threadsafe` call.
Requests added while others run join the next step: that is continuous batching.

An error that belongs to one request (a prompt that does not fit, a bad option) is raised to that
caller only; the Engine itself finishes a request whose logits processor or forward failed with
finish_reason "error". An exception that escapes `Engine.step()` (or anything else on the engine
thread) is therefore fatal: the device may be poisoned (a CUDA error) and the engine's state is
unknown. The engine is marked dead (`dead_error`), every open stream ends with `EngineDeadError`,
new requests are refused, and `on_dead` callbacks run (the server exits non-zero so that a
supervisor restarts it).
"""
from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ondo.config import EngineConfig
from ondo.outputs import RequestOutput
from ondo.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_EMPTY_STEP_S = 0.001  # a step this fast that produced nothing scheduled nothing


class QueueFullError(RuntimeError):
    """The waiting queue holds `max_waiting` requests already (the server answers 429)."""


class EngineDeadError(RuntimeError):
    """The engine failed to load or was shut down."""


@dataclass
class Finished:
    """Put on a stream's queue after the request's last output, or with the error that ended it."""
    request_id: str
    error: BaseException | None = None


@dataclass
class RequestStream:
    """The caller's side of one request. Its outputs, then a `Finished`, arrive on `queue` in
    the caller's loop; the requests of one HTTP call (several prompts) may share one queue."""
    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    added: asyncio.Future
    finished: bool = False


class EngineHandle:
    """What the server uses of an engine wherever it runs (this thread-driven AsyncEngine or the
    engine-core process's client): the life-cycle state and streaming a request's outputs.
    Subclasses set `_ready`, `_dead` (threading.Event), `_load_error`, `_dead_error`, `_stopping`,
    `_stats` (replaced, never mutated, by the thread that runs or reads the engine) and implement
    `add_request` and `abort`."""

    def stats(self) -> dict[str, Any]:
        """The latest `Engine.stats()` snapshot: refreshed after each step, in this process or the core's."""
        return self._stats

    def wait_until_loaded(self, timeout_s: float | None = None) -> bool:
        """Block until the engine is built (or failed to build); False on timeout."""
        return self._ready.wait(timeout_s)

    @property
    def is_ready(self) -> bool:
        return (self._ready.is_set() and self._load_error is None and not self._stopping
                and self._dead_error is None)

    @property
    def load_error(self) -> BaseException | None:
        return self._load_error

    @property
    def dead_error(self) -> BaseException | None:
        """The fatal error that stopped a loaded engine (None while it runs)."""
        return self._dead_error

    def wait_until_dead(self, timeout_s: float | None = None) -> bool:
        """Block until a loaded engine failed fatally; False on timeout."""
        return self._dead.wait(timeout_s)

    async def stream_outputs(self, streams: list[RequestStream]) -> AsyncIterator[RequestOutput]:
        """Yield the cumulative outputs of requests sharing one queue until all have finished.
        Leaving early (an exception, a closed iterator, a cancelled task) aborts the unfinished
        ones at once, which frees their KV blocks."""
        pending = {stream.request_id for stream in streams}
        try:
            while pending:
                item = await streams[0].queue.get()
                if isinstance(item, Finished):
                    pending.discard(item.request_id)
                    if item.error is not None:
                        raise item.error
                    continue
                yield item
        finally:
            for stream in streams:
                if not stream.finished:
                    self.abort(stream.request_id)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Add one request and yield its cumulative outputs."""
        stream = await self.add_request(request_id, prompt, params)
        async for output in self.stream_outputs([stream]):
            yield output


def freeze_startup_heap() -> None:
    """Put everything allocated so far (modules, the model's Python objects, the tokenizer: ~220k
    objects with the built-in model) out of the garbage collector's reach. A full collection walks
    them all, 130 ms on this project's 2-core CPU and ~200 ms on the GPU host, stalling every stream
    of a server each time one runs; frozen, it walks only what serving allocates (0 ms right after).
    Only for processes ondo owns (servers), never a library user's."""
    gc.collect()
    gc.freeze()


class AsyncEngine(EngineHandle):
    """Serve many concurrent asyncio requests from one Engine running on its own thread."""

    def __init__(self, engine_factory: Callable[[], Any], max_waiting: int | None = None,
                 freeze_heap: bool = False) -> None:
        """`engine_factory` builds the Engine; it runs on the engine thread (start() calls it).
        `max_waiting` bounds the requests that cannot be scheduled at once (beyond the engine's free
        `max_num_seqs` slots); more are refused with QueueFullError. `freeze_heap`: once loaded, put
        the process's objects out of the garbage collector's reach (`freeze_startup_heap`; a server)."""
        self._engine_factory = engine_factory
        self._max_waiting = max_waiting
        self._freeze_heap = freeze_heap
        self._engine: Any = None
        self._dead_error: BaseException | None = None
        self._dead = threading.Event()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._stopping = False
        self._load_error: BaseException | None = None
        self._streams: dict[str, RequestStream] = {}   # engine thread only
        self._stats: dict[str, float] = {}              # replaced (never mutated) by the engine thread
        self._thread = threading.Thread(target=self._run, name="ondo-engine", daemon=True)

    @classmethod
    def from_config(cls, config: EngineConfig, max_waiting: int | None = None,
                    freeze_heap: bool = False) -> "AsyncEngine":
        from ondo.engine.engine import Engine

        return cls(lambda: Engine(config), max_waiting=max_waiting, freeze_heap=freeze_heap)

    # ---- life cycle (any thread) ---------------------------------------------------------------

    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    @property
    def engine(self) -> Any:
        """The Engine, for read-only attributes (tokenizer, max_model_len). Never call its methods."""
        if not self._ready.is_set() or self._engine is None:
            raise EngineDeadError("the engine is not loaded")
        return self._engine

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Abort every request, stop the loop and join the thread."""
        self._stopping = True
        self._wake.set()
        # A load in progress cannot be interrupted; the daemon thread ends with the process.
        if self._ready.is_set() and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def abort_all(self) -> None:
        """Abort every request (graceful shutdown): each stream ends before a finished output,
        which callers report as finish_reason "abort"."""
        self._send(("abort_all",))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    # ---- LoRA adapters (any thread; the manager locks its registry) ---------------------------

    def _lora_manager(self) -> Any:
        return getattr(self._engine, "lora_manager", None) if self._ready.is_set() else None

    @property
    def lora_enabled(self) -> bool:
        """The engine was built with enable_lora (adapters can be loaded)."""
        return self._lora_manager() is not None

    def list_loras(self) -> list[Any]:
        """The loaded adapters (LoRARequest), in load order."""
        manager = self._lora_manager()
        if manager is None:
            return []
        return [r for r in (manager.request_for(name) for name in manager.names()) if r is not None]

    def resolve_lora(self, name: str) -> Any:
        """The loaded adapter (LoRARequest) called `name`; None if there is none."""
        manager = self._lora_manager()
        return manager.request_for(name) if manager is not None else None

    async def load_lora(self, name: str, path: str) -> Any:
        """Read the adapter folder `path` as `name` (off the event loop); LoRAError or OSError if
        it is not usable, LoRAError if the engine was built without LoRA."""
        manager = self._lora_manager()
        if manager is None:
            from ondo.lora.adapter import LoRAError

            raise LoRAError("this engine was started without LoRA (enable_lora)")
        return await asyncio.to_thread(manager.register, name, path)

    async def unload_lora(self, name: str) -> bool:
        """Forget the adapter `name` (running requests finish with it); False if it was not loaded."""
        manager = self._lora_manager()
        return manager is not None and manager.remove_adapter(name)

    # ---- requests (asyncio side) ---------------------------------------------------------------

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          output_queue: asyncio.Queue | None = None, lora_request: Any = None) -> RequestStream:
        """Hand a request to the engine (through the adapter `lora_request`, a LoRARequest; None =
        the base model); raises its add-time error (ValueError, QueueFullError)."""
        if self._dead_error is not None:
            raise EngineDeadError(f"the engine failed and the server is restarting: {self._dead_error}")
        if not self.is_ready:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, loop, output_queue or asyncio.Queue(), loop.create_future())
        self._send(("add", stream, prompt, params, lora_request))
        if self._dead.is_set():  # it died between the check above and the send
            self._refuse_queued_adds()
        try:
            await stream.added
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return stream

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # ---- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._engine = self._engine_factory()
            self._refresh_stats()
            if self._freeze_heap:
                freeze_startup_heap()
        except BaseException as exc:  # noqa: BLE001 -- reported through load_error / health
            logger.exception("the engine failed to load")
            self._load_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stopping:
                self._wake.clear()
                self._process_commands()
                if self._engine.has_unfinished_requests():
                    self._step()
                else:
                    self._wake.wait()
        except BaseException as exc:  # noqa: BLE001 -- fatal: reported through dead_error / health
            self._die(exc)
            return
        self._abort_everything(EngineDeadError("the server is shutting down"))
        self._process_commands()  # refuse adds that raced with the shutdown

    def _die(self, exc: BaseException) -> None:
        """The engine cannot go on: end every stream with an error, refuse what comes next."""
        logger.critical("the engine failed; ending %d open streams and refusing new requests",
                        len(self._streams), exc_info=exc)
        self._dead_error = exc
        error = EngineDeadError(f"the engine failed: {type(exc).__name__}: {exc}")
        for stream in list(self._streams.values()):
            stream.finished = True
            self._deliver(stream, [Finished(stream.request_id, error)])
        self._streams.clear()
        self._dead.set()
        self._refuse_queued_adds()

    def _refuse_queued_adds(self) -> None:
        """Adds queued for a dead engine: refuse them rather than leave their callers waiting."""
        error = EngineDeadError(f"the engine failed: {self._dead_error}")
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                _call_soon(command[1].loop, _refuse, command[1], error)

    def _process_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            kind = command[0]
            if kind == "add":
                self._add(*command[1:])
            elif kind == "abort":
                self._abort(command[1])
            elif kind == "abort_all":
                self._abort_everything(None)
        self._refresh_stats()

    def _add(self, stream: RequestStream, prompt: str | list[int], params: SamplingParams,
             lora_request: Any = None) -> None:
        def resolve(error: BaseException | None) -> None:
            if stream.added.done():  # the caller was cancelled while waiting
                return
            if error is None:
                stream.added.set_result(None)
            else:
                stream.added.set_exception(error)

        error: BaseException | None = None
        if self._stopping:
            error = EngineDeadError("the server is shutting down")
        elif stream.request_id in self._streams:
            error = ValueError(f"request id {stream.request_id!r} is already running")
        elif self._max_waiting is not None and self._num_unschedulable() >= self._max_waiting:
            error = QueueFullError(
                f"the server's waiting queue is full ({self._max_waiting} requests); retry later")
        else:
            try:
                if lora_request is None:   # Engine stand-ins in tests take no lora_request
                    self._engine.add_request(stream.request_id, prompt, params)
                else:
                    self._engine.add_request(stream.request_id, prompt, params, lora_request=lora_request)
                self._streams[stream.request_id] = stream
            except Exception as exc:  # noqa: BLE001 -- the caller's error, raised in its task
                error = exc
        stream.loop.call_soon_threadsafe(resolve, error)

    def _num_unschedulable(self) -> int:
        """Waiting requests beyond the free running slots: those the next steps cannot start.
        Requests that merely arrived between two steps are not "waiting" in that sense."""
        stats = self._engine.stats()
        max_num_seqs = int(getattr(getattr(self._engine, "config", None), "max_num_seqs", 0))
        free_slots = max(0, max_num_seqs - int(stats.get("num_running", 0)))
        return max(0, int(stats.get("num_waiting", 0)) - free_slots)

    def _abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return  # finished already, or never added
        self._engine.abort_request(request_id)
        stream.finished = True

    def _abort_everything(self, error: BaseException | None) -> None:
        """End every stream: with `error` raised to its caller, or (None) quietly, unfinished."""
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            try:
                self._engine.abort_request(stream.request_id)
            except Exception:  # noqa: BLE001 -- shutting down; keep ending the other streams
                logger.exception("aborting %s failed", stream.request_id)
            stream.finished = True
            self._deliver(stream, [Finished(stream.request_id, error)])

    def _step(self) -> None:
        start_s = time.perf_counter()
        outputs = self._engine.step()  # an exception here is fatal (see the module's docstring)
        if not outputs and time.perf_counter() - start_s < _EMPTY_STEP_S:
            # Nothing could be scheduled (requests waiting on each other): don't spin on the GIL.
            self._wake.wait(_EMPTY_STEP_S)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Any]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted by its caller after this step was scheduled
            items: list[Any] = [output]
            if output.finished:
                del self._streams[output.request_id]
                stream.finished = True
                items.append(Finished(output.request_id))
            by_loop.setdefault(stream.loop, []).extend((stream, item) for item in items)
        for loop, pairs in by_loop.items():
            _call_soon(loop, _deliver_all, pairs)
        self._refresh_stats()

    def _deliver(self, stream: RequestStream, items: list[Any]) -> None:
        _call_soon(stream.loop, _deliver_all, [(stream, item) for item in items])

    def _refresh_stats(self) -> None:
        stats = dict(self._engine.stats())
        stats["updated_at_s"] = time.time()
        self._stats = stats


def _refuse(stream: RequestStream, error: BaseException) -> None:
    if not stream.added.done():
        stream.added.set_exception(error)


def _deliver_all(pairs: list[tuple[RequestStream, Any]]) -> None:
    for stream, item in pairs:
        stream.queue.put_nowait(item)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # the caller's loop is closed: nobody is listening any more
