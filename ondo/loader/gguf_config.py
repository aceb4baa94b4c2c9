"""Rebuild a transformers config from GGUF metadata (llama.cpp key names -> HF config fields).

A GGUF file carries no config.json: `{arch}.block_count`, `{arch}.embedding_length`, ... are the
config. Each supported architecture maps to one HF config class and `architectures` entry, so the
rest of ondo sees exactly what an HF folder of the same model would give.
"""

from __future__ import annotations

from typing import Any

from ondo.loader.config_import import import_validators_without_activations

# GGUF `general.architecture` -> (HF model_type, HF architecture)
GGUF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),  # also SmolLM, Mistral, Llama 2/3
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}

# Gemma 3 alternates five sliding-window layers with one global layer (llama.cpp hard-codes it too).
_GEMMA3_SLIDING_PATTERN = 6
_GEMMA3_LOCAL_ROPE_THETA = 10_000.0
# The only Gemma 2/3 size whose attention scale is not 1/sqrt(head_dim): 27B uses hidden/heads.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


class GGUFConfigError(ValueError):
    """The GGUF metadata lacks a field the config needs, or names an unsupported architecture."""


def _require(metadata: dict[str, Any], key: str) -> Any:
    if key not in metadata:
        raise GGUFConfigError(f"GGUF metadata has no {key!r}, which the model config needs")
    return metadata[key]


def _single_value(value: Any, key: str) -> Any:
    """Some keys (head_count_kv) may be per-layer arrays; ondo needs one value for all layers."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise GGUFConfigError(f"{key} differs between layers ({sorted(set(value))}); not supported")
        return value[0]
    return value


def _rope_scaling(metadata: dict[str, Any], arch: str) -> dict[str, Any]:
    """HF rope parameters for `{arch}.rope.scaling.*` (empty dict for plain RoPE)."""
    kind = metadata.get(f"{arch}.rope.scaling.type")
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or factor in (None, 1.0):
        return {}
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        params: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        original = metadata.get(f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            params["original_max_position_embeddings"] = int(original)
        return params
    raise GGUFConfigError(f"{arch}.rope.scaling.type must be one of none, linear, yarn; got {kind!r}")


def build_config(metadata: dict[str, Any], tensor_names: set[str]):
    """The HF config (a transformers PretrainedConfig) of a GGUF file with this metadata and these tensor names."""
    arch = metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise GGUFConfigError(
            f"GGUF architecture must be one of {sorted(GGUF_ARCHITECTURES)}, got {arch!r}"
        )
    model_type, hf_architecture = GGUF_ARCHITECTURES[arch]
    key = lambda name: _require(metadata, f"{arch}.{name}")  # noqa: E731

    hidden_size = int(key("embedding_length"))
    num_heads = int(_single_value(key("attention.head_count"), f"{arch}.attention.head_count"))
    kv_key = f"{arch}.attention.head_count_kv"
    num_kv_heads = int(_single_value(metadata.get(kv_key, num_heads), kv_key))
    head_dim = metadata.get(f"{arch}.attention.key_length") or metadata.get(f"{arch}.rope.dimension_count")
    head_dim = int(head_dim) if head_dim else hidden_size // num_heads
    vocab_size = metadata.get(f"{arch}.vocab_size") or len(_require(metadata, "tokenizer.ggml.tokens"))
    rope_theta = float(metadata.get(f"{arch}.rope.freq_base", 10_000.0))

    fields: dict[str, Any] = {
        "architectures": [hf_architecture],
        "hidden_size": hidden_size,
        "num_hidden_layers": int(key("block_count")),
        "intermediate_size": int(_single_value(key("feed_forward_length"), f"{arch}.feed_forward_length")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(key("context_length")),
        "vocab_size": int(vocab_size),
        # llama.cpp writes `output.weight` only when the LM head is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "unk_token_id": metadata.get("tokenizer.ggml.unknown_token_id"),
    }
    rope = {"rope_type": "default", "rope_theta": rope_theta} | _rope_scaling(metadata, arch)
    if arch == "llama":
        fields["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        fields["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
        fields["rope_parameters"] = rope
    elif arch in ("qwen2", "qwen3"):
        fields["rope_parameters"] = rope
        if arch == "qwen3":
            fields["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    else:
        fields.update(_gemma_fields(metadata, arch, fields, rope))
    import_validators_without_activations()  # saves importing transformers' model-loading stack
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **fields)


def _gemma_fields(metadata: dict[str, Any], arch: str, fields: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any]:
    num_layers = fields["num_hidden_layers"]
    if num_layers == _GEMMA_27B_LAYERS[arch]:
        query_pre_attn_scalar = fields["hidden_size"] // fields["num_attention_heads"]
    else:
        query_pre_attn_scalar = fields["head_dim"]
    extra: dict[str, Any] = {
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "sliding_window": int(_require(metadata, f"{arch}.attention.sliding_window")),
    }
    # Absent soft-caps keep the config class default (Gemma 2: 50/30, Gemma 3: none).
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if metadata.get(f"{arch}.{cap}") is not None:
            extra[cap] = float(metadata[f"{arch}.{cap}"])
    if arch == "gemma2":
        extra["rope_parameters"] = rope
        extra["layer_types"] = [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)
        ]
        return extra
    local_theta = float(metadata.get(f"{arch}.rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_THETA))
    extra["rope_parameters"] = {
        # Only the global layers are scaled (the 4B+ models' 8x linear scaling).
        "full_attention": rope,
        "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
    }
    extra["layer_types"] = [
        "full_attention" if (i + 1) % _GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention"
        for i in range(num_layers)
    ]
    return extra
