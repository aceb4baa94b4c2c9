"""Linear methods beyond dense, and the loader's choice of one per layer.

| `quantization` | applies to | storage |
|---|---|---|
| None (default) | whatever the checkpoint holds: GGUF blocks stay packed, a folder's `quantization_config` is read | see below |
| "none" | a GGUF file | every tensor dequantized to the run dtype (the reference the packed model is tested against) |
| "int4", "int8", "nf4" | a dense model folder, quantized while it loads | int4 planes, int8 per channel, NF4 |

Embeddings and the LM head stay dense under on-the-fly quantization (as bitsandbytes leaves them);
a GGUF file keeps its token embedding packed too, since lookups read one row at a time.
"""
from __future__ import annotations

from collections.abc import Callable

from ondo.layers.linear import DENSE, Linear, LinearMethod, LMHead, VocabEmbedding

ON_THE_FLY = ("int8", "int4", "nf4")
QUANTIZATION_CHOICES = (*ON_THE_FLY, "none")


class QuantizationError(ValueError):
    """A quantization that does not apply to this model or layer; the message says which and why."""


def gguf_factory(quantization: str | None) -> Callable[[Linear], LinearMethod]:
    if quantization not in (None, "none"):
        raise QuantizationError(f"quantization={quantization!r} applies to model folders; a GGUF file is "
                                "already quantized (use None to keep its blocks packed, or 'none' to dequantize)")
    if quantization == "none":
        return lambda layer: DENSE
    from ondo.layers.quantization.gguf_blocks import GGUFLinearMethod

    method = GGUFLinearMethod()
    return lambda layer: method


def folder_factory(quantization: str | None, hf_config) -> Callable[[Linear], LinearMethod]:
    """The method for each layer of a model folder: `quantization` asked for, or its quantization_config."""
    if quantization in (None, "none"):
        from ondo.layers.quantization.prequantized import prequantized_factory

        return prequantized_factory(hf_config) or (lambda layer: DENSE)
    if quantization not in ON_THE_FLY:
        raise QuantizationError(f"quantization must be one of {list(QUANTIZATION_CHOICES)} or None, got {quantization!r}")
    if getattr(hf_config, "quantization_config", None):
        raise QuantizationError(f"this folder is already quantized ({_describe(hf_config.quantization_config)}); "
                                f"load it without quantization={quantization!r}")
    method = _on_the_fly_method(quantization)
    return lambda layer: DENSE if isinstance(layer, (VocabEmbedding, LMHead)) else method


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
