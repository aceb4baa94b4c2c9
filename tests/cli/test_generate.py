"""`ondo generate`: streamed text, batches from files, JSON output, --chat, the built-in model."""
from __future__ import annotations

import json
import re

import pytest

from ondo import SamplingParams
from tests.cli.conftest import LiveCLI, run_ondo


def _greedy(llm, prompt, max_tokens: int) -> str:
    return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens))[0].outputs[0].text


def _line(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def test_streams_exactly_the_engines_text(cli_model, reference_llm):
    prompt = "Tell me a story about a fox"
    # `python -m ondo.cli` is the same command as `python -m ondo` and the `ondo` script.
    result = run_ondo("generate", cli_model, prompt, "--max-tokens", 12, "--temperature", 0, "--stats",
                      module="ondo.cli")
    assert result.returncode == 0, result.stderr
    assert result.stdout == _line(_greedy(reference_llm, prompt, 12))
    assert f"[model {cli_model}" in result.stderr
    prompt_tokens = len(reference_llm.tokenizer.encode(prompt))
    assert f"[{prompt_tokens} prompt tokens, 12 generated tokens, finish: length]" in result.stderr


def test_text_arrives_while_generating_and_ctrl_c_exits_130(cli_model):
    cli = LiveCLI("generate", cli_model, "Once upon a time", "--max-tokens", 4000, "--ignore-eos")
    cli.wait_for(lambda: len(cli.stdout) > 0, "the first streamed text")
    assert cli.process.poll() is None, "all the text came only at the end: nothing was streamed"
    cli.interrupt()
    assert cli.finish() == 130
    assert "Traceback" not in cli.stderr


def test_batch_from_a_text_file_and_a_jsonl_file(cli_model, reference_llm, tmp_path):
    prompts = ["The first prompt", "Another, longer prompt about the sea", "Third"]
    text_file = tmp_path / "prompts.txt"
    text_file.write_text(f"{prompts[0]}\n\n{prompts[1]}\n{prompts[2]}\n")   # blank lines are skipped
    result = run_ondo("generate", cli_model, "--prompts-file", text_file, "--max-tokens", 5, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    expected = [_greedy(reference_llm, p, 5) for p in prompts]
    assert result.stdout == "".join(f"=== prompt {i + 1}/3 ===\n{_line(t)}" for i, t in enumerate(expected))

    token_ids = reference_llm.tokenizer.encode("Token ids work too")
    messages = [{"role": "user", "content": "Hello!"}]
    jsonl = tmp_path / "prompts.jsonl"
    records = [{"prompt": p} for p in prompts] + [{"prompt": token_ids}, {"messages": messages}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_ondo("generate", cli_model, "--prompts-file", jsonl, "--max-tokens", 5, "--temperature", 0,
                      "--json", "--logprobs", 2)
    assert result.returncode == 0, result.stderr
    outputs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["request_id"] for o in outputs] == ["0", "1", "2", "3", "4"]
    assert [o["outputs"][0]["text"] for o in outputs[:3]] == expected
    assert outputs[3]["prompt_token_ids"] == token_ids
    assert outputs[4]["prompt_token_ids"] == reference_llm.tokenizer.apply_chat_template(messages)
    for output in outputs:
        completion = output["outputs"][0]
        assert output["finished"] and completion["finish_reason"] == "length"
        assert len(completion["token_ids"]) == len(completion["logprobs"]) == 5
        for token, position in zip(completion["token_ids"], completion["logprobs"]):
            assert str(token) in position and len(position) <= 3   # top 2, plus the chosen token


def test_chat_flag_renders_the_template_with_the_system_prompt(cli_model, reference_llm):
    result = run_ondo("generate", cli_model, "Hi there", "--chat", "--system", "Be terse.", "--json",
                      "--max-tokens", 3, "--n", 2, "--seed", 7)
    assert result.returncode == 0, result.stderr
    (output,) = [json.loads(line) for line in result.stdout.splitlines()]
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there"}]
    assert output["prompt_token_ids"] == reference_llm.tokenizer.apply_chat_template(messages)
    assert [len(c["token_ids"]) for c in output["outputs"]] == [3, 3]


def test_default_length_fits_a_short_context(run_main, cli_model, reference_llm):
    # The default --max-tokens (256) is longer than this context: the answer fills what is left.
    status, stdout, stderr = run_main("generate", cli_model, "Hello", "--max-model-len", 40, "--ignore-eos", "--json")
    assert status == 0, stderr
    output = json.loads(stdout)
    assert len(output["outputs"][0]["token_ids"]) == 40 - len(reference_llm.tokenizer.encode("Hello"))


@pytest.mark.slow
def test_builtin_model_runs_when_model_is_left_out():
    result = run_ondo("generate", "The capital of France is", "--max-tokens", 8, "--temperature", 0, "--stats")
    assert result.returncode == 0, result.stderr
    assert re.search(r"\[model \S*SmolLM2-135M-Instruct\S*\.gguf, loaded in", result.stderr), result.stderr
    generated = re.search(r"(\d+) generated tokens, finish: (\w+)\]", result.stderr)
    assert generated and result.stdout.strip()
    assert int(generated[1]) == 8 or generated[2] == "stop"
