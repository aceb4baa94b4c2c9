"""LoRA adapters through the OpenAI client against a real server: listed as models, chosen by the
request's `model`, loaded and unloaded at run time; errors in OpenAI's shape. Every test runs against
both engines: in process (AsyncEngine) and `--engine-process` (EngineCoreClient), with the same
greedy text as `LLM` for the base model and each adapter."""
from __future__ import annotations

import httpx
import openai
import pytest

from ondo import LLM, LoRARequest, SamplingParams
from ondo.cli.options import build_parser, engine_config
from tests.lora.adapters import base_and_adapters
from tests.server.live_server import live_server

PROMPT = "w5 w9 w33 w7"


@pytest.fixture(scope="module")
def lora_adapters(tmp_path_factory):
    """A base folder, two adapter folders, and LLM's greedy text for the base, adapter a and b."""
    tmp_path = tmp_path_factory.mktemp("lora-server")
    base, adapters = base_and_adapters(tmp_path, "llama", count=2)
    folders = [str(folder) for folder, _ in adapters]
    llm = LLM(str(base), dtype="float32", device="cpu", enable_lora=True)
    params = SamplingParams(temperature=0, max_tokens=5)
    expected = [o.outputs[0].text for o in llm.generate(
        [PROMPT] * 3, params, lora_request=[None, LoRARequest("a", 1, folders[0]), LoRARequest("b", 2, folders[1])])]
    return tmp_path, base, folders, expected


@pytest.fixture(scope="module", params=[False, True], ids=["in-process", "engine-process"])
def lora_setup(request, lora_adapters):
    tmp_path, base, folders, expected = lora_adapters
    engine = {"model": str(base), "dtype": "float32", "device": "cpu", "max_model_len": 256,
              "enable_lora": True, "lora_modules": [["a", folders[0]]]}
    logs = tmp_path / ("engine-process" if request.param else "in-process")
    logs.mkdir()
    with live_server(logs, engine, served_model_name="base", engine_process=request.param) as server:
        yield server, folders, expected


def test_adapters_are_models_chosen_by_name_and_loaded_at_run_time(lora_setup):
    server, folders, (base_text, a_text, b_text) = lora_setup
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"base", "a"} and models["a"].parent == "base"

    def complete(model: str) -> str:
        response = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0)
        assert response.model == model
        return response.choices[0].text

    assert complete("base") == base_text
    assert complete("a") == a_text
    loaded = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": folders[1]})
    assert loaded.status_code == 200, loaded.text
    assert {m.id for m in client.models.list().data} == {"base", "a", "b"}
    assert complete("b") == b_text
    again = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": folders[1]})
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    assert httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "b"}).status_code == 200
    gone = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "b"})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "lora_name"
    with pytest.raises(openai.NotFoundError, match="the model 'b' does not exist"):
        complete("b")


def test_a_bad_adapter_is_refused_with_400(lora_setup, tmp_path):
    server, _, _ = lora_setup
    missing = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)})
    assert missing.status_code == 400
    assert missing.json()["error"]["message"].startswith("lora 'x': ")
    assert "not a PEFT adapter folder" in missing.json()["error"]["message"]
    extra = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "x"})
    assert extra.status_code == 400


def test_serve_flags_become_engine_options(tmp_path):
    args = build_parser().parse_args(["serve", str(tmp_path), "--lora-modules", "a=/x", "b=/y", "--max-loras", "2"])
    config = engine_config(args, args.model)
    assert config.enable_lora and config.lora_modules == (("a", "/x"), ("b", "/y")) and config.max_loras == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--lora-modules", "no-equals-sign"])
