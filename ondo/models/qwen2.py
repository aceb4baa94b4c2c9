"""Qwen2 family (Qwen2, Qwen2.5): Llama with a bias on q/k/v (none on o_proj) and optional
sliding-window layers chosen per layer by `config.layer_types`."""
from __future__ import annotations

from ondo.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


def layer_sliding_window(config, layer_idx: int) -> int | None:
    """The window of layer `layer_idx`, or None for full attention.

    Qwen configs set `sliding_window` to None unless `use_sliding_window`; `layer_types` (derived from
    `max_window_layers` when a checkpoint lacks it) says which layers slide.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or layer_types is None:
        return None
    return window if layer_types[layer_idx] == "sliding_attention" else None


class Qwen2DecoderLayer(LlamaDecoderLayer):
    def __init__(self, config, layer_idx: int):
        attention = LlamaAttention(config, layer_idx, qkv_bias=True, o_bias=False,
                                   sliding_window=layer_sliding_window(config, layer_idx))
        super().__init__(config, layer_idx, attention=attention)


class Qwen2Model(LlamaModel):
    def __init__(self, config):
        super().__init__(config, layer_cls=Qwen2DecoderLayer)


class Qwen2ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen2Model
