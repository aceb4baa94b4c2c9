"""The offline API: `LLM(model=...).generate(prompts, params)` and `.chat(messages, params)`."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

from ondo.config import EngineConfig
from ondo.engine.engine import Engine, RequestError
from ondo.outputs import RequestOutput
from ondo.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Loads a model once and generates for batches of prompts with continuous batching.

    `model`: an HF model folder, a .gguf file, or None for the built-in SmolLM2-135M-Instruct.
    Every other keyword is an `EngineConfig` field (dtype, max_model_len, checkpoint, ...).
    """

    def __init__(self, model: str | None = None, **engine_options):
        self.engine = Engine(EngineConfig(model=model, **engine_options))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt] | dict,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 lora_request=None) -> list[RequestOutput]:
        """Outputs in the order of the prompts. A single prompt may be a string or a list of token ids.
        `lora_request`: a `LoRARequest` for every prompt, or a list with one (or None) per prompt."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        return self._run(list(zip(prompts, params)), _as_lora_list(lora_request, len(prompts)))

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params=None, *,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} messages) or a list of conversations."""
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer, so it cannot chat")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if self.tokenizer.chat_template is None:
            # A base model has no chat format: it gets the messages' text as a raw prompt.
            prompts = ["\n\n".join(str(m.get("content", "")) for m in conversation) for conversation in conversations]
        else:
            prompts = [self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **(chat_template_kwargs or {}))
                for conversation in conversations]
        return self._run(list(zip(prompts, _as_params_list(sampling_params, len(prompts)))))

    def _run(self, work: list[tuple[Prompt, SamplingParams]], loras: list | None = None) -> list[RequestOutput]:
        ids = [f"offline-{next(self._ids)}" for _ in work]
        added = []
        try:
            for request_id, (prompt, params), lora in zip(ids, work, loras or [None] * len(work)):
                self.engine.add_request(request_id, prompt, params, lora_request=lora)
                added.append(request_id)
        except Exception:
            for request_id in added:   # a bad prompt fails the call, leaving the engine clean
                self.engine.abort_request(request_id)
            raise
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for output in self.engine.step():
                if output.finished:
                    final[output.request_id] = output
        return [final[i] for i in ids]


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, dict):
        return [prompts["prompt_token_ids"] if "prompt_token_ids" in prompts else prompts["prompt"]]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]   # one prompt given as token ids
    return [p["prompt_token_ids"] if isinstance(p, dict) and "prompt_token_ids" in p else
            p["prompt"] if isinstance(p, dict) else p for p in prompts]


def _as_lora_list(lora_request, count: int) -> list:
    if lora_request is None or not isinstance(lora_request, (list, tuple)):
        return [lora_request] * count
    if len(lora_request) != count:
        raise ValueError(f"got {len(lora_request)} lora_requests for {count} prompts: give one, or one per prompt")
    return list(lora_request)


def _as_params_list(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} SamplingParams for {count} prompts: give one, or one per prompt")
    return params
