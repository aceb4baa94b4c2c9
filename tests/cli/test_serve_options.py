"""`ondo serve`'s limits on clients, `ondo --help` without torch, and --tokenizer with random
weights from a config name."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.cli.conftest import ENV, REPO


def test_serve_help_documents_the_limits(run_main):
    status, stdout, _ = run_main("serve", "--help")
    assert status == 0
    text = " ".join(stdout.split())
    for flag in ("--max-request-body-bytes", "--request-timeout", "--timeout-keep-alive", "--limit-concurrency",
                 "--shutdown-timeout"):
        assert flag in text, flag


def test_bad_limits_are_one_line_errors(run_main, cli_model):
    for args, message in [(["--max-request-body-bytes", 10], "max_request_body_bytes must be >= 1024, got 10"),
                          (["--request-timeout", 0], "request_timeout_s must be > 0, got 0.0"),
                          (["--shutdown-timeout", -1], "shutdown_timeout_s must be >= 0, got -1.0")]:
        status, _, stderr = run_main("serve", cli_model, *args)
        assert status == 2, (args, stderr)
        assert stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr, (args, stderr)


def test_help_does_not_import_torch():
    code = ("import sys; from ondo.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=ENV,
                            timeout=60)
    assert "usage" in result.stdout
    assert result.stdout.strip().endswith("NO TORCH"), result.stdout[-200:]


def test_dummy_weights_from_a_config_name_take_the_tokenizer_given(monkeypatch, smollm2_tokenizer_dir):
    import torch

    from ondo.config import EngineConfig
    from ondo.loader import dummy, load_model

    tiny = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                max_position_embeddings=256)
    monkeypatch.setitem(dummy.KNOWN_CONFIGS, "tiny-test", tiny)
    config = EngineConfig(model="tiny-test", load_format="dummy", tokenizer=str(smollm2_tokenizer_dir))
    loaded, _ = load_model(config, torch.device("cpu"))
    assert loaded.tokenizer is not None
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("hello world")).endswith("hello world")
    without, _ = load_model(EngineConfig(model="tiny-test", load_format="dummy"), torch.device("cpu"))
    assert without.tokenizer is None


def test_generate_takes_sampling_defaults_from_the_generation_config(run_main, cli_model, reference_llm, tmp_path):
    import json
    import shutil

    from ondo.sampling_params import SamplingParams

    folder = tmp_path / "model"
    shutil.copytree(cli_model, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "top_k": 1, "temperature": 0.7}))
    prompt = "Tell me a story about a fox"
    greedy = reference_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    status, stdout, stderr = run_main("generate", folder, prompt, "--max-tokens", 12, "--seed", 3)
    assert status == 0, stderr
    assert stdout.rstrip("\n") == greedy.rstrip("\n")   # top_k=1 from the file: the greedy answer
    status, stdout, stderr = run_main("generate", folder, prompt, "--max-tokens", 12, "--seed", 3, "--top-k", -1,
                                      "--temperature", 1.5)
    assert status == 0, stderr
    assert stdout.rstrip("\n") != greedy.rstrip("\n")   # the flags given win over the file


def test_serve_paces_prompts_beside_decodes_by_default(run_main, cli_model, monkeypatch):
    """`ondo serve` asks for the timed prompt chunks ("auto"); a given value is kept."""
    import ondo.server

    seen = []
    monkeypatch.setattr(ondo.server, "run_server", lambda config, *args, **kwargs: seen.append(config))
    assert run_main("serve", cli_model)[0] == 0
    assert run_main("serve", cli_model, "--prefill-tokens-while-decoding", "0")[0] == 0
    assert [c.prefill_tokens_while_decoding for c in seen] == ["auto", 0]


def test_async_scheduling_is_on_off_or_the_device_default(run_main, cli_model, monkeypatch):
    import ondo.server

    seen = []
    monkeypatch.setattr(ondo.server, "run_server", lambda config, *args, **kwargs: seen.append(config))
    for flags in ([], ["--async-scheduling"], ["--no-async-scheduling"]):
        assert run_main("serve", cli_model, *flags)[0] == 0
    assert [c.async_scheduling for c in seen] == [None, True, False]
