"""The OpenAI-compatible API through the official `openai` client, against a real server."""
from __future__ import annotations

import httpx
import pytest
import torch
import transformers

MODEL = "tiny"
LONG = {"ignore_eos": True}  # random weights: never let an early EOS shorten a count


def tokenize(url: str, **body) -> list[int]:
    response = httpx.post(f"{url}/tokenize", json=body)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def test_completion_returns_text_and_exact_usage(client, tiny_server):
    prompt = "The quick brown fox"
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, extra_body=LONG)
    assert response.object == "text_completion" and response.model == MODEL
    choice = response.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert response.usage.prompt_tokens == len(tokenize(tiny_server.url, prompt=prompt))
    assert response.usage.completion_tokens == 7
    assert response.usage.total_tokens == response.usage.prompt_tokens + 7


def test_chat_prompt_is_the_models_chat_template(client, tiny_server, tiny_model_dir):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there"}]
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))
    text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected_ids = hf.encode(text, add_special_tokens=False)
    assert tokenize(tiny_server.url, messages=messages) == expected_ids

    without_prompt = hf.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert tokenize(tiny_server.url, messages=messages, add_generation_prompt=False) == \
        hf.encode(without_prompt, add_special_tokens=False)

    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, extra_body=LONG)
    assert response.object == "chat.completion"
    choice = response.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(expected_ids)
    assert response.usage.completion_tokens == 5


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streamed_text_equals_whole_text_for_the_same_seed(client, endpoint):
    options = dict(model=MODEL, max_tokens=12, seed=1234, temperature=1.0, extra_body=LONG)
    if endpoint == "chat":
        create = client.chat.completions.create
        options["messages"] = [{"role": "user", "content": "Tell me a story"}]
    else:
        create = client.completions.create
        options["prompt"] = "Once upon a time"
    whole = create(**options)
    chunks = list(create(stream=True, **options))
    if endpoint == "chat":
        whole_text = whole.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        whole_text = whole.choices[0].text
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole_text and len(whole_text) > 0
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason] == ["length"]
    assert sum(1 for c in chunks if c.choices and (c.choices[0].text if endpoint == "completions"
                                                   else c.choices[0].delta.content)) > 1  # token by token


def test_seed_makes_sampling_reproducible(client):
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="Random words:", max_tokens=10, seed=seed,
                                         temperature=1.0, extra_body=LONG).choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_n_returns_independent_choices_whole_and_streamed(client):
    options = dict(model=MODEL, prompt="Pick a word:", max_tokens=6, n=2, seed=11, extra_body=LONG)
    whole = client.completions.create(**options)
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.choices[0].text != whole.choices[1].text
    assert whole.usage.completion_tokens == 12
    streamed = {0: "", 1: ""}
    finished = {}
    for chunk in client.completions.create(stream=True, **options):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert finished == {0: "length", 1: "length"}
    assert streamed == {c.index: c.text for c in whole.choices}


def test_several_prompts_get_one_choice_each(client):
    response = client.completions.create(model=MODEL, prompt=["First", "Second prompt"], max_tokens=3, extra_body=LONG)
    assert [c.index for c in response.choices] == [0, 1]
    assert response.usage.completion_tokens == 6


def test_completion_logprobs_match_transformers(client, tiny_server, tiny_model_dir):
    prompt_ids = tokenize(tiny_server.url, prompt="The capital of France is")
    response = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=4, temperature=0,
                                         logprobs=3, extra_body=LONG)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = list(prompt_ids)
    offset = 0
    for position in range(4):
        with torch.no_grad():
            step = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        top = torch.topk(step, 3)
        chosen = int(top.indices[0])  # greedy
        assert logprobs.tokens[position] == hf.decode([chosen])
        assert logprobs.token_logprobs[position] == pytest.approx(float(step[chosen]), abs=1e-3)
        expected_top = {hf.decode([int(t)]): float(v) for t, v in zip(top.indices, top.values)}
        assert logprobs.top_logprobs[position] == pytest.approx(expected_top, abs=1e-3)
        assert logprobs.text_offset[position] == offset
        offset += len(logprobs.tokens[position])
        ids.append(chosen)
    assert response.choices[0].text == "".join(logprobs.tokens)


def test_chat_logprobs_are_ranked_and_cover_every_token(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=2, extra_body=LONG)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 5
    assert "".join(entry.token for entry in content) == response.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.token == entry.top_logprobs[0].token  # greedy takes the most likely token
        assert entry.bytes == list(entry.token.encode())


def test_stop_string_cuts_the_text_and_says_stop(client):
    # Seeded sampling: a varied text (greedy on random weights repeats one token), the same each time.
    options = dict(model=MODEL, prompt="Count:", max_tokens=10, temperature=1.0, seed=5, extra_body=LONG)
    full = client.completions.create(**options).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip() and full.index(stop) > 0, f"pick another stop string from {full!r}"
    stopped = client.completions.create(stop=[stop], **options).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[:full.index(stop)]
    assert stopped.model_extra["stop_reason"] == stop


def test_stop_token_ids_end_the_generation(client, tiny_server):
    options = dict(model=MODEL, prompt="Count:", max_tokens=8, temperature=1.0, seed=5, logprobs=0)
    tokens = client.completions.create(**options, extra_body=LONG).choices[0].logprobs.tokens
    # A generated token whose text maps back to exactly that one token id, seen there first.
    for position in range(1, len(tokens)):
        ids = tokenize(tiny_server.url, prompt=tokens[position], add_special_tokens=False)
        if len(ids) == 1 and tokens[position] not in tokens[:position]:
            break
    else:
        pytest.fail(f"no generated token maps back to one id: {tokens!r}")
    stopped = client.completions.create(**options, extra_body={**LONG, "stop_token_ids": ids}).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.model_extra["stop_reason"] == ids[0]
    assert stopped.logprobs.tokens == tokens[:position + 1]


def test_stream_usage_chunk_comes_last(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, stream=True,
        stream_options={"include_usage": True}, extra_body=LONG))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_echo_returns_the_prompt_first(client):
    for stream in (False, True):
        response = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=3, echo=True,
                                             stream=stream, extra_body=LONG)
        text = "".join(c.choices[0].text for c in response) if stream else response.choices[0].text
        assert text.startswith("Echo me") and len(text) > len("Echo me")


def test_models_health_version_tokenize_detokenize(tiny_server):
    url = tiny_server.url
    models = httpx.get(f"{url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL] and models["data"][0]["max_model_len"] == 256
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/version").json()["version"]
    tokens = tokenize(url, prompt="Hello world")
    assert httpx.post(f"{url}/detokenize", json={"tokens": tokens}).json()["prompt"] == "Hello world"
    assert httpx.get(f"{url}/docs").status_code == 200
    assert "/v1/chat/completions" in httpx.get(f"{url}/openapi.json").json()["paths"]
