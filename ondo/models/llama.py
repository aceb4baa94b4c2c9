"""Llama family: Llama 2/3.x, Mistral, SmolLM2, open_llama. Parameter names follow transformers'
LlamaForCausalLM; q/k/v and gate/up are merged into one matrix each (see models/weights.py)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ondo.engine.forward_context import fused_ops_enabled
from ondo.layers import fused
from ondo.layers.activation import GatedActivation
from ondo.layers.attention import Attention
from ondo.layers.linear import Linear, LMHead, MergedLinear, QKVLinear, VocabEmbedding
from ondo.layers.norm import RMSNorm
from ondo.layers.rotary import RotaryEmbedding, apply_rotary_, rotation_tables
from ondo.models import cpu_decode
from ondo.models.weights import LLAMA_STACKED, load_weights


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    """Under tensor parallelism each rank holds its own query heads (and the KV heads they read) in
    `qkv_proj` (column-parallel); `o_proj` is row-parallel, so the ranks' outputs are summed."""

    def __init__(self, config, layer_idx: int, qkv_bias: bool, o_bias: bool, sliding_window: int | None = None):
        super().__init__()
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                  config.num_key_value_heads, bias=qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads   # this rank's
        self.o_proj = Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=o_bias,
                             parallel="row")
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads,
                              layer_idx, sliding_window=sliding_window)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))     # [T, H*D], [T, KVH*D], [T, KVH*D]
        if q.is_cuda and fused_ops_enabled() and cos.shape[-1] == self.head_dim:
            # One launch: the head norms, the rotation and the cache write (the backend then skips its own).
            self.attn.rotate_and_cache(q, k, v, cos, sin, self.head_norms())
            return self.o_proj(self.attn(q, k, v, kv_written=True))
        q, k = self.rotate(q, k, cos, sin)
        return self.o_proj(self.attn(q, k, v))

    def head_norms(self) -> tuple[nn.Module, nn.Module] | None:
        """The RMSNorms applied to each head of q and of k before the rotation (Qwen3, Gemma 3), or None."""
        return None

    def rotate(self, q, k, cos, sin):
        """Normalises each head (`head_norms`) and rotates q and k in place (they are fresh: views of this
        step's qkv output, or normed copies); cos / sin come from `rotary_inputs`."""
        norms = self.head_norms()
        if norms is not None:
            q, k = norm_heads(norms[0], q, self.head_dim), norm_heads(norms[1], k, self.head_dim)
        if q.is_cuda and fused_ops_enabled():
            fused.apply_rotary_(q, k, cos, sin, self.head_dim)   # in place on the qkv views
            return q, k
        qk = _adjacent_view(q, k)
        if qk is not None:   # q and k side by side in the qkv output: one rotation for both (half the ops)
            apply_rotary_(qk, cos, sin, self.head_dim)            # [T, (H + KVH) * D]
        else:
            apply_rotary_(q, cos, sin, self.head_dim)
            apply_rotary_(k, cos, sin, self.head_dim)
        return q, k


def norm_heads(norm: RMSNorm, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Applies `norm` to every head of x [T, heads * head_dim] separately."""
    return norm(x.unflatten(-1, (-1, head_dim))).flatten(-2)   # [T, heads * head_dim]


def rotary_inputs(cos: torch.Tensor, sin: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `LlamaAttention.rotate` takes, built once per forward: cos, sin [T, rot_dim] as they are for the
    fused GPU kernel, else `rotation_tables` ([T, 1, 2, rot_dim / 2] each) for the in-place torch rotation."""
    if hidden.is_cuda and fused_ops_enabled():
        return cos, sin
    return rotation_tables(cos, sin)


def _adjacent_view(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """[T, q + k] viewing both when k starts right where q ends in the same rows (the merged qkv output), else None."""
    if q.dim() != 2 or k.dim() != 2:
        return None
    row_stride, width = q.stride()
    if width != 1 or k.stride() != (row_stride, 1) or q.dtype != k.dtype:
        return None
    if k.data_ptr() != q.data_ptr() + q.shape[1] * q.element_size() or q.shape[1] + k.shape[1] > row_stride:
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1]), (row_stride, 1))


class LlamaMLP(nn.Module):
    def __init__(self, config, bias: bool = False):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [size, size], bias=bias, parallel="column")
        self.down_proj = Linear(size, config.hidden_size, bias=bias, parallel="row")
        self.act = GatedActivation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act.of_projection(self.gate_up_proj, x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, attention: nn.Module | None = None):
        super().__init__()
        bias = getattr(config, "attention_bias", False)
        sliding_window = getattr(config, "sliding_window", None)
        self.self_attn = attention or LlamaAttention(config, layer_idx, qkv_bias=bias, o_bias=bias,
                                                     sliding_window=sliding_window)
        self.mlp = LlamaMLP(config, bias=getattr(config, "mlp_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, residual, cos, sin):
        hidden, residual = self.input_layernorm(hidden, residual) if residual is not None else \
            (self.input_layernorm(hidden), hidden)
        hidden = self.self_attn(hidden, cos, sin)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, layer_cls=LlamaDecoderLayer):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_cls(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, head_dim_of(config))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)                  # [T, hidden]
        cos, sin = rotary_inputs(*self.rotary_emb(positions, hidden.dtype), hidden)
        stacked = cpu_decode.decode_layers(self, hidden, cos, sin) if hidden.is_cpu else None
        if stacked is not None:   # a CPU decode step: every layer in one C call, the same numbers
            hidden, residual = stacked
        else:
            residual = None
            for layer in self.layers:
                hidden, residual = layer(hidden, residual, cos, sin)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    stacked_params = LLAMA_STACKED
    model_cls = LlamaModel

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = self.model_cls(config)
        tied = getattr(config, "tie_word_embeddings", False)
        self.lm_head = self.model.embed_tokens if tied else LMHead(config.hidden_size, config.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.project(hidden).float()    # [n, vocab]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        tied = getattr(self.config, "tie_word_embeddings", False)
        weights = ((n, t) for n, t in weights if not (tied and n == "lm_head.weight"))
        return load_weights(self, weights, self.stacked_params)
