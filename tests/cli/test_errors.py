"""Bad input ends every command with one line on stderr naming the problem, and exit status 2."""
from __future__ import annotations

import json

import pytest

from tests.cli.conftest import run_ondo


@pytest.mark.parametrize("args, message", [
    (["generate", "{model}", "hi", "--top-p", "1.5"], "error: top_p must be in (0, 1], got 1.5"),
    (["chat", "/no/such/model"], "error: model not found: /no/such/model"),
])
def test_subprocess_errors_are_one_line(cli_model, args, message):
    result = run_ondo(*[a.format(model=cli_model) for a in args])
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(message), result.stderr


@pytest.fixture(scope="module")
def unknown_architecture(tmp_path_factory):
    path = tmp_path_factory.mktemp("unknown-arch")
    (path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"}))
    return path


def test_in_process_errors_are_one_line(run_main, cli_model, tiny_llama, unknown_architecture, tmp_path):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    model = str(cli_model)
    cases = [
        (["generate", model, "hi", "--max-tokens", "abc"], "argument --max-tokens: invalid int value: 'abc'"),
        (["generate", model, "hi", "--n", 2, "--temperature", 0], "best_of must be 1 when sampling greedily"),
        (["generate", model, "hi", "--min-tokens", 9, "--max-tokens", 3], "min_tokens (9) must be <= max_tokens (3)"),
        (["generate", model, "hi", "--logit-bias", "7"], "argument --logit-bias: expected TOKEN_ID=BIAS"),
        (["generate", model, "hi", "--kv-cache-memory-bytes", "2XB"], "argument --kv-cache-memory-bytes: expected a size"),
        (["generate", model, "hi", "--block-size", 12], "block_size must be one of 8, 16, 32, 64, 128, got 12"),
        (["generate", model, "hi", "--dtype", "int3"], "dtype must be one of"),
        (["generate", model, "hi", "--max-model-len", 999999], "max_model_len must be <= the model's context length"),
        (["generate", model, "hi", "--system", "x"], "--system needs --chat"),
        (["generate", model, "a", "b"], "expected [MODEL] PROMPT, got 3 arguments"),
        (["generate", model], f"no prompt given: {model} is a path"),
        (["generate", "./typo-model.gguf"], "model not found: ./typo-model.gguf"),
        (["generate", "--prompts-file", tmp_path / "missing.txt"], "prompts file not found"),
        (["generate", model, "--prompts-file", bad_jsonl], f"{bad_jsonl}:2: \"prompt\" must be a string"),
        (["generate", unknown_architecture, "hi"], "GPTNeoXForCausalLM"),
        (["generate", model, "hi", "--checkpoint", tmp_path / "nope.pt"], "nope.pt"),
        (["generate", tiny_llama[0], "hi"], "no tokenizer"),
        (["generate", model, "hi", "--tokenizer", tmp_path / "none"], "tokenizer not found"),
        (["chat", tiny_llama[0]], "this model has no tokenizer, so it cannot chat"),
        (["chat", model, "--n", 2], "chat shows one answer per turn: n must be 1, got 2"),
        (["serve", model, "--port", 70000], "port must be in [0, 65535], got 70000"),
        (["serve", model, "--max-waiting", 0], "max_waiting must be >= 1, got 0"),
        (["serve", "/no/such/model"], "model not found: /no/such/model"),
    ]
    for args, message in cases:
        status, _, stderr = run_main(*args)
        assert status == 2, (args, stderr)
        assert stderr.startswith("error: ") and stderr.count("\n") == 1, (args, stderr)
        assert message in stderr, (args, stderr)


def test_help_documents_every_command(run_main):
    for command, must_mention in [("generate", ["--prompts-file", "--json", "--chat", "--top-p", "--max-model-len",
                                                "A lone argument"]),
                                  ("chat", ["/reset", "/system", "/exit", "Ctrl-C", "--system"]),
                                  ("serve", ["--host", "--port", "--api-key", "--max-waiting", "--served-model-name"])]:
        status, stdout, _ = run_main(command, "--help")
        assert status == 0
        text = " ".join(stdout.split())
        for phrase in must_mention + ["MODEL", "built-in"]:
            assert phrase in text, (command, phrase)
