"""The web playground in headless Chromium against a real server (tiny random-weight model)."""
from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.slow

REPLY = "#messages .message.assistant .content"


def fill_fields(page, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool):
            page.set_checked(f"#field-{name}", value)
        else:
            page.fill(f"#field-{name}", str(value))


def count_api_calls(page) -> list[str]:
    calls: list[str] = []
    page.on("request", lambda request: calls.append(request.url) if "/v1/" in request.url
            and request.method == "POST" else None)
    return calls


def wait_idle(server, timeout_s: float = 10) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = server.metrics()
        if metrics["ondo_num_requests_running"] == 0 or time.monotonic() > deadline:
            return metrics
        time.sleep(0.1)


def test_chat_streams_the_answer_token_by_token(page, playground_server, artifacts):
    fill_fields(page, max_tokens=24, seed=42, temperature=0.8, ignore_eos=True)
    page.fill("#system-prompt", "You are a terse assistant.")
    page.fill("#chat-input", "Tell me about the sea.")
    # Count how often the reply's text changes while it streams.
    page.evaluate("""() => {
        window.__updates = 0;
        new MutationObserver(() => { window.__updates += 1; })
            .observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    page.click("#send")
    page.wait_for_function("document.getElementById('stats').textContent.includes('tokens/s')", timeout=60_000)
    streamed = page.inner_text(REPLY)
    assert page.evaluate("window.__updates") > 10  # many small updates, not one block of text
    stats = page.inner_text("#stats")
    assert stats.startswith("24 tokens") and "first token" in stats

    # The same request through the API, whole: the page showed exactly that text.
    body = {"model": "tiny", "max_tokens": 24, "seed": 42, "temperature": 0.8, "ignore_eos": True,
            "messages": [{"role": "system", "content": "You are a terse assistant."},
                         {"role": "user", "content": "Tell me about the sea."}]}
    whole = httpx.post(f"{playground_server.url}/v1/chat/completions", json=body, timeout=60).json()
    assert streamed == whole["choices"][0]["message"]["content"]
    assert page.inner_text("#messages .message.user .body") == "Tell me about the sea."
    page.screenshot(path=str(artifacts / "playground-chat.png"), full_page=True)


def test_out_of_range_top_p_is_refused_in_the_page(page):
    calls = count_api_calls(page)
    fill_fields(page, top_p=1.5)
    page.fill("#chat-input", "Hello")
    page.click("#send")
    assert page.inner_text("#error-top_p") == "top_p must be in (0, 1], got 1.5"
    assert "invalid" in page.get_attribute("#field-top_p", "class")
    assert page.inner_text("#field-top_p + .field-error, #error-top_p")
    assert calls == []  # checked before sending
    assert page.input_value("#chat-input") == "Hello"


def test_the_servers_400_is_shown_next_to_the_field_it_names(page):
    # The page cannot know the prompt's length in tokens; the server finds the context overflow.
    fill_fields(page, max_tokens=1000)
    page.fill("#chat-input", "Hello")
    page.click("#send")
    page.wait_for_function("document.getElementById('error-max_tokens').textContent.length > 0")
    message = page.inner_text("#error-max_tokens")
    assert "context holds 256 tokens" in message and "1000 max_tokens" in message
    assert page.locator("#messages .message").count() == 0  # the failed turn is taken back
    assert page.input_value("#chat-input") == "Hello"


def test_stop_aborts_the_answer_and_the_server_frees_it(page, playground_server, artifacts):
    fill_fields(page, max_tokens=200, ignore_eos=True)
    page.fill("#chat-input", "Write a very long story.")
    page.click("#send")
    page.wait_for_function(f"(document.querySelector('{REPLY}') || {{}}).textContent?.length > 20", timeout=60_000)
    page.click("#stop")
    page.wait_for_selector("#send:not([disabled])")
    assert page.inner_text("#messages .choice .finish") == "stopped"
    assert "stopped" in page.inner_text("#stats")
    shown = page.inner_text(REPLY)
    time.sleep(0.5)
    assert page.inner_text(REPLY) == shown  # nothing arrives after Stop
    metrics = wait_idle(playground_server)
    assert metrics["ondo_num_requests_running"] == 0
    assert metrics["ondo_kv_cache_free_blocks"] == metrics["ondo_kv_cache_total_blocks"]
    page.screenshot(path=str(artifacts / "playground-stopped.png"), full_page=True)


def test_html_the_model_writes_is_shown_as_text(page, playground_server, artifacts):
    # Make the model write " <b>": bias its three tokens (most to least) and forbid any repeat,
    # so greedy decoding takes " <", then "b", then ">".
    tokens = httpx.post(f"{playground_server.url}/tokenize",
                        json={"prompt": " <b>", "add_special_tokens": False}).json()["tokens"]
    assert len(tokens) == 3
    bias = {str(token): 100 - 10 * i for i, token in enumerate(tokens)}
    fill_fields(page, max_tokens=3, temperature=0, no_repeat_ngram_size=1, ignore_eos=True,
                logit_bias=str(bias).replace("'", '"'))
    page.fill("#chat-input", "Say something bold.")
    page.click("#send")
    page.wait_for_function("document.getElementById('stats').textContent.includes('tokens')", timeout=60_000)
    assert page.inner_text(REPLY) == " <b>"
    assert page.locator("#messages b").count() == 0  # no element was made from the model's text

    page.click("#tab-completion")
    prompt = '<img src=x onerror="window.__owned = 1"><i>raw</i>'
    page.fill("#completion-prompt", prompt)
    page.check("#completion-echo")
    fill_fields(page, no_repeat_ngram_size="", logit_bias="", temperature="")
    page.click("#send")
    page.wait_for_function("document.getElementById('stats').textContent.includes('tokens')", timeout=60_000)
    assert page.inner_text("#completion-output .content").startswith(prompt)
    assert page.locator("#completion-output img, #completion-output i").count() == 0
    assert page.evaluate("window.__owned") is None
    page.screenshot(path=str(artifacts / "playground-completion.png"), full_page=True)
