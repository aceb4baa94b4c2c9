"""Fixtures: one real server per model for the whole session (starting one costs seconds)."""
from __future__ import annotations

import openai
import pytest

from live_server import build_tiny_llama, live_server, save_smollm2_tokenizer


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(request, tmp_path_factory):
    # Converting the GGUF vocabulary takes seconds: keep the result in pytest's cache.
    return save_smollm2_tokenizer(request.config.cache.mkdir("ondo-smollm2-tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer_dir):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory, tiny_model_dir):
    with live_server(tmp_path_factory.mktemp("logs"), {"model": str(tiny_model_dir)},
                     served_model_name="tiny") as server:
        yield server


@pytest.fixture(scope="session")
def builtin_server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("logs"), {"model": None}) as server:
        yield server


@pytest.fixture()
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture()
def async_client(tiny_server):
    return openai.AsyncOpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0, timeout=300)
