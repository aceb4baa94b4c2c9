"""The values a GGUF loader output stands for: dense tensors as they are, packed blocks through ondo's
own block decoder (`decode_blocks`, the one the packed model runs from), so comparing them with a
reference also checks that decoder."""
from __future__ import annotations

import torch

from ondo.layers.quantization.gguf_blocks import PACKED_TYPES, GGUFBlocks, decode_blocks


def dense_values(tensor) -> torch.Tensor:
    if isinstance(tensor, GGUFBlocks):
        if tensor.ggml_type in PACKED_TYPES:
            return decode_blocks(tensor).dequantize()
        return tensor.dequantize()
    return tensor
