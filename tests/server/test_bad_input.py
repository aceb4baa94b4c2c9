"""Bad requests get OpenAI's error shape, the documented status and a message naming the field,
the allowed range and the value given -- never a 500."""
from __future__ import annotations

import httpx
import openai
import pytest

from live_server import TINY_CONTEXT, live_server

MODEL = "tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}


def post(url: str, path: str, body, **kwargs) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"}, **kwargs)
    return httpx.post(f"{url}{path}", json=body, **kwargs)


def assert_error(response: httpx.Response, status: int, *fragments: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("body, fragments, param", [
    ({**CHAT, "top_p": 1.5}, ["top_p must be in (0, 1], got 1.5"], "top_p"),
    ({**CHAT, "temperature": -1}, ["temperature must be >= 0", "-1"], "temperature"),
    ({**CHAT, "top_k": 0}, ["top_k must be -1 (off) or >= 1, got 0"], "top_k"),
    ({**CHAT, "presence_penalty": 3}, ["presence_penalty must be in [-2, 2], got 3"], "presence_penalty"),
    ({**CHAT, "repetition_penalty": 0}, ["repetition_penalty must be > 0, got 0"], "repetition_penalty"),
    ({**CHAT, "repetition_penalty": 5e-324}, ["repetition_penalty must be >= 1.175e-38", "got 5e-324"],
     "repetition_penalty"),
    ({**CHAT, "min_p": 2}, ["min_p must be in [0, 1], got 2"], "min_p"),
    ({**CHAT, "typical_p": 0}, ["typical_p must be in (0, 1]"], "typical_p"),
    ({**CHAT, "no_repeat_ngram_size": -1}, ["no_repeat_ngram_size must be >= 0, got -1"], "no_repeat_ngram_size"),
    ({**CHAT, "max_tokens": 0}, ["max_tokens must be >= 1, got 0"], "max_tokens"),
    ({**CHAT, "max_tokens": None, "max_completion_tokens": -3}, ["max_completion_tokens must be >= 1, got -3"],
     "max_completion_tokens"),
    ({**CHAT, "min_tokens": 5}, ["min_tokens (5) must be <= max_tokens (2)"], "min_tokens"),
    ({**CHAT, "logprobs": True, "top_logprobs": 21}, ["top_logprobs must be in [0, 20], got 21"], "top_logprobs"),
    ({**CHAT, "logit_bias": {"5": 101}}, ["logit_bias[5] must be in [-100, 100], got 101"], "logit_bias"),
    ({**CHAT, "logit_bias": {"999999": 1}}, ["logit_bias must hold token ids in [0, 49152), got 999999"], "logit_bias"),
    ({**CHAT, "stop_token_ids": [10**9]}, ["stop_token_ids must hold token ids in [0, 49152)"], "stop_token_ids"),
    ({**CHAT, "n": 2, "best_of": 1}, ["n must be <= best_of, got n=2, best_of=1"], "n"),
    ({**CHAT, "n": 300}, ["at most 256 sequences", "300"], "n"),
    ({**COMPLETION, "logprobs": 21}, ["logprobs must be in [0, 20], got 21"], "logprobs"),
    ({**COMPLETION, "prompt": [1, 2, 10**9]}, ["prompt must hold token ids in [0, 49152), got 1000000000"], "prompt"),
    ({**COMPLETION, "prompt": []}, ["prompt must not be empty"], "prompt"),
    ({**CHAT, "stream": True, "best_of": 3}, ["best_of > n needs stream=false"], "best_of"),
])
def test_out_of_range_values_name_field_range_and_value(tiny_server, body, fragments, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    assert_error(post(tiny_server.url, path, body), 400, *fragments, param=param)


@pytest.mark.parametrize("raw, fragments, param", [
    (b'{"model": "tiny", "messages": [', ["not valid JSON"], None),
    (b"[1, 2, 3]", ["must be a JSON object"], None),
    (b"", ["the request body is empty"], None),
    (b'{"model": "tiny"}', ["'messages' is required"], "messages"),
    (b'{"model": "tiny", "messages": "hi"}', ["'messages'", "valid list", "'hi'"], "messages"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}',
     ["'max_tokens'", "valid integer", "'5'"], "max_tokens"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
     ["'temperature'", "'hot'"], "temperature"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
     ["'stream'", "'yes'"], "stream"),
    (b'{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}', ["messages.0.role", "'wizard'"], "messages"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temprature": 1}',
     ["unknown field 'temprature'"], "temprature"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x", "mood": "happy"}]}',
     ["unknown field 'messages.0.mood'"], "messages"),
])
def test_malformed_bodies_and_wrong_types_are_400(tiny_server, raw, fragments, param):
    assert_error(post(tiny_server.url, "/v1/chat/completions", raw), 400, *fragments, param=param)


@pytest.mark.parametrize("path, raw, fragments, param", [
    ("/v1/completions", b'{"prompt": "ok \\ud800"}', ["'prompt'", "lone surrogate", "position 3"], "prompt"),
    ("/v1/completions", b'{"prompt": ["ok", "\\udfff"]}', ["'prompt.1'", "lone surrogate"], "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
     ["'messages.0.content'", "lone surrogate"], "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     ["messages[0].content[0].text", "lone surrogate"], "messages"),
])
def test_text_that_is_not_unicode_is_refused(tiny_server, path, raw, fragments, param):
    # JSON can carry lone UTF-16 surrogates; no tokenizer can encode them.
    assert_error(post(tiny_server.url, path, raw), 400, *fragments, param=param)


def test_an_unknown_model_name_that_is_not_unicode_is_still_a_404(tiny_server):
    assert_error(post(tiny_server.url, "/v1/completions", b'{"prompt": "x", "model": "\\ud800"}'), 404,
                 "does not exist", param="model")


def test_chat_template_kwargs_cannot_override_request_fields(tiny_server):
    body = {**CHAT, "chat_template_kwargs": {"add_generation_prompt": False}}
    assert_error(post(tiny_server.url, "/v1/chat/completions", body), 400,
                 "chat_template_kwargs must not set 'add_generation_prompt'", param="chat_template_kwargs")


@pytest.mark.parametrize("field, value", [   # tools and response_format are served: test_tools_server.py
    ("functions", [{"name": "f"}]),
    ("audio", {"voice": "alloy"}),
])
def test_openai_fields_ondo_lacks_are_a_clear_400(tiny_server, field, value):
    assert_error(post(tiny_server.url, "/v1/chat/completions", {**CHAT, field: value}), 400,
                 f"'{field}' is not supported by ondo", param=field)


def test_neutral_values_of_unsupported_fields_are_accepted(tiny_server):
    body = {**CHAT, "response_format": {"type": "text"}, "tool_choice": "none", "store": False, "user": "u1"}
    assert post(tiny_server.url, "/v1/chat/completions", body).status_code == 200


def test_non_text_content_parts_are_refused(tiny_server):
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    body = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "see"}, image]}]}
    assert_error(post(tiny_server.url, "/v1/chat/completions", body), 400, "messages[0].content[1]",
                 "only text", param="messages")


def test_prompts_longer_than_the_context_say_both_numbers(tiny_server):
    long_prompt = " hello" * (TINY_CONTEXT + 10)
    response = post(tiny_server.url, "/v1/completions", {**COMPLETION, "prompt": long_prompt})
    assert_error(response, 400, f"context holds {TINY_CONTEXT}", "no room left", param="prompt")
    prompt_len = len(httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": "Hi"}).json()["tokens"])
    response = post(tiny_server.url, "/v1/completions", {**COMPLETION, "max_tokens": TINY_CONTEXT})
    assert_error(response, 400, f"context holds {TINY_CONTEXT} tokens",
                 f"{prompt_len} in the prompt + {TINY_CONTEXT} max_tokens",
                 f"at most {TINY_CONTEXT - prompt_len}", param="max_tokens")


def test_unknown_model_is_404(tiny_server):
    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "Hi"}])
    assert "'gpt-5' does not exist" in error.value.body["message"]
    assert error.value.body["param"] == "model"


def test_schema_ranges_agree_with_the_server(tiny_server):
    """Every bound the OpenAPI schema documents (the playground reads them) is the server's:
    just outside is a 400 naming the field, on an inclusive bound is accepted."""
    schema = httpx.get(f"{tiny_server.url}/openapi.json").json()["components"]["schemas"]
    checked = 0
    for model, path, base in (("ChatCompletionRequest", "/v1/chat/completions", {**CHAT, "logprobs": True}),
                              ("CompletionRequest", "/v1/completions", COMPLETION)):
        for name, prop in schema[model]["properties"].items():
            if name == "seed":
                continue  # 64-bit bounds: JSON numbers that large lose precision in transit
            integer = "integer" in str(prop.get("anyOf", prop.get("type")))
            step = 1 if integer else 0.01
            for key, sign, inclusive in (("minimum", -1, True), ("exclusiveMinimum", 0, False),
                                         ("maximum", 1, True), ("exclusiveMaximum", 0, False)):
                if key not in prop:
                    continue
                bound = prop[key]
                request = {k: v for k, v in base.items()
                           if not (name == "max_completion_tokens" and k == "max_tokens")}
                outside = bound + sign * step if inclusive else bound
                assert_error(post(tiny_server.url, path, {**request, name: outside}), 400, name, param=name)
                if inclusive:
                    response = post(tiny_server.url, path, {**request, name: bound})
                    assert response.status_code == 200, (name, bound, response.text)
                checked += 1
    assert checked >= 20


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, tiny_engine):
    with live_server(tmp_path_factory.mktemp("keyed"), tiny_engine, api_key="s3cret",
                     served_model_name=MODEL) as server:
        yield server


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}])
def test_api_key_is_required_when_set(keyed_server, headers):
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION), ("/tokenize", {"prompt": "x"})):
        response = post(keyed_server.url, path, body, headers=headers)
        assert_error(response, 401, "valid API key is required")
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{keyed_server.url}/v1/models", headers=headers).status_code == 401


def test_right_api_key_is_let_in_and_health_stays_open(keyed_server):
    client = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="s3cret", max_retries=0)
    assert client.chat.completions.create(**CHAT).choices[0].message.role == "assistant"
    assert httpx.get(f"{keyed_server.url}/health").status_code == 200
    assert httpx.get(f"{keyed_server.url}/metrics").status_code == 200
    assert httpx.get(f"{keyed_server.url}/").status_code == 200
