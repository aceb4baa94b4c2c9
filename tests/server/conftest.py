"""Fixtures: one real server per model for the whole session (starting one costs seconds)."""
from __future__ import annotations

import openai
import pytest

from live_server import TINY_CONTEXT, live_server


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_llama_with_tokenizer):
    return tiny_llama_with_tokenizer[0]


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir) -> dict:
    """EngineConfig options of the tiny model; a short context makes oversize prompts cheap."""
    return {"model": str(tiny_model_dir), "max_model_len": TINY_CONTEXT}


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory, tiny_engine):
    with live_server(tmp_path_factory.mktemp("logs"), tiny_engine, served_model_name="tiny") as server:
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
