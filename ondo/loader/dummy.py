"""Random weights in real architectures, for benchmarks: speed does not depend on the values."""
from __future__ import annotations

import torch
from torch import nn

# Shapes of models that matter, so `--model qwen3-0.6b --load-format dummy` needs no file at all.
KNOWN_CONFIGS = {
    "qwen3-0.6b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
                       max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True,
                       torch_dtype="bfloat16"),
    "llama3-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
                      max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                      torch_dtype="bfloat16"),
    "smollm2-135m": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
                         torch_dtype="bfloat16"),
    # 140 GB in bf16: needs tensor_parallel_size >= 2 on 141 GB GPUs.
    "llama3-70b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=8192,
                       intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
                       max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                       torch_dtype="bfloat16"),
    # The tutorials' model: logit soft-capping, sliding window on every other layer, head_dim 256.
    "gemma2-9b": dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], hidden_size=3584,
                      intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=256, vocab_size=256000, rms_norm_eps=1e-6,
                      max_position_embeddings=8192, rope_theta=10000.0, tie_word_embeddings=True,
                      sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh",
                      torch_dtype="bfloat16"),
}


def known_config(name: str):
    from transformers import AutoConfig

    fields = dict(KNOWN_CONFIGS[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> None:
    """Fill every weight with N(0, 0.02) noise; a quantized `Linear` quantizes its noise like a checkpoint."""
    from ondo.layers.linear import DENSE, linear_layers
    from ondo.models.weights import finish_loading

    import zlib

    def noise(name, shape, device):
        # Seeded per parameter name, drawn where the weights live (fast on a GPU): a replicated parameter
        # gets the same values on every tensor-parallel rank whatever the other ranks' shard shapes are.
        generator = torch.Generator(device).manual_seed(seed + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=generator, dtype=torch.float32, device=device) * 0.02

    packed = {name: layer for name, layer in linear_layers(model) if layer.method is not DENSE}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or ".ln_" in name or name.rpartition(".")[0] in packed:
            continue  # norm scales stay as built (ones, or zeros for Gemma's offset form)
        param.copy_(noise(name, param.shape, param.device).to(param.dtype))
    device = next(model.parameters()).device                # norms stay dense: every model has one
    for name, layer in packed.items():
        layer.load("weight", noise(name, layer.full_shape, device))   # the checkpoint's shape: load cuts the shard
    finish_loading(model)
