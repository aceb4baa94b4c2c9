"""Structured output and forced tool calls on the built-in model behind a real `ondo serve`, through
the official `openai` client: ten schemas of the suite at once (continuous batching), chat and
completions, greedy and sampled; every output validates."""
from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from tests.conftest import run_async
from tests.sample.json_schemas import SCHEMAS, prompt_for

pytestmark = pytest.mark.slow

SUBSET = SCHEMAS[::4]   # ten schemas spread over the suite
MAX_TOKENS = 96


@pytest.fixture()
def builtin_async(builtin_server):
    return openai.AsyncOpenAI(base_url=f"{builtin_server.url}/v1", api_key="unused", max_retries=0, timeout=300)


async def _one(client, model: str, index: int, name: str, schema: dict) -> tuple[str, str, str]:
    if index % 2 == 0:   # chat, OpenAI's response_format, greedy
        response = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt_for(name)}], max_tokens=MAX_TOKENS,
            temperature=0, response_format={"type": "json_schema",
                                            "json_schema": {"name": name, "schema": schema, "strict": True}})
        choice = response.choices[0]
        return name, choice.message.content, choice.finish_reason
    response = await client.completions.create(   # completions, vLLM's guided_json, sampled
        model=model, prompt=prompt_for(name), max_tokens=MAX_TOKENS, temperature=0.8, seed=index,
        extra_body={"guided_json": schema})
    return name, response.choices[0].text, response.choices[0].finish_reason


def test_ten_schemas_at_once_through_the_server(builtin_async):
    async def run():
        model = (await builtin_async.models.list()).data[0].id
        return await asyncio.gather(*[_one(builtin_async, model, i, name, schema)
                                      for i, (name, schema) in enumerate(SUBSET)])

    results = run_async(run())
    schemas = dict(SUBSET)
    failures = []
    for name, text, finish_reason in results:
        try:
            jsonschema.validate(json.loads(text), schemas[name])
        except (json.JSONDecodeError, jsonschema.ValidationError) as error:
            failures.append(f"{name} ({finish_reason}): {text!r}: {error}")
    assert not failures, f"{len(failures)} of {len(results)} invalid:\n" + "\n".join(failures)


def test_forced_tool_call_on_the_builtin_model(builtin_server):
    client = openai.OpenAI(base_url=f"{builtin_server.url}/v1", api_key="unused", max_retries=0, timeout=300)
    parameters = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                  "required": ["city"]}
    options = dict(model=client.models.list().data[0].id, temperature=0, max_tokens=40,
                   messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                   tools=[{"type": "function", "function": {"name": "get_weather", "parameters": parameters}}],
                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**options).choices[0]
    assert whole.finish_reason == "tool_calls" and len(whole.message.tool_calls) == 1
    call = whole.message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), parameters)
    chunks = list(client.chat.completions.create(stream=True, **options))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and deltas[0].function.arguments == ""
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
