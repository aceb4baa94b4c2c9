"""The model's generation_config.json sampling options are the defaults of what a request leaves
unset (as vLLM applies them); the request's own values win."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

from ondo.server.params import sampling_params
from ondo.server.protocol import ChatCompletionRequest, CompletionRequest
from ondo.server.serving import ServerState


def state_for(folder) -> ServerState:
    engine = SimpleNamespace(stats=dict, engine=SimpleNamespace(config=SimpleNamespace(model=str(folder))))
    return ServerState(engine, "m", None)


def params_of(request, defaults):
    return sampling_params(request, max_tokens=4, max_tokens_field="max_tokens", logprobs=None,
                           logprobs_field="logprobs", vocab_size=100, defaults=defaults)


def test_generation_config_fills_what_the_request_leaves_unset(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(temperature=0.6, top_p=0.95, top_k=20, repetition_penalty=1.1, do_sample=True)
    (folder / "generation_config.json").write_text(json.dumps(config))
    defaults = state_for(folder).sampling_defaults
    assert defaults == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.1}

    unset = params_of(CompletionRequest(prompt="x"), defaults)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.repetition_penalty) == (0.6, 0.95, 20, 1.1)
    chosen = params_of(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], temperature=0.0,
                                             top_k=-1), defaults)
    assert (chosen.temperature, chosen.top_k, chosen.top_p) == (0.0, -1, 0.95)


def test_no_generation_config_no_defaults(tmp_path):
    assert state_for(tmp_path).sampling_defaults == {}
    assert state_for(tmp_path / "model.gguf").sampling_defaults == {}
