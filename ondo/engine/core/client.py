"""EngineCoreClient: AsyncEngine's public API, with the Engine in a process of its own.

`start()` launches `python -m ondo.engine.core.process` (a fresh interpreter through `subprocess`,
not a multiprocessing spawn: spawn re-imports the parent's `__main__`, which for `python -c`,
pytest or an embedding program is fragile, and the core needs nothing from the parent but its
config) and talks to it through two ZeroMQ PUSH/PULL pipes on ipc:// sockets in a private temp dir:
plain-data msgspec messages (ondo.engine.core.messages), never pickles. The API server process
keeps HTTP, tokenization, chat templates and text: the core sends token ids, and this process
detokenizes, matches stop strings and builds the RequestOutputs (ondo/engine/text_output.py), so
the engine loop neither shares the GIL with the event loop nor spends its time on text.

One reader thread receives the core's messages, turns each step's deltas into outputs (its
`OutputProcessor` is touched by that thread alone: adds reach it when the core acknowledges them,
aborts through a list it drains) and hands each output to its stream's asyncio loop in one
`call_soon_threadsafe` call per loop, as AsyncEngine's thread does. A stop string ends a sequence
here; the reader tells the core (`StopSequences`). Any thread may send:
sends are serialised by a lock and never block (an unbounded queue; nothing is sent to a dead core).
When the core dies (a fatal error, or killed), every open stream ends with EngineDeadError,
`dead_error` is set and `wait_until_dead` returns, as with AsyncEngine.

LoRA adapters: the client keeps the set of loaded adapters (from `Ready`, then from every
`LoRAReply`), so `list_loras` and `resolve_lora` answer without a round trip; `load_lora` and
`unload_lora` send a call and await the core's reply to it.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import zmq

from ondo.config import EngineConfig
from ondo.engine.async_engine import (EngineDeadError, EngineHandle, Finished, QueueFullError, RequestStream,
                                      freeze_startup_heap)
from ondo.engine.core import messages as m
from ondo.engine.core.front_end import CoreEngineInfo, load_front_end_tokenizer
from ondo.engine.text_output import OutputProcessor
from ondo.lora.adapter import LoRAError
from ondo.lora.request import LoRARequest
from ondo.sampling_params import SamplingParams, SamplingParamsError

logger = logging.getLogger(__name__)

_POLL_MS = 100   # how often the reader thread checks that the core process still runs


class EngineCoreDied(RuntimeError):
    """The engine-core process failed or exited while it served (the server exits non-zero)."""


@dataclass(frozen=True)
class CoreAddresses:
    """Where API server processes and the core meet: API server i binds inputs[i] (it pushes, the core
    pulls from all) and outputs[i] (the core pushes that process's outputs there)."""
    folder: str              # holds the ipc sockets and the core's config; the first process removes it
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @classmethod
    def in_new_folder(cls, count: int) -> "CoreAddresses":
        folder = tempfile.mkdtemp(prefix="ondo-core-")
        return cls(folder, tuple(f"ipc://{folder}/input-{i}" for i in range(count)),
                   tuple(f"ipc://{folder}/output-{i}" for i in range(count)))


class EngineCoreClient(EngineHandle):
    """Serve many concurrent asyncio requests from an Engine running in the engine-core process.

    `index` 0 (the default) starts the core and owns it; with several API server processes (see
    ondo/server/api_servers.py) process i > 0 attaches to the same core through `addresses`."""

    def __init__(self, config: EngineConfig, max_waiting: int | None = None,
                 addresses: CoreAddresses | None = None, index: int = 0, freeze_heap: bool = False) -> None:
        self.config = config
        self._max_waiting = max_waiting
        self._freeze_heap = freeze_heap   # once ready: freeze_startup_heap (a server's process)
        self._addresses, self._index = addresses, index
        self.before_shutdown: Any = None       # called first by shutdown() (the other API servers drain)
        self._parent_pid = os.getppid()
        self._info: CoreEngineInfo | None = None
        self._load_error: BaseException | None = None
        self._dead_error: BaseException | None = None
        self._ready = threading.Event()
        self._dead = threading.Event()
        self._stopping = False
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()          # guards _streams, _pending_text, _forgotten and the input socket
        self._pending_text: dict[str, tuple] = {}   # request id -> OutputProcessor.add's arguments, until acknowledged
        self._forgotten: list[str] = []        # aborted request ids whose text the reader thread drops
        self._text: OutputProcessor | None = None   # the reader thread's alone
        self._stats: dict[str, Any] = {}       # replaced (never mutated) by the reader thread
        self._lora_enabled = False
        self._loras: dict[str, LoRARequest] = {}   # replaced (never mutated) by the reader thread
        self._calls: dict[int, asyncio.Future] = {}   # LoRA calls awaiting the core's reply (under _lock)
        self._next_call_id = 0
        self._process: subprocess.Popen | None = None
        self._folder: str | None = None
        self._context: zmq.Context | None = None
        self._inputs: zmq.Socket | None = None     # -> core
        self._outputs: zmq.Socket | None = None    # <- core (reader thread only)
        self._encoder = msgspec.msgpack.Encoder()
        self._thread = threading.Thread(target=self._read, name="ondo-core-reader", daemon=True)

    @classmethod
    def from_config(cls, config: EngineConfig, max_waiting: int | None = None,
                    freeze_heap: bool = False) -> "EngineCoreClient":
        return cls(config, max_waiting=max_waiting, freeze_heap=freeze_heap)

    # ---- life cycle (any thread) ---------------------------------------------------------------

    def start(self) -> "EngineCoreClient":
        addresses = self._addresses = self._addresses or CoreAddresses.in_new_folder(1)
        input_address, output_address = addresses.inputs[self._index], addresses.outputs[self._index]
        self._context = zmq.Context()
        self._inputs = self._context.socket(zmq.PUSH)
        self._inputs.setsockopt(zmq.SNDHWM, 0)    # never block the event loop on a busy core
        self._inputs.setsockopt(zmq.LINGER, 0)
        self._inputs.bind(input_address)
        self._outputs = self._context.socket(zmq.PULL)
        self._outputs.setsockopt(zmq.RCVHWM, 0)
        self._outputs.bind(output_address)
        if self._index > 0:   # the first API server process runs the core
            self._thread.start()
            return self
        self._folder = addresses.folder
        config_path = Path(self._folder) / "config.json"
        config_path.write_bytes(msgspec.json.encode(self.config))
        command = [sys.executable, "-m", "ondo.engine.core.process", "--parent-pid", str(os.getpid()),
                   "--config-file", str(config_path)]
        for pair in zip(addresses.inputs, addresses.outputs):
            command += ["--input", pair[0], "--output", pair[1]]
        if self._max_waiting is not None:
            command += ["--max-waiting", str(self._max_waiting)]
        self._process = subprocess.Popen(command)   # its logs go where the server's go
        logger.info("engine core process started (pid %d)", self._process.pid)
        atexit.register(self._kill_core)
        self._thread.start()
        return self

    @property
    def core_pid(self) -> int | None:
        """The engine-core process's pid (None before start, or before Ready in an attached process)."""
        if self._process is not None:
            return self._process.pid
        return self._info.pid if self._info is not None else None

    @property
    def engine(self) -> CoreEngineInfo:
        """What the server reads of the Engine: tokenizer, vocab_size, max_model_len, model_name,
        load_time_s, config (adapters: `list_loras`, `resolve_lora`, never `engine.lora_manager`)."""
        if not self._ready.is_set() or self._info is None:
            raise EngineDeadError("the engine is not loaded")
        return self._info

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Abort every request, stop the core process and the reader thread."""
        if self.before_shutdown is not None:
            self.before_shutdown()
        self._stopping = True
        process = self._process
        if process is None:   # attached (or never started): the first API server process stops the core
            if self._thread.is_alive() and threading.current_thread() is not self._thread:
                self._thread.join(timeout_s)
            return
        if self._ready.is_set() and self._info is not None:
            self._send(m.Shutdown())
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("the engine core did not stop within %.0f s; killing it", timeout_s)
        self._kill_core()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def abort_all(self) -> None:
        """Abort every request (graceful shutdown): each stream ends before a finished output,
        which callers report as finish_reason "abort"."""
        with self._lock:
            streams = list(self._streams.values())
            self._forgotten.extend(self._streams)
            self._streams.clear()
            self._pending_text.clear()
            self._send_locked(m.AbortAll(client=self._index))
        error = EngineDeadError("the server is shutting down")
        for stream in streams:
            stream.finished = True
            _call_soon(stream.loop, _end, stream, None, error)

    def abort(self, request_id: str) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
            if stream is None:
                return  # finished already, or never added
            stream.finished = True
            self._pending_text.pop(request_id, None)
            self._forgotten.append(request_id)
            self._send_locked(m.Abort([request_id]))

    # ---- LoRA adapters -------------------------------------------------------------------------

    @property
    def lora_enabled(self) -> bool:
        """The engine was built with enable_lora (adapters can be loaded)."""
        return self._lora_enabled

    def list_loras(self) -> list[LoRARequest]:
        """The loaded adapters, in load order."""
        return list(self._loras.values())

    def resolve_lora(self, name: str) -> LoRARequest | None:
        """The loaded adapter called `name` (None if there is none)."""
        return self._loras.get(name)

    async def load_lora(self, name: str, path: str) -> LoRARequest:
        """Read the adapter folder `path` in the core as `name`; LoRAError if it is not usable."""
        reply = await self._lora_call(lambda call_id: m.LoadLoRA(call_id, name, str(path), client=self._index))
        return _lora_requests(reply.loras)[name]

    async def unload_lora(self, name: str) -> bool:
        """Forget the adapter `name` (running requests finish with it); False if it was not loaded."""
        reply = await self._lora_call(lambda call_id: m.UnloadLoRA(call_id, name, client=self._index))
        return reply.removed

    async def _lora_call(self, build: Any) -> m.LoRAReply:
        """Send a LoRA message and await the core's LoRAReply to it; raises the error it reports."""
        if not self.is_ready:
            raise EngineDeadError("the engine is not running")
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._dead_error is not None:
                raise EngineDeadError(f"the engine failed: {self._dead_error}")
            self._next_call_id += 1
            call_id = self._next_call_id
            self._calls[call_id] = future
            self._send_locked(build(call_id))
        try:
            return await future
        finally:
            with self._lock:
                self._calls.pop(call_id, None)

    # ---- requests (asyncio side) ---------------------------------------------------------------

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          output_queue: asyncio.Queue | None = None,
                          lora_request: LoRARequest | None = None) -> RequestStream:
        """Hand a request to the core (through the adapter `lora_request`, None = the base model);
        raises its add-time error (ValueError, LoRAError, QueueFullError)."""
        if self._dead_error is not None:
            raise EngineDeadError(f"the engine failed and the server is restarting: {self._dead_error}")
        if not self.is_ready:
            raise EngineDeadError("the engine is not running")
        data = m.params_to_data(params)   # SamplingParamsError for a processor the core cannot import
        tokenizer = self.engine.tokenizer
        if isinstance(prompt, str) and tokenizer is not None:   # the core gets token ids (the server sends ids)
            prompt_text, prompt = prompt, tokenizer.encode(prompt)
        else:
            prompt_text = None
        ids = prompt if isinstance(prompt, str) else [int(t) for t in prompt]
        message = m.AddRequest(request_id, ids, data, m.lora_to_data(lora_request), client=self._index)
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, loop, output_queue or asyncio.Queue(), loop.create_future())
        with self._lock:
            if self._dead_error is not None:   # checked under the lock that _die takes
                raise EngineDeadError(f"the engine failed and the server is restarting: {self._dead_error}")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = stream
            if not isinstance(ids, str):   # a text prompt without a tokenizer: the core refuses it
                self._pending_text[request_id] = (request_id, prompt_text, ids, params)
            self._send_locked(message)
        try:
            await stream.added
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return stream

    def _send(self, message: msgspec.Struct) -> None:
        with self._lock:
            self._send_locked(message)

    def _send_locked(self, message: msgspec.Struct) -> None:
        if self._inputs is None or self._inputs.closed or not self._ready.is_set() or self._dead.is_set():
            return  # no core to hear it: the streams are ended by the reader thread
        try:
            self._inputs.send(self._encoder.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            pass    # the core went away between two checks; the reader thread reports it

    # ---- the reader thread ---------------------------------------------------------------------

    def _read(self) -> None:
        codec = m.client_codec()
        try:
            tokenizer = load_front_end_tokenizer(self.config)
        except BaseException as exc:  # noqa: BLE001 -- reported through load_error / health
            logger.exception("the tokenizer failed to load")
            self._fail_load(exc)
            return
        try:
            while True:
                message = self._receive(codec)
                if message is None:
                    return
                if isinstance(message, m.Ready):
                    self._info = CoreEngineInfo(tokenizer, message.vocab_size, message.max_model_len,
                                                message.model_name, message.load_time_s, self.config,
                                                message.pid)
                    self._text = OutputProcessor(tokenizer, message.max_model_len)
                    self._lora_enabled = message.lora_enabled
                    self._loras = _lora_requests(message.loras)
                    logger.info("the engine core is ready (%s, loaded in %.1f s)",
                                message.model_name, message.load_time_s)
                    if self._freeze_heap:
                        freeze_startup_heap()
                    self._ready.set()
                elif isinstance(message, m.LoadFailed):
                    self._fail_load(RuntimeError(message.message))   # the server shows its text
                    return
                elif isinstance(message, m.CoreOutputs):
                    self._dispatch(message)
                elif isinstance(message, m.LoRAReply):
                    self._answer(message)
                elif isinstance(message, m.Dead):
                    self._die(EngineCoreDied(f"{message.error_type}: {message.message}"))
                    return
        finally:
            self._outputs.close(linger=0)
            if self._inputs is not None:
                with self._lock:
                    self._inputs.close(linger=0)
            self._context.term()
            if self._folder is not None:
                shutil.rmtree(self._folder, ignore_errors=True)

    def _receive(self, codec: m.Codec) -> Any:
        """The core's next message; None once the process has exited and its messages are read."""
        while True:
            if self._outputs.poll(_POLL_MS):
                return codec.decode(self._outputs.recv(copy=False).buffer)
            if self._process is None and self._stopping:   # attached: the core goes on for the others
                self._end_all(EngineDeadError("the server is shutting down"))
                return None
            status = self._process.poll() if self._process is not None else self._attached_core_status()
            if status is None:
                continue
            if self._outputs.poll(0):   # it exited: read what it sent last (Dead, LoadFailed)
                continue
            if self._stopping:
                self._end_all(EngineDeadError("the server is shutting down"))
            elif not self._ready.is_set():
                self._fail_load(EngineCoreDied(f"the engine core process exited while loading "
                                               f"({_describe(status)})"))
            else:
                self._die(EngineCoreDied(f"the engine core process exited ({_describe(status)})"))
            return None

    def _attached_core_status(self) -> int | None:
        """None while the core (or, before Ready, the process that starts it) lives; else a status."""
        if self._info is None:
            return None if os.getppid() == self._parent_pid else -signal.SIGKILL
        return None if _alive(self._info.pid) else -signal.SIGKILL

    def _fail_load(self, error: BaseException) -> None:
        self._load_error = error
        self._ready.set()
        self._kill_core()

    def _dispatch(self, message: m.CoreOutputs) -> None:
        if message.stats is not None:
            self._stats = message.stats
        calls: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Any]]] = {}
        text = self._text
        with self._lock:
            for request_id in message.added:
                stream = self._streams.get(request_id)
                pending = self._pending_text.pop(request_id, None)
                if stream is not None:
                    if pending is not None:
                        text.add(*pending)
                    _call_soon(stream.loop, _resolve, stream, None)
            for error in message.add_errors:
                self._pending_text.pop(error.request_id, None)
                stream = self._streams.pop(error.request_id, None)
                if stream is not None:
                    stream.finished = True
                    _call_soon(stream.loop, _resolve, stream, _add_error(error))
            forgotten, self._forgotten = self._forgotten, []
        for request_id in forgotten:
            text.forget(request_id)
        outputs, stopped = text.process(message.deltas)   # detokenizing: outside the lock
        with self._lock:
            if stopped:
                self._send_locked(m.StopSequences(stopped))
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue  # aborted by its caller after this step was scheduled
                items: list[Any] = [output]
                if output.finished:
                    del self._streams[output.request_id]
                    stream.finished = True
                    items.append(Finished(output.request_id))
                calls.setdefault(stream.loop, []).extend((stream, item) for item in items)
        for loop, pairs in calls.items():
            _call_soon(loop, _deliver_all, pairs)

    def _answer(self, reply: m.LoRAReply) -> None:
        self._loras = _lora_requests(reply.loras)
        with self._lock:
            future = self._calls.pop(reply.call_id, None)
        if future is None:
            return   # its caller was cancelled
        if reply.error_type is None:
            _call_soon(future.get_loop(), _settle, future, reply, None)
        else:
            error = (LoRAError(reply.message) if reply.is_bad_adapter
                     else RuntimeError(f"{reply.error_type}: {reply.message}"))
            _call_soon(future.get_loop(), _settle, future, None, error)

    def _die(self, error: BaseException) -> None:
        """The core cannot go on: end every stream with an error, refuse what comes next."""
        with self._lock:
            self._dead_error = error
            count = len(self._streams)
        logger.critical("the engine core failed (%s); ending %d open streams", error, count)
        self._end_all(EngineDeadError(f"the engine failed: {error}"))
        self._dead.set()
        self._kill_core()

    def _end_all(self, error: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
            calls = list(self._calls.values())
            self._calls.clear()
        for future in calls:
            _call_soon(future.get_loop(), _settle, future, None, error)
        for stream in streams:
            stream.finished = True
            _call_soon(stream.loop, _end, stream, error, error)

    def _kill_core(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                pass


def _alive(pid: int) -> bool:
    """The process runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        if os.path.isdir("/proc"):
            return False
    try:   # no /proc: ask the kernel
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _lora_requests(loras: list[m.LoRAData]) -> dict[str, LoRARequest]:
    return {data.name: m.lora_from_data(data) for data in loras}


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():   # the caller was cancelled while waiting
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _add_error(error: m.AddError) -> BaseException:
    """The core's add-time error as the exception AsyncEngine would have raised to the caller."""
    if error.error_type == "QueueFullError":
        return QueueFullError(error.message)
    if error.error_type == "SamplingParamsError":
        return SamplingParamsError(error.message)
    if error.error_type == "LoRAError":
        return LoRAError(error.message)
    if error.is_value_error:
        return ValueError(error.message)
    return RuntimeError(f"{error.error_type}: {error.message}")


def _describe(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"status {status}"


def _resolve(stream: RequestStream, error: BaseException | None) -> None:
    if stream.added.done():  # the caller was cancelled while waiting
        return
    if error is None:
        stream.added.set_result(None)
    else:
        stream.added.set_exception(error)


def _end(stream: RequestStream, error: BaseException | None, add_error: BaseException) -> None:
    """End a stream: refuse its add if the caller still waits on it, else finish its queue."""
    if not stream.added.done():
        stream.added.set_exception(add_error)
    else:
        stream.queue.put_nowait(Finished(stream.request_id, error))


def _deliver_all(pairs: list[tuple[RequestStream, Any]]) -> None:
    for stream, item in pairs:
        stream.queue.put_nowait(item)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # the caller's loop is closed: nobody is listening any more
