"""GGUF loading for every supported family, on tiny random models written as GGUF in a tmp dir.

Each model is written the way llama.cpp's converter writes it (gguf-py's own tensor names, Llama
q/k rows permuted for interleaved RoPE, Gemma norms stored as 1 + w); transformers' GGUF loader
then reads the file back to the original weights, which proves the file is faithful, and ondo must
give the same config and tensors.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, Qwen2Config,
                          Qwen3Config)

from transformers.convert_slow_tokenizer import bytes_to_unicode

from ondo.loader.gguf import load_gguf
from tests.loader.gguf_dense import dense_values

# A byte-level vocabulary: the 256 byte symbols, one merge, and the special tokens.
BYTE_SYMBOLS = list(bytes_to_unicode().values())
TOKENS = BYTE_SYMBOLS + ["\u0120t", "<|endoftext|>", "<s>", "</s>"]
UNK, BOS, EOS = len(TOKENS) - 3, len(TOKENS) - 2, len(TOKENS) - 1
COMMON = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=len(TOKENS), max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=BOS,
              eos_token_id=EOS)
FAMILIES = {
    "llama": (LlamaConfig(**COMMON, num_hidden_layers=2, rope_theta=50_000.0, tie_word_embeddings=False), "llama"),
    "qwen2": (Qwen2Config(**COMMON, num_hidden_layers=2, rope_theta=1e6, tie_word_embeddings=True), "qwen2"),
    "qwen3": (Qwen3Config(**COMMON, num_hidden_layers=2, head_dim=32, tie_word_embeddings=False), "qwen3"),
    "gemma2": (Gemma2Config(**COMMON, num_hidden_layers=2, head_dim=32, query_pre_attn_scalar=32,
                            sliding_window=16), "gemma2"),
    "gemma3": (Gemma3TextConfig(**COMMON, num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32,
                                sliding_window=16), "gemma3"),
}
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
         "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows -> interleaved pairs."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]) \
        .swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path, model, arch: str, quantize: set[str] = frozenset()):
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    prefix = arch
    writer.add_uint32(f"{prefix}.block_count", config.num_hidden_layers)
    writer.add_uint32(f"{prefix}.context_length", config.max_position_embeddings)
    writer.add_uint32(f"{prefix}.embedding_length", config.hidden_size)
    writer.add_uint32(f"{prefix}.feed_forward_length", config.intermediate_size)
    writer.add_uint32(f"{prefix}.attention.head_count", config.num_attention_heads)
    writer.add_uint32(f"{prefix}.attention.head_count_kv", config.num_key_value_heads)
    writer.add_float32(f"{prefix}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    theta = config.rope_parameters.get("rope_theta") or config.rope_parameters["full_attention"]["rope_theta"]
    writer.add_float32(f"{prefix}.rope.freq_base", theta)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_uint32(f"{prefix}.attention.key_length", head_dim)
    writer.add_uint32(f"{prefix}.attention.value_length", head_dim)
    writer.add_uint32(f"{prefix}.rope.dimension_count", head_dim)
    if arch.startswith("gemma"):
        writer.add_uint32(f"{prefix}.attention.sliding_window", config.sliding_window)
    if arch == "gemma2":
        writer.add_float32(f"{prefix}.attn_logit_softcapping", config.attn_logit_softcapping)
        writer.add_float32(f"{prefix}.final_logit_softcapping", config.final_logit_softcapping)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", TOKENS)
    writer.add_array("tokenizer.ggml.token_type", [1] * (len(TOKENS) - 3) + [2, 3, 3])
    writer.add_array("tokenizer.ggml.merges", ["\u0120 t"])
    writer.add_uint32("tokenizer.ggml.unknown_token_id", UNK)
    writer.add_uint32("tokenizer.ggml.bos_token_id", BOS)
    writer.add_uint32("tokenizer.ggml.eos_token_id", EOS)
    writer.add_uint32("tokenizer.ggml.padding_token_id", EOS)
    names = gguf.get_tensor_name_map(ARCHS[arch], config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        array = tensor.float().numpy().copy()
        if arch == "llama" and ".attn_q." in gguf_name:
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gguf_name:
            array = llama_cpp_permute(array, config.num_key_value_heads)
        elif arch.startswith("gemma") and gguf_name.endswith("norm.weight"):
            array = array + 1.0
        if gguf_name in quantize:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_files(request, tmp_path_factory):
    name = request.param
    config, arch = FAMILIES[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # norms start at 0/1: randomize so a missed +-1 shows
            param.copy_(torch.randn_like(param) * 0.5)
    path = tmp_path_factory.mktemp(f"gguf-{name}") / f"{name}.gguf"
    write_gguf(path, model, arch, quantize={"blk.0.ffn_up.weight"})
    return name, model, path


def test_family_matches_transformers(family_files):
    name, original, path = family_files
    if name == "qwen3":
        # transformers' GGUF config ignores qwen3.attention.key_length, so it cannot load a Qwen3
        # whose head_dim is not hidden/heads (Qwen3-0.6B: 128 vs 64); the original weights decide.
        reference = original
    else:
        reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ours = load_gguf(path, torch.float32)
    assert ours.config.architectures == [type(original).__name__]
    for field in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "tie_word_embeddings",
                  "max_position_embeddings", "rope_parameters", "sliding_window", "layer_types",
                  "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
        expected = getattr(original.config, field, None)
        if field == "head_dim" and expected is None:  # Qwen2Config derives it
            expected = original.config.hidden_size // original.config.num_attention_heads
        if isinstance(expected, float):  # the file stores float32
            expected = pytest.approx(expected, rel=1e-6)
        assert getattr(ours.config, field, None) == expected, field
    weights = dict(ours.weights)
    expected = {k for k in reference.state_dict() if not (k == "lm_head.weight" and original.config.tie_word_embeddings)}
    assert set(weights) == expected
    reference_state, original_state = reference.state_dict(), original.state_dict()
    for key, tensor in weights.items():
        tensor = dense_values(tensor)
        if reference is not original:
            torch.testing.assert_close(tensor, reference_state[key], rtol=0, atol=0, msg=key)
        # Q8_0 keeps 8 bits per weight (|w| <~ 2.5 here); the F32 tensors are exact.
        atol = 0.02 if key == "model.layers.0.mlp.up_proj.weight" else 1e-6
        torch.testing.assert_close(tensor, original_state[key], rtol=0, atol=atol, msg=key)


def test_tokenizer_matches_auto_tokenizer(family_files):
    from transformers import AutoTokenizer

    _, _, path = family_files
    loaded = load_gguf(path, torch.float32)
    tok = loaded.tokenizer
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert type(tok.hf) is type(reference)
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)
    assert tok.vocab_size == len(reference)
    assert tok.all_special_ids == frozenset(reference.all_special_ids)
    for text in ("a test 한", "<s>tt</s>", ""):
        assert tok.encode(text) == reference.encode(text)
    assert tok.decode(tok.encode("a test 한")) == "a test 한"
    assert loaded.generation_defaults["eos_token_id"] == [EOS]
    assert loaded.generation_defaults["bos_token_id"] == BOS


def test_run_dtype(family_files):
    _, _, path = family_files
    dense = [t for _, t in load_gguf(path, torch.bfloat16).weights if isinstance(t, torch.Tensor)]
    assert dense and all(t.dtype == torch.bfloat16 for t in dense)
