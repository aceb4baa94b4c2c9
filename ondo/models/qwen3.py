"""Qwen3 family: Llama plus a per-head RMSNorm on queries and keys (q_norm/k_norm, applied before
RoPE); q/k/v/o carry a bias only when `attention_bias` is set."""
from __future__ import annotations

from ondo.layers.norm import RMSNorm
from ondo.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from ondo.models.qwen2 import layer_sliding_window


class Qwen3Attention(LlamaAttention):
    def __init__(self, config, layer_idx: int):
        bias = getattr(config, "attention_bias", False)
        super().__init__(config, layer_idx, qkv_bias=bias, o_bias=bias,
                         sliding_window=layer_sliding_window(config, layer_idx))
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def head_norms(self):
        return self.q_norm, self.k_norm


class Qwen3DecoderLayer(LlamaDecoderLayer):
    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx, attention=Qwen3Attention(config, layer_idx))


class Qwen3Model(LlamaModel):
    def __init__(self, config):
        super().__init__(config, layer_cls=Qwen3DecoderLayer)


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3Model
