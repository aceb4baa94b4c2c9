"""GPTQ and AWQ tensors written by their published packing code (AutoGPTQ `QuantLinear.pack`, AutoAWQ
`WQLinear_GEMM.from_linear`), from known integer codes, zeros and scales: the reference that ondo's
decoder is checked against. Plain loops over the layout, independent of ondo's vectorized unpacking."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


@dataclass
class Quantized:
    """w[n, k] = scales[g_idx[k], n] * (codes[k, n] - zeros[g_idx[k], n]), all in [K, N] orientation."""

    codes: np.ndarray      # int [K, N] in 0..15
    zeros: np.ndarray      # int [G, N] in 0..15
    scales: torch.Tensor   # float16 [G, N]
    g_idx: np.ndarray      # int [K]

    def dense(self) -> torch.Tensor:
        """The dense weight [N, K] in HF layout, computed in float64 (exact for these values)."""
        s = self.scales.double().numpy()[self.g_idx]                                  # [K, N]
        w = s * (self.codes - self.zeros[self.g_idx])
        return torch.from_numpy(w.T.copy()).float()


def quantize(weight: torch.Tensor, group: int, g_idx: np.ndarray | None = None) -> Quantized:
    """Asymmetric 4-bit per (group, output) of a dense [N, K] weight, groups given by g_idx."""
    n, k = weight.shape
    g_idx = np.arange(k) // group if g_idx is None else g_idx
    w = weight.t().double().numpy()                                                   # [K, N]
    groups = k // group
    low = np.stack([w[g_idx == g].min(0) for g in range(groups)])                     # [G, N]
    high = np.stack([w[g_idx == g].max(0) for g in range(groups)])
    scales = torch.from_numpy(np.maximum((high - low) / 15, 1e-4)).half()
    s = scales.double().numpy()
    zeros = np.clip(np.round(-low / s), 0, 15).astype(np.int64)
    codes = np.clip(np.round(w / s[g_idx] + zeros[g_idx]), 0, 15).astype(np.int64)
    return Quantized(codes, zeros, scales, g_idx)


def gptq_tensors(q: Quantized, v1: bool = True) -> dict[str, torch.Tensor]:
    """AutoGPTQ layout: qweight [K/8, N] packs 8 inputs per word (input 8i+j in bits 4j); qzeros [G, N/8]
    packs 8 outputs per word; the v1 format stores each zero minus one."""
    k, n = q.codes.shape
    qweight = np.zeros((k // 8, n), dtype=np.uint32)
    for row in range(k // 8):
        for j in range(8):
            qweight[row] |= q.codes[8 * row + j].astype(np.uint32) << (4 * j)
    zeros = (q.zeros - 1 if v1 else q.zeros).astype(np.uint32)
    qzeros = np.zeros((zeros.shape[0], n // 8), dtype=np.uint32)
    for col in range(n // 8):
        for j in range(8):
            qzeros[:, col] |= (zeros[:, 8 * col + j] & 15) << (4 * j)
    return {"qweight": torch.from_numpy(qweight.view(np.int32)), "qzeros": torch.from_numpy(qzeros.view(np.int32)),
            "scales": q.scales, "g_idx": torch.from_numpy(q.g_idx.astype(np.int32))}


def awq_tensors(q: Quantized) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM layout: qweight [K, N/8] and qzeros [G, N/8], nibble i of a word holding column
    8c + AWQ_ORDER[i]; zeros stored as they are."""
    def pack(values: np.ndarray) -> torch.Tensor:
        rows, cols = values.shape
        packed = np.zeros((rows, cols // 8), dtype=np.uint32)
        for col in range(cols // 8):
            for i in range(8):
                packed[:, col] |= values[:, 8 * col + AWQ_ORDER[i]].astype(np.uint32) << (4 * i)
        return torch.from_numpy(packed.view(np.int32))

    return {"qweight": pack(q.codes), "qzeros": pack(q.zeros), "scales": q.scales}
