"""A decode step's decoder layers in one C call on the CPU (cpu_kernels/decoder_stack.c).

A small model's decode step on a CPU spends more time in Python between its kernels than in them: some
25 calls and tensor allocations per layer. Where a Llama-family model (Llama, Mistral, SmolLM2, Qwen2)
runs with int4-planes weights (GGUF, int4, GPTQ/AWQ) on the CPU, its layers' kernels are already ondo's
own C kernels, so the whole stack runs as one C call over the same kernels in the same order: the
result is bit for bit the eager forward's. Everything else (other families, dense or int8/NF4 weights,
LoRA, tensor parallelism, prefill steps, the kernels disabled, `enforce_eager`) keeps the eager path.
"""
from __future__ import annotations

import ctypes

import torch

from ondo.engine.forward_context import get_forward_context
from ondo.layers import cpu_kernels
from ondo.layers.activation import GatedActivation
from ondo.layers.attention import portable_backend
from ondo.layers.norm import RMSNorm
from ondo.layers.quantization.int4_planes import Int4PlanesMethod, own_cpu_kernel_takes, own_kernel_reads

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class _Layer(ctypes.Structure):
    """`ondo_llama_layer` (decoder_stack.c)."""
    _fields_ = [("input_norm", _PTR), ("post_attention_norm", _PTR), ("qkv", cpu_kernels.Int4Weight),
                ("o", cpu_kernels.Int4Weight), ("gate_up", cpu_kernels.Int4Weight), ("down", cpu_kernels.Int4Weight),
                ("qkv_bias", _PTR), ("o_bias", _PTR), ("gate_up_bias", _PTR), ("down_bias", _PTR),
                ("kv_cache", _PTR), ("window", _I64)]


class _Shape(ctypes.Structure):
    """`ondo_llama_shape` (decoder_stack.c)."""
    _fields_ = [("hidden", _I64), ("heads", _I64), ("kv_heads", _I64), ("head_dim", _I64), ("inter", _I64),
                ("rot_half", _I64), ("block_size", _I64), ("num_slots", _I64), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("softcap", ctypes.c_float), ("norm_dtype", ctypes.c_int32),
                ("gelu_tanh", ctypes.c_int32), ("kv_dtype", ctypes.c_int32)]


def decode_layers(model, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(hidden, residual) after every decoder layer of a Llama-family `model` (a LlamaModel) in one C call,
    or None where this step must take the eager path. cos / sin: `rotation_tables`."""
    stack = model.__dict__.get("cpu_decode_stack")
    if stack is None:
        stack = model.cpu_decode_stack = _DecodeStack.of(model) or False
    return stack.run(hidden, cos, sin) if stack else None


class _DecodeStack:
    def __init__(self, layers: list):
        first = layers[0]
        attn = first.self_attn
        self.layers = layers
        self.num_layers = len(layers)
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.hidden_size = first.input_layernorm.weight.shape[0]
        self.inter = first.mlp.down_proj.in_features
        self.eps = first.input_layernorm.eps
        self.gelu_tanh = first.mlp.act.kernel_name == "gelu_tanh"
        self.scale, self.softcap = attn.attn.scale, attn.attn.logit_softcap
        self.table: ctypes.Array | None = None    # the layers' structs, built with the first step's caches
        self.cache_ptr = None

    @classmethod
    def of(cls, model) -> "_DecodeStack | None":
        """The stack when every layer computes exactly what decoder_stack.c does, else None."""
        from ondo.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP

        layers = list(model.layers)
        if not layers or cpu_kernels.library() is None:
            return None
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            if not (type(layer).forward is LlamaDecoderLayer.forward and type(attn).forward is LlamaAttention.forward
                    and type(attn).head_norms is LlamaAttention.head_norms and type(mlp).forward is LlamaMLP.forward
                    and type(mlp.act) is GatedActivation and mlp.act.kernel_name is not None):
                return None
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if any(type(n) is not RMSNorm or n.offset or n.eps != layers[0].input_layernorm.eps for n in norms):
                return None
            for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                if not isinstance(linear.method, Int4PlanesMethod) or linear.lora is not None or linear.sharded \
                        or not linear.qweight.is_cpu or not own_kernel_reads(linear) \
                        or type(linear.method).apply is not Int4PlanesMethod.apply:   # e.g. act-order GPTQ
                    return None
            if attn.attn.logit_softcap != layers[0].self_attn.attn.logit_softcap:
                return None
        return cls(layers)

    def run(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        context = get_forward_context()
        meta = context.attn_metadata
        if not (context.cpu_decode_stack and meta.is_decode and hidden.dim() == 2 and hidden.is_contiguous() and own_cpu_kernel_takes(hidden)
                and (context.attention_backend is None or context.attention_backend is portable_backend())
                and cos.dtype == hidden.dtype and cos.is_contiguous() and sin.is_contiguous()
                and meta.slot_mapping.dtype == torch.int64 and meta.slot_mapping.is_contiguous()
                and cpu_kernels.cache_inputs_fit(hidden, context.kv_caches[0], meta.block_tables, meta.seq_lens)):
            return None
        table = self._table(context.kv_caches, hidden.dtype)
        if table is None:
            return None
        kv_cache = context.kv_caches[0]
        _, num_blocks, block_size, _, _ = kv_cache.shape
        shape = _Shape(self.hidden_size, self.heads, self.kv_heads, self.head_dim, self.inter, cos.shape[-1],
                       block_size, num_blocks * block_size, self.eps, self.scale, self.softcap or 0.0,
                       cpu_kernels.DTYPES[self.layers[0].input_layernorm.weight.dtype], int(self.gelu_tanh),
                       cpu_kernels.KV_DTYPES[kv_cache.dtype])
        residual = torch.empty_like(hidden)
        cpu_kernels.library().ondo_llama_decode(
            cpu_kernels.DTYPES[hidden.dtype], ctypes.byref(table), self.num_layers, ctypes.byref(shape), hidden.data_ptr(),
            residual.data_ptr(), hidden.shape[0], cos.data_ptr(), sin.data_ptr(), meta.slot_mapping.data_ptr(),
            meta.block_tables.data_ptr(), meta.block_tables.stride(0), meta.seq_lens.data_ptr(),
            torch.get_num_threads())
        return hidden, residual

    def _table(self, kv_caches: list[torch.Tensor], dtype: torch.dtype) -> ctypes.Array | None:
        """The layers' structs; rebuilt if the caches move. None where a weight's dtype differs from the
        activations' (the eager path then rounds differently); the cache may be of any KV_DTYPES."""
        if self.table is not None and self.cache_ptr == kv_caches[0].data_ptr() and self.dtype == dtype:
            return self.table
        table = (_Layer * self.num_layers)()
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            cache = kv_caches[attn.attn.layer_idx]
            tensors = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                       *(lin.bias for lin in linears if lin.bias is not None),
                       *(lin.scales_and_zeros for lin in linears if lin.scales_and_zeros.dtype != torch.float16)]
            if any(t.dtype != dtype for t in tensors) or not cache.is_contiguous() or cache.dtype not in cpu_kernels.KV_DTYPES:
                return None
            biases = [None if lin.bias is None else lin.bias.data_ptr() for lin in linears]
            table[i] = _Layer(layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                              *(cpu_kernels.int4_weight(lin) for lin in linears), *biases, cache.data_ptr(),
                              attn.attn.sliding_window or 0)
        self.table, self.cache_ptr, self.dtype = table, kv_caches[0].data_ptr(), dtype
        return table
