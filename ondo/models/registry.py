"""Maps `config.architectures[0]` to ondo's model class (imported lazily)."""
from __future__ import annotations

import importlib

_MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Gemma2ForCausalLM": ("gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
}


class UnsupportedModelError(ValueError):
    pass


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(config):
    architectures = getattr(config, "architectures", None) or []
    for arch in architectures:
        if arch in _MODELS:
            module_name, class_name = _MODELS[arch]
            module = importlib.import_module(f"ondo.models.{module_name}")
            return getattr(module, class_name)
    raise UnsupportedModelError(
        f"unknown model architecture {architectures or getattr(config, 'model_type', '?')}; "
        f"ondo supports {', '.join(supported_architectures())}")
