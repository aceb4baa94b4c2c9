"""GPT-2 family (GPT-2, KoGPT2): learned position embeddings, pre-LayerNorm blocks, a combined
q/k/v projection (`c_attn`) and a plain GeLU MLP. Checkpoints store their projections as `Conv1D`
weights laid out [in, out]; they are transposed to the HF Linear layout [out, in] on load."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ondo.layers.activation import get_activation
from ondo.layers.attention import Attention
from ondo.distributed.parallel_state import divide
from ondo.layers.linear import Linear, LMHead, MergedLinear, VocabEmbedding
from ondo.models.weights import load_weights

# Projections that transformers stores as Conv1D ([in, out]).
_CONV1D_WEIGHTS = ("c_attn.weight", "c_proj.weight", "c_fc.weight")


class GPT2Attention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        hidden = config.hidden_size
        self.head_dim = hidden // config.num_attention_heads
        self.num_heads = divide(config.num_attention_heads, "num_attention_heads")   # this rank's
        scale = self.head_dim ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_idx + 1)
        # One HF matrix holding q, k and v: split per projection so each rank keeps its heads' rows.
        self.c_attn = MergedLinear(hidden, [hidden] * 3, bias=True, parallel="column")
        self.c_proj = Linear(hidden, hidden, bias=True, parallel="row")
        self.attn = Attention(self.num_heads, self.head_dim, scale, self.num_heads, layer_idx)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn.split(self.c_attn(hidden))           # [T, H*D] each (this rank's heads)
        return self.c_proj(self.attn(q, k, v))


class GPT2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inner = config.n_inner if getattr(config, "n_inner", None) is not None else 4 * config.hidden_size
        self.c_fc = Linear(config.hidden_size, inner, bias=True, parallel="column")
        self.c_proj = Linear(inner, config.hidden_size, bias=True, parallel="row")
        self.act = get_activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden))
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wte = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.wte(input_ids) + self.wpe(positions)           # [T, hidden]
        for block in self.h:
            hidden = block(hidden)
        return self.ln_f(hidden)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        if getattr(config, "add_cross_attention", False):
            raise ValueError("add_cross_attention must be False for a decoder-only GPT-2, got True")
        self.config = config
        self.transformer = GPT2Model(config)
        tied = getattr(config, "tie_word_embeddings", True)
        self.lm_head = self.transformer.wte if tied else LMHead(config.hidden_size, config.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.project(hidden).float()                        # [n, vocab]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        tied = getattr(self.config, "tie_word_embeddings", True)
        return load_weights(self, (
            (name, tensor.t() if name.endswith(_CONV1D_WEIGHTS) else tensor)
            for name, tensor in map(_with_prefix, weights)
            if not (tied and name == "lm_head.weight")))


def _with_prefix(item: tuple[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    """The original GPT-2 checkpoints name `h.0.attn...`, later ones `transformer.h.0.attn...`."""
    name, tensor = item
    if not name.startswith(("transformer.", "lm_head.")):
        name = "transformer." + name
    return name, tensor
