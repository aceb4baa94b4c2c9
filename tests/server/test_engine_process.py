"""`ondo serve --engine-process`: the engine core in a process of its own answers as the in-process
server does (greedy tokens, n=2 with a seed, 400s; the tiny model, and the built-in GGUF model whose
tokenizer the front end reads without its weights), a client disconnect aborts its request in the
core, the LoRA routes of a server without LoRA answer 400 as in process, and a killed core ends open
streams, turns /health 503 and exits 1. LoRA adapters through the core: tests/lora/test_lora_server.py.

One engine-process server of the tiny model serves the module; the last test kills its core."""
from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest

from live_server import child_processes, live_server, sse_events, statuses_until_exit

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def core_server(tmp_path_factory, tiny_engine):
    with live_server(tmp_path_factory.mktemp("logs"), tiny_engine, engine_process=True) as server:
        yield server


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def core_pid(server_pid: int) -> int:
    """The engine-core process: the server's child running ondo.engine.core.process."""
    for pid, cmdline in child_processes(server_pid).items():
        if b"ondo.engine.core.process" in cmdline:
            return pid
    raise AssertionError(f"no engine-core child of {server_pid}")


def test_the_engine_runs_in_a_child_process(core_server):
    assert core_pid(core_server.process.pid) != core_server.process.pid


def test_streamed_completion_equals_the_in_process_servers(core_server, tiny_server):
    options = dict(prompt="The capital of France is", max_tokens=12, temperature=0, logprobs=1)
    expected = _client(tiny_server).completions.create(model=_model(tiny_server), **options)
    chunks = list(_client(core_server).completions.create(model=_model(core_server), stream=True, **options))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == expected.choices[0].logprobs.tokens
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.choices[0].text
    assert chunks[-1].choices[0].finish_reason == expected.choices[0].finish_reason


def test_chat_completion_equals_the_in_process_servers(core_server, tiny_server):
    options = dict(messages=QUESTION, max_tokens=12, temperature=0)
    expected = _client(tiny_server).chat.completions.create(model=_model(tiny_server), **options)
    answer = _client(core_server).chat.completions.create(model=_model(core_server), **options)
    assert answer.choices[0].message.content == expected.choices[0].message.content
    assert answer.usage == expected.usage


def test_n_2_with_a_seed_equals_the_in_process_servers(core_server, tiny_server):
    options = dict(prompt="Once upon a time", max_tokens=8, temperature=1.0, n=2, seed=11)
    expected = _client(tiny_server).completions.create(model=_model(tiny_server), **options)
    answer = _client(core_server).completions.create(model=_model(core_server), **options)
    assert len(answer.choices) == 2
    assert [c.text for c in answer.choices] == [c.text for c in expected.choices]


def _middle(text: str) -> str:
    """Two characters from the middle of `text`: a stop string the output is sure to meet."""
    assert len(text.strip()) >= 4, text
    return text[len(text) // 2:len(text) // 2 + 2]


def _choices(server, stream: bool, **options) -> list[tuple]:
    """(text, finish_reason, logprob tokens) per choice, from one call or a whole stream."""
    client = _client(server)
    if not stream:
        answer = client.completions.create(model=_model(server), **options)
        return [(c.text, c.finish_reason, c.logprobs and c.logprobs.tokens) for c in answer.choices]
    parts: dict[int, list] = {}
    for chunk in client.completions.create(model=_model(server), stream=True, **options):
        for c in chunk.choices:
            text, reason, tokens = parts.setdefault(c.index, ["", None, None])
            tokens = (tokens or []) + c.logprobs.tokens if c.logprobs else tokens
            parts[c.index] = [text + c.text, c.finish_reason or reason, tokens]
    return [tuple(parts[i]) for i in sorted(parts)]


def test_stop_strings_logprobs_and_best_of_equal_the_in_process_servers(core_server, tiny_server):
    """The front end detokenizes and matches stop strings for the core: the same text, finish reasons
    and log-prob tokens as the in-process engine, streamed or not."""
    prompt = "Once upon a time"
    greedy = _client(tiny_server).completions.create(model=_model(tiny_server), prompt=prompt, max_tokens=16,
                                                    temperature=0).choices[0].text
    sampled = _client(tiny_server).completions.create(model=_model(tiny_server), prompt=prompt, max_tokens=16,
                                                     temperature=1.0, n=2, seed=3)
    cases = [
        dict(temperature=0, stop=[_middle(greedy)], logprobs=2),
        dict(temperature=0, stop=[_middle(greedy)], extra_body={"include_stop_str_in_output": True}),
        # the two sequences meet different stops: one ends at its stop, the other runs on to its own
        dict(temperature=1.0, n=2, seed=3, stop=[_middle(sampled.choices[0].text), _middle(sampled.choices[1].text)]),
        dict(temperature=1.0, n=2, best_of=3, seed=5, logprobs=1),
    ]
    for options in cases:
        expected = _choices(tiny_server, False, prompt=prompt, max_tokens=16, **options)
        assert any(reason == "stop" for _, reason, _ in expected) or "best_of" in options, options
        for stream in (False, True):
            if stream and "best_of" in options:
                continue   # best_of > n is not streamed
            assert _choices(core_server, stream, prompt=prompt, max_tokens=16, **options) == expected, options


def test_the_front_end_tokenizer_of_the_builtin_model_is_the_engines(builtin_server):
    """The front end reads the GGUF's tokenizer without its weights; it must tokenize (chat
    template included) as the in-process server's Engine does."""
    from ondo.config import EngineConfig
    from ondo.engine.core.front_end import load_front_end_tokenizer

    tokenizer = load_front_end_tokenizer(EngineConfig())
    text = "The capital of France is Paris. <|im_end|> Ünïcödé 123"
    expected = httpx.post(f"{builtin_server.url}/tokenize", json={"prompt": text}).json()["tokens"]
    assert tokenizer.encode(text) == expected
    expected_chat = httpx.post(f"{builtin_server.url}/tokenize", json={"messages": QUESTION}).json()["tokens"]
    rendered = tokenizer.render_chat(QUESTION, add_generation_prompt=True)
    assert tokenizer.encode(rendered, add_special_tokens=False) == expected_chat


@pytest.mark.parametrize("body", [
    {"prompt": "x", "top_p": 1.5},
    {"prompt": "x", "max_tokens": 10 ** 6},
    {"prompt": [[10 ** 7]]},
    {"prompt": "x", "logit_bias": {"99999999": 1}},
])
def test_a_bad_option_gets_the_same_400(core_server, tiny_server, body):
    expected = httpx.post(f"{tiny_server.url}/v1/completions", json=body, timeout=60)
    answer = httpx.post(f"{core_server.url}/v1/completions", json=body, timeout=60)
    assert expected.status_code == 400, expected.text
    assert (answer.status_code, answer.json()) == (expected.status_code, expected.json())


def test_a_client_disconnect_aborts_the_request_in_the_core(core_server):
    body = {"model": _model(core_server), "prompt": "Count:", "max_tokens": 240, "ignore_eos": True,
            "stream": True}
    # How long the whole request takes, read to its end (a few events' arrival times would say
    # nothing: the first ones can wait in the socket buffer and arrive together).
    start_s = time.monotonic()
    with httpx.stream("POST", f"{core_server.url}/v1/completions", json=body, timeout=60) as response:
        assert sum(1 for _ in sse_events(response)) > 1
    whole_s = time.monotonic() - start_s
    with httpx.stream("POST", f"{core_server.url}/v1/completions", json=body, timeout=60) as response:
        events = sse_events(response)
        next(events)
        assert _wait_for_running(core_server, 1)
        closed_s = time.monotonic()
    assert _wait_for_running(core_server, 0), "the core still runs the abandoned request"
    # Finishing the 240 tokens would take far longer than the abort did.
    assert time.monotonic() - closed_s < 0.5 * whole_s, (time.monotonic() - closed_s, whole_s)


def test_lora_routes_without_lora_answer_400_as_in_process(core_server, tiny_server):
    for server in (core_server, tiny_server):
        for route, body in (("load_lora_adapter", {"lora_name": "a", "lora_path": "/nowhere"}),
                            ("unload_lora_adapter", {"lora_name": "a"})):
            response = httpx.post(f"{server.url}/v1/{route}", json=body)
            assert response.status_code == 400, (route, response.text)
            assert "started without LoRA" in response.json()["error"]["message"]
    assert [m.id for m in _client(core_server).models.list().data] == [_model(core_server)]


def test_a_killed_core_ends_streams_turns_health_503_and_exits_1(core_server):
    """Last: it ends the module's server."""
    server = core_server
    body = {"prompt": "Doomed", "max_tokens": 240, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        events = sse_events(response)
        next(events)
        os.kill(core_pid(server.process.pid), signal.SIGKILL)
        rest = list(events)
    assert rest[-1] == "[DONE]"
    assert "engine failed" in rest[-2]["error"]["message"]
    statuses = statuses_until_exit(server)
    assert server.process.wait(15) == 1
    assert statuses <= {503}, statuses
    assert "SIGKILL" in server.log_tail()


def _model(server) -> str:
    return httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]


def _wait_for_running(server, count: int, timeout_s: float = 15) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.metrics().get("ondo_num_requests_running") == count:
            return True
        time.sleep(0.05)
    return False
