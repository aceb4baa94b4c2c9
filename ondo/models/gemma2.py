"""Gemma 2 family. Differs from Llama in: embeddings scaled by sqrt(hidden), RMSNorm storing its scale
as a delta from 1, four norms per layer (a post-norm after attention and after the MLP), GeGLU,
attention scaled by `query_pre_attn_scalar` with tanh soft-capping of the scores, sliding-window
attention on the layers `config.layer_types` marks, and tanh soft-capping of the final logits."""
from __future__ import annotations

import torch
from torch import nn

from ondo.layers.activation import GatedActivation
from ondo.layers.attention import Attention
from ondo.layers.linear import Linear, MergedLinear, VocabEmbedding
from ondo.layers.norm import RMSNorm
from ondo.layers.rotary import RotaryEmbedding
from ondo.models.llama import LlamaAttention, LlamaForCausalLM, head_dim_of, rotary_inputs
from ondo.models.qwen2 import layer_sliding_window


def gemma_norm(size: int, config) -> RMSNorm:
    return RMSNorm(size, config.rms_norm_eps, offset=1.0)


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


class Gemma2Attention(LlamaAttention):
    def __init__(self, config, layer_idx: int, logit_softcap: float | None = None):
        bias = getattr(config, "attention_bias", False)
        window = layer_sliding_window(config, layer_idx)
        super().__init__(config, layer_idx, qkv_bias=bias, o_bias=bias, sliding_window=window)
        # Gemma scales scores by query_pre_attn_scalar ** -0.5, which need not be head_dim ** -0.5.
        self.attn = Attention(self.num_heads, self.head_dim, config.query_pre_attn_scalar ** -0.5,
                              self.num_kv_heads, layer_idx, sliding_window=window, logit_softcap=logit_softcap)


class GemmaMLP(nn.Module):
    """GeGLU: down(act(gate(x)) * up(x)); Gemma names the activation `hidden_activation`."""

    def __init__(self, config):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [size, size], bias=False, parallel="column")
        self.down_proj = Linear(size, config.hidden_size, bias=False, parallel="row")
        self.act = GatedActivation(config.hidden_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act.of_projection(self.gate_up_proj, x))


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, attention: nn.Module | None = None):
        super().__init__()
        self.self_attn = attention or Gemma2Attention(config, layer_idx,
                                                      logit_softcap=config.attn_logit_softcapping)
        self.mlp = GemmaMLP(config)
        self.input_layernorm = gemma_norm(config.hidden_size, config)
        self.post_attention_layernorm = gemma_norm(config.hidden_size, config)
        self.pre_feedforward_layernorm = gemma_norm(config.hidden_size, config)
        self.post_feedforward_layernorm = gemma_norm(config.hidden_size, config)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        attn_out = self.self_attn(self.input_layernorm(hidden), cos, sin)           # [T, hidden]
        hidden = hidden + self.post_attention_layernorm(attn_out)
        mlp_out = self.mlp(self.pre_feedforward_layernorm(hidden))                   # [T, hidden]
        return hidden + self.post_feedforward_layernorm(mlp_out)


class Gemma2Model(nn.Module):
    def __init__(self, config, layer_cls=Gemma2DecoderLayer):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        # A buffer so it follows the model's dtype: transformers rounds sqrt(hidden) to the weight
        # dtype before multiplying (sqrt(3072) = 55.43 becomes 55.5 in bfloat16).
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size ** 0.5), persistent=False)
        self.layers = nn.ModuleList(layer_cls(config, i) for i in range(config.num_hidden_layers))
        self.norm = gemma_norm(config.hidden_size, config)
        self.rotary_emb = self.make_rotary(config)

    def make_rotary(self, config) -> nn.Module:
        return RotaryEmbedding(config, head_dim_of(config))

    def position_embeddings(self, positions: torch.Tensor,
                            hidden: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) for every layer, as `rotary_inputs` lays them out; Gemma 2 layers share one RoPE."""
        cos_sin = rotary_inputs(*self.rotary_emb(positions, hidden.dtype), hidden)
        return [cos_sin] * len(self.layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)                                        # [T, hidden]
        hidden = hidden * self.embed_scale.to(hidden.dtype)
        for layer, (cos, sin) in zip(self.layers, self.position_embeddings(positions, hidden)):
            hidden = layer(hidden, cos, sin)
        return self.norm(hidden)


class Gemma2ForCausalLM(LlamaForCausalLM):
    model_cls = Gemma2Model

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Capped in float32 (transformers caps in the model dtype): same in float32, closer in bfloat16.
        logits = self.lm_head.project(hidden).float()                        # [n, vocab]
        return soft_cap(logits, getattr(self.config, "final_logit_softcapping", None))
