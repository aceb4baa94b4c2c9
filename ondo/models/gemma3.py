"""Gemma 3 text family (model_type gemma3_text): Gemma 2 plus a per-head Gemma RMSNorm on queries
and keys before RoPE, and local (sliding-window) / global layers with their own RoPE parameters
(`config.rope_parameters[layer_type]`)."""
from __future__ import annotations

import torch
from torch import nn

from ondo.layers.rotary import RotaryEmbedding
from ondo.models.gemma2 import Gemma2Attention, Gemma2DecoderLayer, Gemma2ForCausalLM, Gemma2Model, gemma_norm
from ondo.models.llama import head_dim_of, rotary_inputs

_DEFAULT_LAYER_TYPE = "full_attention"


def layer_type_of(config, layer_idx: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    return layer_types[layer_idx] if layer_types else _DEFAULT_LAYER_TYPE


class Gemma3Attention(Gemma2Attention):
    def __init__(self, config, layer_idx: int):
        # transformers' Gemma 3 attention never passes attn_logit_softcapping on (the released
        # checkpoints leave it null), so the scores are not capped here either.
        super().__init__(config, layer_idx, logit_softcap=None)
        self.q_norm = gemma_norm(self.head_dim, config)
        self.k_norm = gemma_norm(self.head_dim, config)

    def head_norms(self):
        return self.q_norm, self.k_norm


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx, attention=Gemma3Attention(config, layer_idx))


class Gemma3Model(Gemma2Model):
    def __init__(self, config):
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention must be False for causal generation, got True")
        super().__init__(config, layer_cls=Gemma3DecoderLayer)
        self.layer_types = [layer_type_of(config, i) for i in range(config.num_hidden_layers)]

    def make_rotary(self, config) -> nn.Module:
        # Local and global layers rotate with their own base frequency (and scaling).
        layer_types = {layer_type_of(config, i) for i in range(config.num_hidden_layers)}
        return nn.ModuleDict({t: RotaryEmbedding(config, head_dim_of(config), layer_type=t)
                              for t in sorted(layer_types)})

    def position_embeddings(self, positions: torch.Tensor,
                            hidden: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        per_type = {t: rotary_inputs(*rotary(positions, hidden.dtype), hidden) for t, rotary in self.rotary_emb.items()}
        return [per_type[t] for t in self.layer_types]


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    model_cls = Gemma3Model
