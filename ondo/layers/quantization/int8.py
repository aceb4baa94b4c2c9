"""int8 weight-only: symmetric, one scale per output channel (row), w = code * scale, code in [-127, 127].

This is bitsandbytes' LLM.int8 weight format (a saved 8-bit model holds exactly these codes and
`SCB` = the row absmax, so scale = SCB / 127) and gpt-fast's int8 weight-only scheme. Rows are
independent, so each shard of a merged layer (q/k/v, gate/up) is quantized the moment it arrives:
no dense copy of the layer is ever staged.

Storage: `qweight` int8 [N, K] and `weight_scale` float32 [N], on the run device.

Kernels (`apply`): on the CPU, bfloat16/float16 activations and a small batch go through torch's
int8 weight-only kernel (`torch._weight_int8pack_mm`), which reads the int8 bytes directly (decode
is bound by them: half of bfloat16's traffic). Its float32 path costs time in proportion to the batch
(measured here: several times a float32 GEMV from two tokens on), so float32 runs and large batches
(prefill) dequantize a few thousand rows at a time into the activation dtype and use the dense GEMM.
On a GPU Triton kernels (`int8_triton.py`) read the int8 codes: a GEMV on the CUDA cores for one
row, a tensor-core kernel up to 128 rows; larger batches dequantize the matrix once in a Triton pass
and take the dense product.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ondo.layers.linear import Linear, LinearMethod, _check_shape, row_chunks

# Largest batch the CPU int8 kernel serves; above it, dequantize + dense GEMM wins.
CPU_KERNEL_MAX_TOKENS = 16
CPU_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
# On a GPU the Triton kernels (`int8_triton.int8_linear`) serve every batch, choosing by its size
# (dequantizing a whole matrix per call in torch ops, through a float32 copy, cost 3x the step time
# of a 256-sequence decode batch on the Llama-3-8B shape; `int8_dequant` writes it in one pass).
GPU_KERNEL_MAX_TOKENS = 1 << 30
# Rows dequantized at once on the dense path: scratch stays at ROW_CHUNK * K elements.
ROW_CHUNK = 4096


@dataclass
class Int8Rows:
    """Per-row int8 codes: w[n, k] = codes[n, k] * scale[n] (a bitsandbytes 8-bit weight, or ours)."""

    codes: torch.Tensor      # int8 [N, K]
    scale: torch.Tensor      # float32 [N]

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @classmethod
    def from_absmax(cls, codes: torch.Tensor, absmax: torch.Tensor) -> "Int8Rows":
        # bitsandbytes dequantizes as codes * (SCB * (1 / 127)); the same float32 product keeps it exact.
        return cls(codes, absmax.float() * (1.0 / 127.0))

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale[:, None]                              # [N, K] float32

    def shard(self, dim: int, index: slice) -> "Int8Rows":
        """A tensor-parallel part: rows keep their own scales; an input slice keeps every row's scale."""
        if dim == 0:
            return Int8Rows(self.codes[index], self.scale[index])
        return Int8Rows(self.codes[:, index], self.scale)


def quantize_int8(weight: torch.Tensor) -> Int8Rows:
    """Dense [N, K] -> int8 codes with one scale per row (scale = absmax / 127), as bitsandbytes rounds."""
    weight = weight.float()
    absmax = weight.abs().amax(dim=1)                                                # [N]
    codes = torch.round(weight * (127.0 / absmax.clamp_min(1e-30)[:, None]))         # [N, K]
    return Int8Rows.from_absmax(codes.clamp_(-127, 127).to(torch.int8), absmax)


class Int8Method(LinearMethod):
    name = "int8"

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        layer.run_dtype = dtype
        device = torch.get_default_device()
        layer.register_buffer("qweight", torch.zeros(layer.out_features, layer.in_features, dtype=torch.int8,
                                                     device=device), persistent=False)
        layer.register_buffer("weight_scale", torch.zeros(layer.out_features, dtype=torch.float32, device=device),
                              persistent=False)
        layer.int8_rows_loaded = 0

    def load_weight(self, layer: Linear, tensor, rows: slice) -> None:
        if not isinstance(tensor, Int8Rows):
            dense = tensor if isinstance(tensor, torch.Tensor) else tensor.dequantize()
            _check_shape(layer, dense, layer.qweight[rows].shape)
            tensor = quantize_int8(dense)
        _check_shape(layer, tensor.codes, layer.qweight[rows].shape)
        layer.qweight[rows].copy_(tensor.codes)
        layer.weight_scale[rows].copy_(tensor.scale)
        layer.int8_rows_loaded += rows.stop - rows.start

    def finish_loading(self, layer: Linear) -> None:
        if layer.int8_rows_loaded != layer.out_features:
            raise ValueError(f"{layer.int8_rows_loaded} of {layer.out_features} output rows were loaded")

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                                 # [T, in]
        if x.is_cuda and x.dtype in CPU_KERNEL_DTYPES and x.shape[0] == 1 and x.shape[-1] % 4 == 0:
            from ondo.layers.quantization.int8_triton import int8_gemv

            out = int8_gemv(x.contiguous(), layer.qweight, layer.weight_scale)
        elif x.is_cuda and x.dtype in CPU_KERNEL_DTYPES and x.shape[-1] % 32 == 0 and x.shape[0] <= GPU_KERNEL_MAX_TOKENS:
            from ondo.layers.quantization.int8_triton import int8_linear

            out = int8_linear(x.contiguous(), layer.qweight, layer.weight_scale)
        elif self._use_kernel(x):
            out = torch._weight_int8pack_mm(x.contiguous(), layer.qweight, layer.weight_scale.to(x.dtype))
        else:
            out = torch.cat([F.linear(x, self._rows(layer, rows, x.dtype))          # [T, out]
                             for rows in row_chunks(layer.out_features, ROW_CHUNK)], dim=1)
        if bias is not None:
            out = out + bias
        return out.reshape(*shape[:-1], layer.out_features)

    @staticmethod
    def _use_kernel(x: torch.Tensor) -> bool:
        """The CPU int8 kernel for small bfloat16/float16 batches; everything else dequantizes."""
        return x.device.type == "cpu" and x.dtype in CPU_KERNEL_DTYPES and x.shape[0] <= CPU_KERNEL_MAX_TOKENS

    def embed(self, layer: Linear, token_ids: torch.Tensor) -> torch.Tensor:
        codes = F.embedding(token_ids, layer.qweight)                                # [..., in] int8
        scale = F.embedding(token_ids, layer.weight_scale[:, None])                  # [..., 1]
        return (codes.float() * scale).to(layer.run_dtype)

    def dense_weight(self, layer: Linear) -> torch.Tensor:
        return self._rows(layer, slice(0, layer.out_features), layer.run_dtype)

    def _rows(self, layer: Linear, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows [n, K]: the product is taken in float32, then rounded once to `dtype`."""
        return (layer.qweight[rows].float() * layer.weight_scale[rows, None]).to(dtype)

