"""Shared fixtures: tiny random-weight models saved in tmp dirs, built with transformers."""
from __future__ import annotations

import asyncio
import os

import pytest
import torch

from tests.cpu_threads import single_cpu_thread

os.environ.setdefault("ONDO_NO_PROGRESS", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


def build_tiny_llama(path, vocab_size: int = 320, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig

    fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**fields)).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(folder, transformers model) of a 2-layer random Llama without a tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    return path, build_tiny_llama(path)


def builtin_gguf_path():
    from ondo.loader import builtin_model_path

    return builtin_model_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    """The built-in model's real tokenizer (byte-level BPE, chat template) saved as an HF folder.
    ONDO_TEST_TOKENIZER_DIR: that folder, made beforehand, for a GPU machine without the model's package."""
    from pathlib import Path

    from transformers import AutoTokenizer

    if os.environ.get("ONDO_TEST_TOKENIZER_DIR"):
        return Path(os.environ["ONDO_TEST_TOKENIZER_DIR"])

    gguf = builtin_gguf_path()
    path = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_with_tokenizer(tmp_path_factory, smollm2_tokenizer_dir):
    """A 2-layer random Llama over the real SmolLM2 tokenizer: text in, text out, fast."""
    import shutil

    path = tmp_path_factory.mktemp("tiny-llama-tok")
    for item in smollm2_tokenizer_dir.iterdir():
        shutil.copy(item, path / item.name)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = build_tiny_llama(path, vocab_size=len(tokenizer), seed=5, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    return path, model


def run_async(coroutine):
    """asyncio.run in a fresh thread. Playwright's sync API (the browser tests) leaves an event loop
    marked as running in the main thread, where asyncio.run would then refuse to start."""
    import threading

    result: dict = {}

    def target():
        try:
            result["value"] = asyncio.run(coroutine)
        except BaseException as error:  # re-raised in the caller's thread
            result["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


one_cpu_thread = pytest.fixture(scope="module")(single_cpu_thread)   # opted into with usefixtures
