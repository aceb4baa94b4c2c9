"""Loading GGUF files (llama.cpp's single-file format): config, weights and tokenizer.

Supported families (`general.architecture`): `llama` (Llama 2/3, SmolLM/SmolLM2, Mistral and
other Llama-shaped models), `qwen2` (Qwen2/2.5), `qwen3` (dense Qwen3), `gemma2` and `gemma3`
(text models, e.g. Gemma 3 270M/1B). Tensor types: F32, F16, BF16 and every quantization
`gguf.quants` dequantizes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K ... Q6_K, IQ*).

Weights are dequantized one tensor at a time while the model consumes the iterator, converted
to the run dtype and named like the Hugging Face checkpoint, undoing the two value transforms of
llama.cpp's converter (the reference is transformers' own GGUF loader):
- Llama-architecture `attn_q`/`attn_k` rows are permuted from HF's rotate-half RoPE layout to
  GGML's interleaved one; the permutation is reversed here.
- Gemma RMSNorm weights are stored as `1 + w` (HF computes `x * (1 + w)`); 1 is subtracted.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ondo.layers.quantization.gguf_blocks import GGUFBlocks
from ondo.loader.gguf_config import GGUF_ARCHITECTURES, GGUFConfigError
from ondo.loader.plain_config import cached_config
from ondo.loader.gguf_reader import GGUFFile, GGUFFormatError, GGUFTensorInfo
from ondo.loader.gguf_tokenizer import load_gguf_tokenizer
from ondo.tokenizer.tokenizer import Tokenizer

__all__ = ["GGUFModel", "load_gguf", "load_gguf_tokenizer", "GGUFConfigError", "GGUFFormatError"]

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma wraps each sub-block in two norms, so its "ffn_norm" is the pre-feed-forward one.
_GEMMA_LAYER_NAMES = _LAYER_NAMES | {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Tensors llama.cpp precomputes that HF models derive from the config instead.
_IGNORED_TENSORS = {"rope_freqs.weight"}
_DENSE_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_TENSOR = re.compile(r"^(\w+)\.(weight|bias)$")

# Sampling defaults some converters store (general.sampling.*) -> generation_config keys.
_SAMPLING_KEYS = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p"}


@dataclass
class GGUFModel:
    config: object
    weights: Iterator[tuple[str, torch.Tensor]]  # HF names, dequantized to the run dtype; single use
    tokenizer: Tokenizer
    generation_defaults: dict = field(default_factory=dict)  # generation_config.json-style keys
    fingerprint: str = ""        # names the file's bytes as far as loading goes (`file_fingerprint`)


def hf_tensor_name(gguf_name: str, arch: str) -> str | None:
    """The HF parameter name of a GGUF tensor (None for tensors HF does not keep)."""
    if gguf_name in _IGNORED_TENSORS:
        return None
    layer_names = _GEMMA_LAYER_NAMES if arch.startswith("gemma") else _LAYER_NAMES
    if match := _LAYER_TENSOR.match(gguf_name):
        layer, part, kind = match.groups()
        if part in layer_names:
            return f"model.layers.{layer}.{layer_names[part]}.{kind}"
    elif match := _GLOBAL_TENSOR.match(gguf_name):
        part, kind = match.groups()
        if part in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[part]}.{kind}"
    raise GGUFConfigError(f"GGUF tensor {gguf_name!r} of a {arch} model has no Hugging Face equivalent")


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: per head, rows (pairs, 2) back to (2, half).

    The converter turned each head's rows [first half | second half] (rotate-half RoPE) into
    interleaved pairs; reshaping to [heads, half, 2, ...] and swapping the middle axes restores it.
    """
    head_rows = weight.shape[0] // num_heads
    grouped = weight.reshape(num_heads, head_rows // 2, 2, *weight.shape[1:])  # [H, D/2, 2, ...]
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def _convert(array: np.ndarray, info: GGUFTensorInfo, arch: str, config: object) -> np.ndarray:
    if arch == "llama" and info.name.endswith(("attn_q.weight", "attn_q.bias")):
        array = unpermute_rope_rows(array, config.num_attention_heads)
    elif arch == "llama" and info.name.endswith(("attn_k.weight", "attn_k.bias")):
        array = unpermute_rope_rows(array, config.num_key_value_heads)
    elif arch.startswith("gemma") and info.name.endswith("norm.weight"):
        array = array - 1.0
    return array


def _iter_weights(gguf: GGUFFile, config: object, dtype: torch.dtype) -> Iterator[tuple[str, object]]:
    arch = gguf.architecture
    for info in gguf.tensors.values():
        name = hf_tensor_name(info.name, arch)
        if name is None:
            continue
        if info.ggml_type not in _DENSE_TYPES and len(info.shape) == 2:
            # Kept packed: the linear layer decides how to store it (ondo/layers/quantization/gguf_blocks.py).
            raw = gguf.read_raw(info.name)                                   # uint8 [rows, bytes per row]
            yield name, GGUFBlocks(info.ggml_type, info.shape, _convert(raw, info, arch, config),
                                   release=partial(gguf.release_pages, info.name))
            continue
        array = _convert(gguf.read_tensor(info.name), info, arch, config)  # float32, logical shape
        if not array.flags.writeable:  # an F32 tensor is a view of the read-only file map
            array = array.copy()
        yield name, torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


def _warn_ignored_tensors(gguf: GGUFFile) -> None:
    if "rope_freqs.weight" in gguf.tensors:
        warnings.warn(
            f"{gguf.path.name}: the rope_freqs tensor (Llama 3.1 long-context RoPE factors) is ignored; "
            "positions beyond the original context length behave like plain RoPE",
            stacklevel=3,
        )


def _generation_defaults(gguf: GGUFFile, tokenizer: Tokenizer) -> dict:
    defaults: dict = {}
    eos_ids = sorted(tokenizer.end_of_turn_token_ids)
    if eos_ids:
        defaults["eos_token_id"] = eos_ids
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("padding_token_id", "pad_token_id")):
        value = gguf.metadata.get(f"tokenizer.ggml.{key}")
        if value is not None:
            defaults[hf_key] = value
    for key, hf_key in _SAMPLING_KEYS.items():
        value = gguf.metadata.get(f"general.sampling.{key}")
        if value is not None:
            defaults[hf_key] = value
    return defaults


def load_gguf(path: str | Path, dtype: torch.dtype) -> GGUFModel:
    """Open a GGUF file: config and tokenizer now, weights lazily as the iterator is consumed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    gguf = GGUFFile(path)
    if gguf.architecture not in GGUF_ARCHITECTURES:
        raise GGUFConfigError(
            f"{path.name}: GGUF architecture must be one of {sorted(GGUF_ARCHITECTURES)}, got {gguf.architecture!r}"
        )
    metadata_digest = gguf.metadata_digest()
    config = cached_config(gguf.metadata, set(gguf.tensors), metadata_digest)   # transformers' or a PlainConfig
    for name in gguf.tensors:  # fail on an unknown tensor now, not halfway through loading
        hf_tensor_name(name, gguf.architecture)
    _warn_ignored_tensors(gguf)
    tokenizer = load_gguf_tokenizer(path, model_type=config.model_type, metadata_digest=metadata_digest)
    generation_defaults = _generation_defaults(gguf, tokenizer)
    fingerprint = file_fingerprint(path, gguf, metadata_digest)
    gguf.drop_vocabulary()  # the weights iterator keeps the file open until the last layer
    return GGUFModel(
        config=config,
        weights=_iter_weights(gguf, config, dtype),
        tokenizer=tokenizer,
        generation_defaults=generation_defaults,
        fingerprint=fingerprint,
    )


def file_fingerprint(path: Path, gguf: GGUFFile, metadata_digest: str) -> str:
    """SHA-256 of the file's size and modification time, its metadata (`GGUFFile.metadata_digest`) and
    its tensor table: a file rewritten in place (a new fine-tune under the same name) changes it,
    without reading the tensors."""
    stat = path.stat()
    table = [(info.name, int(info.ggml_type), list(info.shape), info.offset) for info in gguf.tensors.values()]
    key = repr((stat.st_size, stat.st_mtime_ns, metadata_digest, table))
    return hashlib.sha256(key.encode()).hexdigest()
