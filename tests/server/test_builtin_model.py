"""The built-in model (SmolLM2-135M-Instruct GGUF, EngineConfig(model=None)) behind the server."""
from __future__ import annotations

import httpx
import openai
import pytest
import transformers

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture()
def builtin_client(builtin_server):
    return openai.OpenAI(base_url=f"{builtin_server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_chat_prompt_is_smollm2s_own_template(builtin_server, smollm2_tokenizer_dir):
    hf = transformers.AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir))
    expected = hf.encode(hf.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False)
    response = httpx.post(f"{builtin_server.url}/tokenize", json={"messages": QUESTION})
    assert response.json()["tokens"] == expected


def test_greedy_answer_ends_its_turn_and_streams_identically(builtin_client):
    model = builtin_client.models.list().data[0].id
    options = dict(model=model, messages=QUESTION, max_tokens=64, temperature=0)
    whole = builtin_client.chat.completions.create(**options)
    answer = whole.choices[0].message.content
    # An instruct model closes its turn itself (<|im_end|>) well before 64 tokens.
    assert whole.choices[0].finish_reason == "stop"
    assert answer.strip() and "<|im_end|>" not in answer
    assert whole.usage.completion_tokens < 64
    streamed = "".join(c.choices[0].delta.content or "" for c in builtin_client.chat.completions.create(
        stream=True, **options) if c.choices)
    assert streamed == answer


def test_continue_final_message_extends_the_assistant_turn(builtin_client):
    model = builtin_client.models.list().data[0].id
    messages = QUESTION + [{"role": "assistant", "content": "The capital of France is"}]
    response = builtin_client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False})
    continuation = response.choices[0].message.content
    assert continuation and not continuation.startswith("The capital")
