"""Linear methods beyond dense, and the loader's choice of one per layer.

| `quantization` | applies to | storage |
|---|---|---|
| None (default) | whatever the checkpoint holds: GGUF blocks stay packed, a folder's `quantization_config` is read | see below |
| "none" | a GGUF file | every tensor dequantized to the run dtype (the reference the packed model is tested against) |
| "int4", "int8", "nf4" | a dense model folder, quantized while it loads | int4 planes, int8 per channel, NF4 |

Under on-the-fly quantization the embedding stays dense (as bitsandbytes leaves it), and so does a
tied LM head, which is the embedding. Under int4 and NF4 an untied LM head is int8 per row where the
run is on a GPU in bf16/fp16 and the engine decodes at most INT8_HEAD_MAX_ROWS sequences a step
(`lm_head_method`): it is the largest matrix a decode step reads (Llama-3-8B: 1.05 GB in bf16, ~0.23 ms
of a 2.75 ms int4 token on an H200; one stream 363 -> 381 tok/s), and per-row int8 costs far
less than the 4-bit layers before it (Gemma 3 270M: +0.46 % perplexity from its head alone, against
+10 to +21 % from int4; llama.cpp keeps its output matrix at 6 to 8 bits, gpt-fast quantizes it with the rest).
Under int8 the head stays dense: those +0.46 % would be half of what int8 is allowed. On the CPU, and
in float32, it stays dense too: no int8 kernel there reads it faster than the dense product. Nor above
INT8_HEAD_MAX_ROWS rows, where the int8 kernel (`int8_mm`) loses to cuBLAS on the dense head.
A GGUF file keeps its token embedding packed too, since lookups read one row at a time.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ondo.layers.linear import DENSE, Linear, LinearMethod, LMHead, VocabEmbedding

ON_THE_FLY = ("int8", "int4", "nf4")
# The most rows an int8 LM head serves: the Llama-3-8B head on an H200 (.device timing, one CUDA graph),
# int8_mm against bf16 cuBLAS, at 1 / 16 / 32 / 64 / 128 / 256 rows: 0.51 / 0.54 / 0.60 / 0.91 / 1.85 / 2.85x
# the time (256 rows: 1.12 ms against 0.39; 256 x (512 + 256) int4 throughput 8,006 -> 7,614 tok/s with it).
INT8_HEAD_MAX_ROWS = 64
QUANTIZATION_CHOICES = (*ON_THE_FLY, "none")


class QuantizationError(ValueError):
    """A quantization that does not apply to this model or layer; the message says which and why."""


def gguf_factory(quantization: str | None, repacked=None) -> Callable[[Linear], LinearMethod]:
    """The method of a GGUF file's layers; `repacked`: where packed layers are kept between loads
    (`GGUFLinearMethod`)."""
    if quantization not in (None, "none"):
        raise QuantizationError(f"quantization={quantization!r} applies to model folders; a GGUF file is "
                                "already quantized (use None to keep its blocks packed, or 'none' to dequantize)")
    if quantization == "none":
        return lambda layer: DENSE
    from ondo.layers.quantization.gguf_blocks import GGUFLinearMethod

    method = GGUFLinearMethod(repacked)
    return lambda layer: method


def folder_factory(quantization: str | None, hf_config, device: torch.device | None = None,
                   dtype: torch.dtype | None = None, max_rows: int | None = None) -> Callable[[Linear], LinearMethod]:
    """The method for each layer of a model folder: `quantization` asked for, or its quantization_config.
    The run's `device`, `dtype` and `max_rows` (sequences a step) choose an untied LM head's method under
    on-the-fly quantization."""
    if quantization in (None, "none"):
        from ondo.layers.quantization.prequantized import prequantized_factory

        return prequantized_factory(hf_config) or (lambda layer: DENSE)
    if quantization not in ON_THE_FLY:
        raise QuantizationError(f"quantization must be one of {list(QUANTIZATION_CHOICES)} or None, got {quantization!r}")
    if getattr(hf_config, "quantization_config", None):
        raise QuantizationError(f"this folder is already quantized ({_describe(hf_config.quantization_config)}); "
                                f"load it without quantization={quantization!r}")
    method = _on_the_fly_method(quantization)
    head = lm_head_method(quantization, device, dtype, max_rows)

    def factory(layer: Linear) -> LinearMethod:
        if isinstance(layer, LMHead):
            return head
        return DENSE if isinstance(layer, VocabEmbedding) else method

    return factory


def lm_head_method(quantization: str, device: torch.device | None, dtype: torch.dtype | None,
                   max_rows: int | None) -> LinearMethod:
    """An untied LM head's method under on-the-fly `quantization`: int8 per row under the 4-bit formats
    on a GPU in bf16/fp16 for steps of at most INT8_HEAD_MAX_ROWS sequences, where the int8 kernels read
    it at up to twice the speed of the dense product; dense elsewhere (module docstring)."""
    on_gpu = device is not None and torch.device(device).type == "cuda"
    if (quantization == "int8" or not on_gpu or dtype not in (torch.bfloat16, torch.float16)
            or max_rows is None or max_rows > INT8_HEAD_MAX_ROWS):
        return DENSE
    from ondo.layers.quantization.int8 import Int8Method

    return Int8Method()


def _on_the_fly_method(quantization: str) -> LinearMethod:
    if quantization == "int4":
        from ondo.layers.quantization.int4 import Int4Method

        return Int4Method()
    if quantization == "int8":
        from ondo.layers.quantization.int8 import Int8Method

        return Int8Method()
    from ondo.layers.quantization.nf4 import NF4Method

    return NF4Method()


def _describe(quantization_config) -> str:
    config = quantization_config if isinstance(quantization_config, dict) else vars(quantization_config)
    return str(config.get("quant_method", "unknown method"))
