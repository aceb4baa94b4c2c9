"""GPTQ and AWQ int4 checkpoints, decoded exactly into `AffineCodes` (stored by `Int4PlanesMethod`).

Both formats store, per group of `group` inputs and per output column, a float16 scale s and a 4-bit
zero z, and w[n, k] = s[g, n] * (q[k, n] - z[g, n]) with g the group of input k. As affine codes:
scale = s, minimum = -z * s (exact in float32: s has 11 significant bits, z at most 5).

| | GPTQ (AutoGPTQ) | AWQ (AutoAWQ, GEMM) |
|---|---|---|
| `qweight` int32 | [K / 8, N]: input 8i + j in bits 4j of row i | [K, N / 8]: column 8c+j, nibble AWQ_ORDER.index(j) |
| `qzeros` int32 | [G, N / 8]: column 8c + j in bits 4j; v1 stores z - 1 | [G, N / 8], AWQ's order, z as is |
| `scales` float16 | [G, N] | [G, N] |
| group of input k | `g_idx[k]` | k // group |

A v1 zero (`checkpoint_format: gptq`) reads as nibble + 1, as AutoGPTQ's kernels read it (a zero of 0
cannot be stored in v1); `gptq_v2` stores zeros as they are.

GPTQ's act-order (`desc_act`) quantizes inputs in a data-dependent order, so `g_idx` is a
scattered assignment of inputs to groups. Sorting the inputs by group makes every group contiguous
again: the matrix is stored with its inputs permuted and each call permutes x the same way
(`ActOrderMethod`), which is exact. The shards of a merged layer must then share one order (they do
when quantized from the same inputs, as q/k/v and gate/up are); otherwise loading stops with an error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ondo.layers.linear import Linear, LinearMethod
from ondo.layers.quantization.int4_planes import KERNEL_GROUPS, AffineCodes, Int4PlanesMethod

_NIBBLE_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)                     # value j in bits 4j
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)                                             # nibble i holds column AWQ_ORDER[i]
_AWQ_SHIFTS = torch.tensor([4 * AWQ_ORDER.index(j) for j in range(8)], dtype=torch.int32)


def _unpack_last(packed: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] with 8 nibbles per word -> uint8 [R, 8C], word c giving values 8c .. 8c + 7."""
    nibbles = (packed[..., None] >> shifts.to(packed.device)) & 15                   # [R, C, 8]
    return nibbles.reshape(packed.shape[0], -1).to(torch.uint8)


@dataclass
class PackedInt4:
    """One GPTQ or AWQ matrix as its checkpoint stores it."""

    kind: str                        # "gptq" | "awq"
    qweight: torch.Tensor            # int32: GPTQ [K / 8, N], AWQ [K, N / 8]
    qzeros: torch.Tensor             # int32 [G, N / 8]
    scales: torch.Tensor             # float16 [G, N]
    group: int                       # inputs per group (the config's group_size; -1 there means K)
    g_idx: torch.Tensor | None = None  # int32 [K]: the group of each input (GPTQ)
    zero_shift: int = 0              # added to the stored zeros: 1 for GPTQ v1 checkpoints

    @property
    def shape(self) -> tuple[int, int]:
        n = self.scales.shape[1]
        k = self.qweight.shape[0] * 8 if self.kind == "gptq" else self.qweight.shape[0]
        return n, k

    def check(self) -> None:
        """Shapes that this decoder reads exactly; anything else is a clear error, never a wrong weight."""
        n, k = self.shape
        group = k if self.group == -1 else self.group
        if k % group:
            raise ValueError(f"{self.kind.upper()} group_size {group} does not divide in_features {k}")
        if tuple(self.scales.shape) != (k // group, n) or tuple(self.qzeros.shape) != (k // group, n // 8):
            raise ValueError(f"{self.kind.upper()} scales {tuple(self.scales.shape)} / qzeros "
                             f"{tuple(self.qzeros.shape)} do not match {k // group} groups of {n} outputs")
        if self.g_idx is not None and self.g_idx.numel() != k:
            raise ValueError(f"GPTQ g_idx has {self.g_idx.numel()} entries for {k} inputs")

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes uint8 [N, K], zeros float32 [G, N], scales float32 [G, N], group of each input [K])."""
        n, k = self.shape
        group = k if self.group == -1 else self.group
        if self.kind == "gptq":
            codes = _unpack_last(self.qweight.t(), _NIBBLE_SHIFTS)                    # [N, K]
            zeros = _unpack_last(self.qzeros, _NIBBLE_SHIFTS)                         # [G, N]
        else:
            codes = _unpack_last(self.qweight, _AWQ_SHIFTS).t()                       # [N, K]
            zeros = _unpack_last(self.qzeros, _AWQ_SHIFTS)                            # [G, N]
        groups = torch.arange(k, device=codes.device) // group
        if self.g_idx is not None:
            groups = self.g_idx.long()
        return codes.contiguous(), zeros.float() + self.zero_shift, self.scales.float(), groups

    def shard(self, dim: int, index: slice) -> "PackedInt4 | None":
        """A tensor-parallel part, cut in the packed layout: outputs on whole int32 words (8 columns),
        inputs on whole groups of a checkpoint without act-order. None otherwise: the caller
        dequantizes that part and the layer loads it dense."""
        n, k = self.shape
        start, stop = index.start, index.stop
        words = slice(start // 8, stop // 8)
        if dim == 0:
            if start % 8 or stop % 8:
                return None
            qweight = self.qweight[:, index] if self.kind == "gptq" else self.qweight[:, words]
            return PackedInt4(self.kind, qweight, self.qzeros[:, words], self.scales[:, index], self.group,
                              self.g_idx, self.zero_shift)
        group = k if self.group == -1 else self.group
        in_order = self.g_idx is None or torch.equal(self.g_idx.long(), torch.arange(k, device=self.g_idx.device) // group)
        if self.group == -1 or not in_order or start % group or stop % group or group % 8:
            return None
        groups = slice(start // group, stop // group)
        qweight = self.qweight[words] if self.kind == "gptq" else self.qweight[index]
        g_idx = None if self.g_idx is None else self.g_idx[index] - groups.start
        return PackedInt4(self.kind, qweight, self.qzeros[groups], self.scales[groups], self.group, g_idx,
                          self.zero_shift)

    def dequantize(self) -> torch.Tensor:
        codes, zeros, scales, groups = self.unpack()
        return scales[groups].t() * (codes.float() - zeros[groups].t())             # [N, K] float32

    def to_affine(self) -> tuple[AffineCodes, torch.Tensor | None]:
        """Exact affine codes with contiguous groups, and the input permutation they need (None if none)."""
        codes, zeros, scales, groups = self.unpack()
        n, k = self.shape
        group = k if self.group == -1 else self.group
        contiguous = torch.arange(k, device=groups.device) // group
        perm = None
        if not torch.equal(groups, contiguous):
            perm = torch.argsort(groups, stable=True)
            if not torch.equal(groups[perm], contiguous):
                raise ValueError(f"GPTQ g_idx does not give every group exactly {group} inputs")
            codes = codes[:, perm]
        affine = AffineCodes(codes, scales.t().contiguous(), (-zeros * scales).t().contiguous(), group, 4)
        return _kernel_group(affine), perm


def _kernel_group(affine: AffineCodes) -> AffineCodes:
    """Describe a large group (e.g. group_size -1: the whole row) with the largest kernel group dividing it."""
    if affine.group in KERNEL_GROUPS or affine.group == 16:
        return affine
    fitting = [g for g in KERNEL_GROUPS if affine.group % g == 0]
    if not fitting:
        raise ValueError(f"group size {affine.group} is not supported by the int4 kernels "
                         f"(it must be 16 or a multiple of 32)")
    return affine.regroup(max(fitting))


class CheckpointInt4Method(Int4PlanesMethod):
    """Int4 planes filled from `AffineCodes` that a GPTQ/AWQ payload decoded."""

    def __init__(self, name: str):
        self.name = name

    def to_codes(self, layer: Linear, tensor) -> AffineCodes:
        return tensor


class ActOrderMethod(LinearMethod):
    """A method over inputs stored in another order: x is permuted before the product (GPTQ act-order)."""

    def __init__(self, inner: LinearMethod):
        self.inner = inner
        self.name = f"{inner.name}+act-order"

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.apply(layer, x.index_select(-1, layer.input_perm), bias)   # [..., out]

    def embed(self, layer: Linear, token_ids: torch.Tensor) -> torch.Tensor:
        raise ValueError("an act-order GPTQ matrix cannot serve as a token embedding")

    def dense_weight(self, layer: Linear) -> torch.Tensor:
        return self.inner.dense_weight(layer)[:, torch.argsort(layer.input_perm)]    # [N, K] input order


def store_packed_int4(layer: Linear, name: str, shards: list[tuple[slice, PackedInt4]]) -> None:
    """Decode every shard of a layer and store them as int4 planes (+ the act-order permutation)."""
    decoded = [(rows, *payload.to_affine()) for rows, payload in shards]
    perms = [perm for _, _, perm in decoded]
    if any(p is not None for p in perms):
        if any(p is None or not torch.equal(p, perms[0]) for p in perms):
            raise ValueError("GPTQ act-order (desc_act) shards of this merged layer use different input orders "
                             "(g_idx); ondo needs one order per layer")
    method = CheckpointInt4Method(name)
    with torch.device(layer.run_device):
        method.create_weights(layer, layer.run_dtype)
    for rows, affine, _ in decoded:
        method.load_weight(layer, affine, rows)
    method.finish_loading(layer)
    layer.method = method
    if perms[0] is not None:
        layer.register_buffer("input_perm", perms[0].to(layer.run_device), persistent=False)
        layer.method = ActOrderMethod(method)
