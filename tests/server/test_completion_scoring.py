"""Scoring through /v1/completions, as evaluation harnesses use it: echo + logprobs returns every
prompt token's log-prob, max_tokens=0 generates nothing, and vLLM's prompt_logprobs field works.
The scores are checked against transformers' log-softmax of the same prompt (float32, 1e-4)."""
from __future__ import annotations

import httpx
import pytest
import torch
import transformers

from live_server import sse_events

MODEL = "tiny"
PROMPT = "The capital of France is Paris, and the capital of Italy is"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def hf_model(tiny_llama_with_tokenizer):
    return tiny_llama_with_tokenizer[1]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: row i is the log-softmax that scores ids[i + 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()   # [len(ids), vocab]
    return logits.log_softmax(dim=-1)[:-1]


def test_echo_with_max_tokens_0_scores_the_prompt_like_transformers(client, hf_model, hf_tokenizer):
    ids = hf_tokenizer.encode(PROMPT)
    response = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=3, max_tokens=0)
    choice = response.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(ids) and response.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == PROMPT and len(logprobs.tokens) == len(ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(ids))]
    reference = reference_logprobs(hf_model, ids)
    expected = reference.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(logprobs.token_logprobs[1:]), expected, atol=TOLERANCE)
    for position, top in enumerate(logprobs.top_logprobs[1:]):
        best = reference[position].topk(3)
        assert len(top) in (3, 4)  # the top 3, plus the prompt's own token when it is not among them
        texts = [hf_tokenizer.decode([t]) for t in best.indices.tolist()]
        for text, value in zip(texts, best.values.tolist()):
            assert top[text] == pytest.approx(value, abs=TOLERANCE)


def test_echo_with_generation_as_lm_eval_asks(client, hf_model, hf_tokenizer):
    """lm-evaluation-harness sends token ids in a batch, echo, logprobs=1, max_tokens=1, and reads
    token_logprobs[ctxlen:-1] and whether each equals the top alternative."""
    prompts = [hf_tokenizer.encode("Question: two plus two? Answer: four"), hf_tokenizer.encode("Hello world")]
    response = client.completions.create(model=MODEL, prompt=prompts, echo=True, logprobs=1, max_tokens=1,
                                         temperature=0, seed=1234)
    choices = sorted(response.choices, key=lambda c: c.index)
    assert len(choices) == 2
    for ids, choice in zip(prompts, choices):
        logprobs = choice.logprobs
        assert len(logprobs.token_logprobs) == len(ids) + 1   # the prompt, then the generated token
        assert choice.text.startswith(hf_tokenizer.decode(ids))
        reference = reference_logprobs(hf_model, ids)
        expected = reference.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(logprobs.token_logprobs[1:len(ids)]), expected, atol=TOLERANCE)
        greedy = reference.argmax(dim=-1) == torch.tensor(ids[1:])
        for position, is_greedy in enumerate(greedy.tolist(), start=1):
            top = logprobs.top_logprobs[position]
            assert (logprobs.token_logprobs[position] == max(top.values())) == is_greedy


def test_vllm_prompt_logprobs_field(client, hf_model, hf_tokenizer):
    ids = hf_tokenizer.encode(PROMPT)
    response = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, extra_body={"prompt_logprobs": 2})
    choice = response.choices[0]
    assert choice.text == "" and choice.logprobs is None
    scores = choice.model_extra["prompt_logprobs"]
    assert len(scores) == len(ids) and scores[0] is None
    reference = reference_logprobs(hf_model, ids)
    for position, (token, entry) in enumerate(zip(ids[1:], scores[1:])):
        assert entry[str(token)]["logprob"] == pytest.approx(reference[position, token].item(), abs=TOLERANCE)
        ranked = sorted((e for e in entry.values() if e["rank"] is not None), key=lambda e: e["rank"])
        assert [e["rank"] for e in ranked] == [1, 2]
        assert ranked[0]["logprob"] == pytest.approx(reference[position].max().item(), abs=TOLERANCE)


def test_streamed_echo_carries_the_same_scores(tiny_server, client):
    body = {"model": MODEL, "prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 3, "temperature": 0}
    whole = client.completions.create(**body).choices[0]
    with httpx.stream("POST", f"{tiny_server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [e for e in sse_events(r) if e != "[DONE]"]
    choices = [c["choices"][0] for c in chunks]
    assert "".join(c["text"] for c in choices) == whole.text
    streamed = [lp for c in choices if c["logprobs"] for lp in c["logprobs"]["token_logprobs"]]
    assert streamed[0] is None and len(streamed) == len(whole.logprobs.token_logprobs)
    assert streamed[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=TOLERANCE)


@pytest.mark.parametrize("body, fragment, param", [
    ({"prompt_logprobs": 21}, "prompt_logprobs must be in [0, 20], got 21", "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs must be in [0, 20], got -1", "prompt_logprobs"),
    ({"max_tokens": -1}, "max_tokens must be >= 0 (0 = only score the prompt), got -1", "max_tokens"),
    ({"max_tokens": 0, "min_tokens": 2}, "min_tokens (2) must be <= max_tokens (0)", "min_tokens"),
])
def test_bad_scoring_options_name_the_field(tiny_server, body, fragment, param):
    response = httpx.post(f"{tiny_server.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["param"] == param


def test_return_token_ids_gives_the_ids_whole_and_streamed(client, hf_model, hf_tokenizer):
    """vLLM's return_token_ids: the prompt's ids and the generated ids (transformers' greedy ones);
    streamed, every chunk carries its new ids, tokens whose text is not complete yet included, and
    only the first carries the prompt's."""
    ids = hf_tokenizer.encode(PROMPT)
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                     pad_token_id=0)[0, len(ids):].tolist()
    options = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={
        "return_token_ids": True, "ignore_eos": True})
    choice = client.completions.create(**options).choices[0]
    assert choice.model_extra["prompt_token_ids"] == ids
    assert choice.model_extra["token_ids"] == expected
    assert choice.text == hf_tokenizer.decode(expected)

    chunks = [c.choices[0] for c in client.completions.create(**options, stream=True) if c.choices]
    assert chunks[0].model_extra["prompt_token_ids"] == ids
    assert all("prompt_token_ids" not in c.model_extra for c in chunks[1:])
    assert [t for c in chunks for t in c.model_extra["token_ids"]] == expected
    assert all(c.model_extra["token_ids"] for c in chunks)   # no chunk without a token
    assert "".join(c.text for c in chunks) == choice.text

    plain = client.completions.create(**{**options, "extra_body": {"ignore_eos": True}}).choices[0]
    assert plain.model_extra.get("token_ids") is None and plain.text == choice.text


def test_chat_return_token_ids_whole_and_streamed(client, hf_model, hf_tokenizer):
    messages = [{"role": "user", "content": "Name a color."}]
    options = dict(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                   extra_body={"return_token_ids": True, "ignore_eos": True})
    response = client.chat.completions.create(**options)
    prompt_ids = response.model_extra["prompt_token_ids"]
    rendered = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert hf_tokenizer.decode(prompt_ids) == rendered and len(prompt_ids) == response.usage.prompt_tokens
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=10, min_new_tokens=10,
                                     do_sample=False, pad_token_id=0)[0, len(prompt_ids):].tolist()
    choice = response.choices[0]
    assert choice.model_extra["token_ids"] == expected
    assert choice.message.content == hf_tokenizer.decode(expected)

    chunks = list(client.chat.completions.create(**options, stream=True))
    assert chunks[0].model_extra["prompt_token_ids"] == prompt_ids
    assert all("prompt_token_ids" not in c.model_extra for c in chunks[1:])
    streamed = [t for c in chunks for choice in c.choices for t in choice.model_extra["token_ids"]]
    assert streamed == expected
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
