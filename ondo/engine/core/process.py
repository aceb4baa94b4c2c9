"""The engine-core process: `python -m ondo.engine.core.process` (EngineCoreClient starts it).

It builds the Engine (scheduler -> model runner -> sampler), sends `Ready` (or `LoadFailed`), then
loops: drain the input socket (without blocking while requests run, with a blocking poll when idle),
add, abort and stop requests, run one `Engine.core_step()`, and send the step's token deltas in one
`CoreOutputs` message. Text is the front end's: it detokenizes, matches stop strings (sending
`StopSequences` back) and builds the RequestOutputs, so none of that slows the step loop. An error that belongs to one request goes back to that
request only (`AddError`); an exception escaping the loop sends `Dead` and exits with status 1.

It ignores SIGINT and SIGTERM: Ctrl+C in a terminal or a supervisor's stop reaches the whole process
group, and the API server must drain its streams first; it stops the core itself (`Shutdown`). The
core exits on its own when the API server process is gone (its parent pid changes).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from typing import Any

import msgspec
import zmq

from ondo.config import EngineConfig
from ondo.engine.core import messages as m

logger = logging.getLogger("ondo.engine.core")

_IDLE_POLL_MS = 500       # how often an idle core checks that its parent still lives
_PARENT_CHECK_S = 1.0     # the same while busy
_STATS_EVERY_S = 0.1
_EMPTY_STEP_S = 0.001     # a step this fast that produced nothing scheduled nothing (as AsyncEngine)


class QueueFullError(RuntimeError):
    """The name the client turns back into ondo.engine.async_engine.QueueFullError."""


class EngineCore:
    """The loop's state: the Engine, the requests it runs for the API server processes (clients),
    and `send(message, client)` (client None: to every one)."""

    def __init__(self, engine: Any, max_waiting: int | None, send: Any, num_clients: int = 1) -> None:
        self.engine, self.max_waiting, self._send = engine, max_waiting, send
        self.num_clients = num_clients
        self.running: dict[str, int] = {}   # request id -> the client it belongs to
        self.stopping = False
        self._stats_at = 0.0

    def handle(self, batch: list[m.ToCore]) -> None:
        """Apply a batch of front-end messages; answer each client's adds in one message."""
        added: dict[int, list[str]] = {}
        errors: dict[int, list[m.AddError]] = {}
        for message in batch:
            if isinstance(message, m.AddRequest):
                error = self._add(message)
                if error is None:
                    added.setdefault(message.client, []).append(message.request_id)
                else:
                    errors.setdefault(message.client, []).append(m.AddError(
                        message.request_id, type(error).__name__, str(error), isinstance(error, ValueError)))
            elif isinstance(message, m.Abort):
                for request_id in message.request_ids:
                    self._abort(request_id)
            elif isinstance(message, m.StopSequences):
                self.engine.stop_sequences(message.sequences)
                for request_id, _ in message.sequences:
                    if request_id not in self.engine.groups:   # every sequence of it has ended
                        self.running.pop(request_id, None)
            elif isinstance(message, (m.LoadLoRA, m.UnloadLoRA)):
                reply = self._change_loras(message)
                self._send(reply, message.client)
                for client in range(self.num_clients):   # the others learn the loaded set
                    if client != message.client:
                        self._send(msgspec.structs.replace(reply, call_id=-1), client)
            elif isinstance(message, m.AbortAll):
                for request_id in [r for r, c in self.running.items() if c == message.client]:
                    self._abort(request_id)
            elif isinstance(message, m.Shutdown):
                for request_id in list(self.running):
                    self._abort(request_id)
                self.stopping = True
        stats = self.stats(force=True)
        for client in set(added) | set(errors) or range(self.num_clients):
            self._send(m.CoreOutputs(added=added.get(client, []), add_errors=errors.get(client, []), stats=stats),
                       client)

    def _add(self, message: m.AddRequest) -> BaseException | None:
        if message.request_id in self.running:
            return ValueError(f"request id {message.request_id!r} is already running")
        if self.max_waiting is not None and self._num_unschedulable() >= self.max_waiting:
            return QueueFullError(
                f"the server's waiting queue is full ({self.max_waiting} requests); retry later")
        try:
            params = m.params_from_data(message.params)
            if message.lora is None:   # Engine stand-ins in tests take no lora_request
                self.engine.add_core_request(message.request_id, message.prompt, params)
            else:
                self.engine.add_core_request(message.request_id, message.prompt, params,
                                             lora_request=m.lora_from_data(message.lora))
        except Exception as exc:  # noqa: BLE001 -- that request's error, raised to its caller
            return exc
        self.running[message.request_id] = message.client
        return None

    def _change_loras(self, message: m.LoadLoRA | m.UnloadLoRA) -> m.LoRAReply:
        """Load or unload an adapter. Reading a folder runs here, between two steps: adapters are
        small next to the model, and the manager's slots belong to this thread."""
        manager = self.engine.lora_manager
        if manager is None:
            return m.LoRAReply(message.call_id, [], error_type="LoRAError", is_bad_adapter=True,
                               message="this engine was started without LoRA (enable_lora)")
        removed = False
        try:
            if isinstance(message, m.LoadLoRA):
                manager.register(message.name, message.path)
            else:
                removed = manager.remove_adapter(message.name)
        except Exception as exc:  # noqa: BLE001 -- that call's error, raised to its caller
            from ondo.lora.adapter import LoRAError

            return m.LoRAReply(message.call_id, loaded_loras(self.engine), error_type=type(exc).__name__,
                               message=str(exc), is_bad_adapter=isinstance(exc, (LoRAError, OSError)))
        return m.LoRAReply(message.call_id, loaded_loras(self.engine), removed=removed)

    def _num_unschedulable(self) -> int:
        """Waiting requests beyond the free running slots (AsyncEngine's rule)."""
        stats = self.engine.stats()
        free_slots = max(0, int(self.engine.config.max_num_seqs) - int(stats.get("num_running", 0)))
        return max(0, int(stats.get("num_waiting", 0)) - free_slots)

    def _abort(self, request_id: str) -> None:
        if self.running.pop(request_id, None) is not None:
            self.engine.abort_request(request_id)

    def step(self) -> bool:
        """One engine step; its deltas (if any) in one message. False if it did nothing."""
        start_s = time.perf_counter()
        deltas = self.engine.core_step()  # an exception here is fatal
        by_client: dict[int, list] = {}
        done = set()
        for delta in deltas:
            client = self.running.get(delta.request_id)
            if client is None:
                continue   # aborted meanwhile
            by_client.setdefault(client, []).append(delta)
            if delta.finish_reason is not None and delta.request_id not in self.engine.groups:
                done.add(delta.request_id)   # its other sequences' deltas may follow in this step
        for request_id in done:
            del self.running[request_id]
        idle = not self.engine.has_unfinished_requests()
        stats = self.stats(force=idle)
        for client in range(self.num_clients) if stats is not None else by_client:
            self._send(m.CoreOutputs(deltas=by_client.get(client, []), stats=stats), client)
        return bool(deltas) or time.perf_counter() - start_s >= _EMPTY_STEP_S

    def stats(self, force: bool) -> dict[str, Any] | None:
        now = time.monotonic()
        if not force and now - self._stats_at < _STATS_EVERY_S:
            return None
        self._stats_at = now
        stats = dict(self.engine.stats())
        stats["updated_at_s"] = time.time()
        return stats


def loaded_loras(engine: Any) -> list[m.LoRAData]:
    manager = engine.lora_manager
    if manager is None:
        return []
    return [m.lora_to_data(manager.request_for(name)) for name in manager.names()]


def serve(config: EngineConfig, input_addresses: list[str], output_addresses: list[str], parent_pid: int,
          max_waiting: int | None) -> int:
    """Run the core until Shutdown (0), a fatal error (1) or the parent's death (0). One pair of
    addresses per API server process (client): its messages come in on one socket for all, its
    outputs leave on its own."""
    context = zmq.Context()
    inputs = context.socket(zmq.PULL)
    for address in input_addresses:
        inputs.connect(address)
    outputs = []
    for address in output_addresses:
        socket = context.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, 5000)   # the last message (Dead, LoadFailed) must leave
        socket.connect(address)
        outputs.append(socket)
    codec = m.core_codec()

    def send(message: msgspec.Struct, client: int | None = None) -> None:
        data = codec.encode(message)
        for socket in outputs if client is None else (outputs[client],):
            socket.send(data, copy=False)

    try:
        return _run(config, inputs, codec, send, parent_pid, max_waiting, len(outputs))
    finally:
        inputs.close(linger=0)
        for socket in outputs:
            socket.close()
        context.term()


def _run(config: EngineConfig, inputs: zmq.Socket, codec: m.Codec, send: Any, parent_pid: int,
         max_waiting: int | None, num_clients: int) -> int:
    from ondo.engine.async_engine import freeze_startup_heap
    from ondo.engine.engine import Engine

    try:
        engine = Engine(config)
    except BaseException as exc:  # noqa: BLE001 -- reported to the front end as the load error
        logger.exception("the engine failed to load")
        send(m.LoadFailed(type(exc).__name__, str(exc)))
        return 1
    freeze_startup_heap()   # no full garbage collection walks the loaded model while serving
    send(m.Ready(model_name=str(engine.model_name), max_model_len=int(engine.max_model_len),
                 vocab_size=int(engine.vocab_size), load_time_s=float(engine.load_time_s),
                 config=msgspec.to_builtins(config), pid=os.getpid(),
                 lora_enabled=engine.lora_manager is not None, loras=loaded_loras(engine)))
    core = EngineCore(engine, max_waiting, send, num_clients)
    send(m.CoreOutputs(stats=core.stats(force=True)))   # /metrics has engine gauges before any request
    parent_checked = time.monotonic()
    try:
        while not core.stopping:
            busy = engine.has_unfinished_requests()
            batch = _drain(inputs, codec, 0 if busy else _IDLE_POLL_MS)
            if batch:
                core.handle(batch)
            if time.monotonic() - parent_checked >= _PARENT_CHECK_S or (not busy and not batch):
                parent_checked = time.monotonic()
                if os.getppid() != parent_pid:
                    logger.warning("the API server process is gone; the engine core exits")
                    return 0
            if not core.stopping and engine.has_unfinished_requests() and not core.step():
                batch = _drain(inputs, codec, 1)   # requests waiting on each other: don't spin
                if batch:
                    core.handle(batch)
    except BaseException as exc:  # noqa: BLE001 -- fatal: the front end ends every stream
        logger.critical("the engine core failed", exc_info=exc)
        send(m.Dead(type(exc).__name__, str(exc)))
        return 1
    finally:
        engine.shutdown()
    return 0


def _drain(inputs: zmq.Socket, codec: m.Codec, timeout_ms: int) -> list[m.ToCore]:
    """Every message waiting on the socket; waits up to `timeout_ms` for the first one."""
    if timeout_ms and not inputs.poll(timeout_ms):
        return []
    batch = []
    while True:
        try:
            batch.append(codec.decode(inputs.recv(zmq.NOBLOCK, copy=False).buffer))
        except zmq.Again:
            return batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ondo.engine.core.process",
                                     description="ondo's engine core (started by the API server)")
    parser.add_argument("--input", required=True, action="append",
                        help="ZeroMQ address an API server process pushes to (one per process)")
    parser.add_argument("--output", required=True, action="append",
                        help="ZeroMQ address the core pushes that process's outputs to (same order)")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--max-waiting", type=int, default=None)
    parser.add_argument("--config-file", required=True, help="the EngineConfig as a JSON file")
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with open(args.config_file, "rb") as file:
        config = msgspec.json.decode(file.read(), type=EngineConfig)
    return serve(config, args.input, args.output, args.parent_pid, args.max_waiting)


if __name__ == "__main__":
    sys.exit(main())
