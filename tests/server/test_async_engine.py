"""AsyncEngine over a real Engine (tiny random Llama): concurrent streams, aborts, per-request errors."""
from __future__ import annotations

import asyncio
import time

import pytest

from ondo.config import EngineConfig
from ondo.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from ondo.sampling_params import SamplingParams
from tests.conftest import run_async

LONG = dict(ignore_eos=True, temperature=1.0)


@pytest.fixture(scope="module")
def engine(tiny_engine):
    engine = AsyncEngine.from_config(EngineConfig(**tiny_engine, max_num_seqs=4)).start()
    assert engine.wait_until_loaded(300) and engine.is_ready, engine.load_error
    yield engine
    engine.shutdown()


def wait_for_idle(engine: AsyncEngine, timeout_s: float = 10) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            return stats
        time.sleep(0.02)
    return engine.stats()


async def collect(engine: AsyncEngine, request_id: str, prompt, params: SamplingParams):
    outputs = [output async for output in engine.generate(prompt, params, request_id)]
    return outputs


def test_concurrent_requests_stream_cumulative_outputs(engine):
    async def main():
        return await asyncio.gather(*(collect(engine, f"r{i}", f"Prompt {i}", SamplingParams(max_tokens=6 + i, **LONG))
                                      for i in range(6)))  # more than max_num_seqs: some wait their turn

    for i, outputs in enumerate(run_async(main())):
        final = outputs[-1]
        assert final.finished and all(not o.finished for o in outputs[:-1])
        completion = final.outputs[0]
        assert completion.finish_reason == "length" and len(completion.token_ids) == 6 + i
        assert "".join(o.outputs[0].text_delta for o in outputs) == completion.text
        assert sum(len(o.outputs[0].token_ids_delta) for o in outputs) == 6 + i


def test_leaving_the_stream_aborts_and_frees_kv_blocks(engine):
    async def main():
        stream = engine.generate("Endless", SamplingParams(max_tokens=200, **LONG), "leaver")
        async for output in stream:
            if len(output.outputs[0].token_ids) >= 3:
                break
        await stream.aclose()

    run_async(main())
    stats = wait_for_idle(engine)
    assert stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"]


def test_a_bad_request_fails_alone(engine):
    too_long = list(range(1, 300))  # the tiny model's context is 256 tokens

    async def main():
        good = asyncio.ensure_future(collect(engine, "good", "Fine prompt", SamplingParams(max_tokens=8, **LONG)))
        with pytest.raises(ValueError, match="256"):
            await collect(engine, "bad", too_long, SamplingParams(max_tokens=4))
        with pytest.raises(ValueError, match="already"):
            await asyncio.gather(collect(engine, "twin", "a", SamplingParams(max_tokens=50, **LONG)),
                                 collect(engine, "twin", "b", SamplingParams(max_tokens=5, **LONG)))
        return await good

    outputs = run_async(main())
    assert outputs[-1].outputs[0].finish_reason == "length"
    assert wait_for_idle(engine)["num_free_blocks"] == engine.stats()["num_total_blocks"]


def test_full_waiting_queue_refuses_new_requests(tiny_engine):
    engine = AsyncEngine.from_config(EngineConfig(**tiny_engine, max_num_seqs=1), max_waiting=1).start()
    assert engine.wait_until_loaded(300)

    async def main():
        params = SamplingParams(max_tokens=200, **LONG)
        running = await engine.add_request("running", [1, 2, 3], params)
        waiting = await engine.add_request("waiting", [1, 2, 3], params)
        with pytest.raises(QueueFullError, match="waiting queue is full"):
            await engine.add_request("refused", [1, 2, 3], params)
        engine.abort_all()  # ends both streams quietly, unfinished
        outputs = [o async for o in engine.stream_outputs([running])] + \
                  [o async for o in engine.stream_outputs([waiting])]
        assert not any(o.finished for o in outputs)

    try:
        run_async(main())
        assert wait_for_idle(engine)["num_free_blocks"] == engine.stats()["num_total_blocks"]
    finally:
        engine.shutdown()


def test_a_failed_load_is_reported_not_raised():
    def broken():
        raise FileNotFoundError("no weights here")

    engine = AsyncEngine(broken).start()
    assert engine.wait_until_loaded(10)
    assert not engine.is_ready and isinstance(engine.load_error, FileNotFoundError)

    async def main():
        with pytest.raises(EngineDeadError):
            await engine.add_request("x", "hi", SamplingParams())

    run_async(main())


def test_requests_that_free_slots_can_take_are_not_counted_as_waiting(tiny_engine):
    # 8 slots and 2 waiting places: 10 simultaneous requests are all accepted (the 8 the next step
    # starts are not "waiting"); the 11th finds 2 that no slot can take and is refused.
    engine = AsyncEngine.from_config(EngineConfig(**tiny_engine, max_num_seqs=8), max_waiting=2).start()
    assert engine.wait_until_loaded(300)

    async def main():
        params = SamplingParams(max_tokens=200, **LONG)
        streams = await asyncio.gather(*(engine.add_request(f"r{i}", [1, 2, 3], params) for i in range(10)))
        assert len(streams) == 10
        with pytest.raises(QueueFullError, match="waiting queue is full"):
            await engine.add_request("refused", [1, 2, 3], params)
        engine.abort_all()

    try:
        run_async(main())
    finally:
        engine.shutdown()


def test_a_fatal_step_error_ends_every_stream_and_refuses_new_requests(tiny_engine):
    engine = AsyncEngine.from_config(EngineConfig(**tiny_engine, max_num_seqs=4)).start()
    assert engine.wait_until_loaded(300)
    real_step = engine.engine.step
    calls = []

    def failing_step():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("CUDA error: device-side assert triggered (injected)")
        return real_step()

    engine.engine.step = failing_step

    async def main():
        params = SamplingParams(max_tokens=200, **LONG)
        with pytest.raises(EngineDeadError, match="engine failed"):
            async for _ in engine.generate([1, 2, 3], params, "doomed"):
                pass
        with pytest.raises(EngineDeadError):
            await engine.add_request("late", [1, 2, 3], params)

    try:
        run_async(asyncio.wait_for(main(), 60))
        assert engine.wait_until_dead(1) and not engine.is_ready
        assert "device-side assert" in str(engine.dead_error)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("kind", ["in process", "engine process"])
def test_a_server_engine_freezes_the_loaded_heap(tiny_engine, kind):
    """freeze_heap (what `ondo serve` asks, for AsyncEngine and for the engine process's client):
    once loaded, a full garbage collection no longer walks the loaded modules and model; a library
    user's engine leaves the collector alone."""
    import gc

    from ondo.engine.core.client import EngineCoreClient

    engine_class = AsyncEngine if kind == "in process" else EngineCoreClient
    config = EngineConfig(**tiny_engine, max_num_seqs=1)
    assert gc.get_freeze_count() == 0
    plain = engine_class.from_config(config).start()
    try:
        assert plain.wait_until_loaded(300) and plain.is_ready and gc.get_freeze_count() == 0
    finally:
        plain.shutdown()
    server = engine_class.from_config(config, freeze_heap=True).start()
    try:
        assert server.wait_until_loaded(300) and server.is_ready
        assert gc.get_freeze_count() > 10_000   # the modules and the model (or tokenizer), at least
    finally:
        server.shutdown()
        gc.unfreeze()   # the rest of the test session collects as usual
