"""`ondo chat` driven through a pipe: turns, /reset, /system, /exit, Ctrl-C mid-answer, end of input."""
from __future__ import annotations

import re

import pytest

from ondo import SamplingParams
from tests.cli.conftest import LiveCLI, run_ondo

STATS = re.compile(r"\[(\d+) prompt tokens, (\d+) generated tokens, finish: (\w+)")


def test_turns_reset_system_and_exit(cli_model, reference_llm):
    script = ["Hello there", "Hello there", "/reset", "Hello there", "/system Answer in French.", "Hello there",
              "/system", "/exit", "this line is never read"]
    result = run_ondo("chat", cli_model, "--temperature", 0, "--max-tokens", 6, "--stats",
                      stdin="\n".join(script) + "\n")
    assert result.returncode == 0, result.stderr
    for notice in ("[history cleared]", "[system prompt set]", "[system prompt removed]"):
        assert notice in result.stderr

    def answer(messages):
        return reference_llm.chat(messages, SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].text

    user = {"role": "user", "content": "Hello there"}
    system = {"role": "system", "content": "Answer in French."}
    first = answer([user])
    two_turns = [user, {"role": "assistant", "content": first}, user]
    second = answer(two_turns)
    # /system keeps the history (after /reset: the third turn) and puts the system prompt first.
    after_system = answer([system] + two_turns)
    # Greedy: the same conversation gives the same answer, so /reset really starts over.
    assert result.stdout == "".join(f"{text}\n" for text in (first, second, first, after_system))

    prompt_tokens = [int(m[1]) for m in STATS.finditer(result.stderr)]
    template = reference_llm.tokenizer.apply_chat_template
    assert prompt_tokens == [len(template([user])), len(template(two_turns)), len(template([user])),
                             len(template([system] + two_turns))]


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(cli_model):
    cli = LiveCLI("chat", cli_model, "--max-tokens", 4000, "--ignore-eos", "--stats")
    cli.wait_for(lambda: "[model " in cli.stderr, "the chat to start")
    cli.interrupt()   # Ctrl-C between answers does not end the chat
    for turn in (1, 2):
        before = len(cli.stdout)
        cli.send_line("Tell me a very long story")
        cli.wait_for(lambda: len(cli.stdout) > before + 20, f"answer {turn} to stream")
        cli.interrupt()
        cli.wait_for(lambda: cli.stderr.count("[answer stopped]") == turn, f"answer {turn} to stop")
        assert cli.process.poll() is None, "Ctrl-C ended the chat"
    assert cli.finish() == 0   # the end of stdin leaves cleanly
    assert "Traceback" not in cli.stderr
    turns = [(int(m[1]), int(m[2]), m[3]) for m in STATS.finditer(cli.stderr)]
    assert [reason for _, _, reason in turns] == ["abort", "abort"]
    assert all(0 < generated < 4000 for _, generated, _ in turns)
    # The partial first answer stayed in the history: the same message costs more prompt tokens.
    assert turns[1][0] > turns[0][0] + turns[0][1] // 2


@pytest.mark.slow
def test_chat_with_the_builtin_model():
    result = run_ondo("chat", "--temperature", 0, "--max-tokens", 16, "--stats",
                      "--system", "You are a calculator.", stdin="What is 2+2?\nAnd 3+3?\n")
    assert result.returncode == 0, result.stderr
    assert "SmolLM2-135M-Instruct" in result.stderr
    turns = [(int(m[1]), int(m[2])) for m in STATS.finditer(result.stderr)]
    assert len(turns) == 2 and turns[1][0] > turns[0][0] + turns[0][1]
    assert result.stdout.strip()
