"""GGUF block formats kept packed: each supported ggml type is decoded, losslessly, into `AffineCodes`.

Every type below is affine per group (llama.cpp's own dequantization, as `gguf.quants` writes it):

| type | block bytes | group | bits | w = |
|---|---|---|---|---|
| Q4_0 | 18 / 32 | 32 | 4 | d * (q - 8) |
| Q4_1 | 20 / 32 | 32 | 4 | d * q + m |
| Q5_0 | 22 / 32 | 32 | 5 | d * (q - 16) |
| Q5_1 | 24 / 32 | 32 | 5 | d * q + m |
| Q8_0 | 34 / 32 | 32 | 8 | d * q (q signed) |
| Q4_K | 144 / 256 | 32 | 4 | d * sc_j * q - dmin * m_j |
| Q5_K | 176 / 256 | 32 | 5 | d * sc_j * q - dmin * m_j |
| Q6_K | 210 / 256 | 16 | 6 | d * sc_j * (q - 32) |

so they all land in `Int4PlanesMethod` storage (one 4-bit plane, or two for 5- to 8-bit codes). The
scales are exact in float32; a bfloat16 run rounds each group's scale and zero to bfloat16 (8 bits of
mantissa), the same rounding the dense bfloat16 model applies to every weight. F32/F16/BF16 tensors,
and the rarer types (Q2_K, Q3_K, IQ*), are dequantized to the run dtype and stay dense.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize

from ondo.layers.linear import Linear
from ondo.layers.quantization.int4_planes import TILE_N, AffineCodes, Int4PlanesMethod, concat_rows, finish_cpu_storage

PACKED_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K)


@dataclass
class GGUFBlocks:
    """One GGUF matrix as stored in the file: raw blocks, rows in HF order (any q/k permutation undone)."""

    ggml_type: T
    shape: tuple[int, int]       # [out_features, in_features]
    data: np.ndarray             # uint8 [out_features, bytes per row] (a view of the memory map)
    # Called once the layer holds its own copy, so the file's pages can leave resident memory.
    release: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def dequantize(self) -> torch.Tensor:
        return torch.from_numpy(dequantize(np.ascontiguousarray(self.data), self.ggml_type).reshape(self.shape))

    def shard(self, dim: int, index: slice) -> "GGUFBlocks | None":
        """A tensor-parallel part: any rows; inputs only on block boundaries (None otherwise, and the
        caller dequantizes that part, so the layer loads it dense)."""
        n, k = self.shape
        if dim == 0:
            return GGUFBlocks(self.ggml_type, (index.stop - index.start, k), self.data[index], self.release)
        block_elems, block_bytes = GGML_QUANT_SIZES[self.ggml_type]
        if index.start % block_elems or index.stop % block_elems:
            return None
        columns = slice(index.start // block_elems * block_bytes, index.stop // block_elems * block_bytes)
        return GGUFBlocks(self.ggml_type, (n, index.stop - index.start), self.data[:, columns], self.release)

    def pad_rows(self, rows: int) -> "GGUFBlocks":
        """Zero rows appended: all-zero blocks decode to zero weights in every ggml type (d = 0)."""
        zeros = np.zeros((rows - self.shape[0], self.data.shape[1]), dtype=self.data.dtype)
        return GGUFBlocks(self.ggml_type, (rows, self.shape[1]), np.concatenate([self.data, zeros]), self.release)


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 fields [..., 2] uint8 -> float32 [...]."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n] codes: all low nibbles, then all high nibbles (ggml's order)."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _high_bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """A little-endian bit field of `count` bits [..., count / 8] -> [..., count] bits."""
    bits = (qh[..., :, None] >> torch.arange(8, dtype=torch.uint8)) & 1                # [..., bytes, 8]
    return bits.flatten(-2)[..., :count]


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte packed 6-bit scales and mins -> ([..., 8], [..., 8]) (as gguf.quants unpacks)."""
    d, m, m_d = scales.view(*scales.shape[:-1], 3, 4).unbind(-2)
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def decode_blocks(blocks: GGUFBlocks) -> AffineCodes:
    """Raw GGUF rows -> exact `AffineCodes` (codes [N, K], per-group scale and minimum)."""
    kind = blocks.ggml_type
    n, k = blocks.shape
    block_elems, block_bytes = GGML_QUANT_SIZES[kind]
    b = torch.from_numpy(np.array(blocks.data, copy=True)).view(n, k // block_elems, block_bytes)  # off the read-only map
    if kind in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        d = _f16(b[..., 0:2])                                                        # [N, B]
        has_min = kind in (T.Q4_1, T.Q5_1)
        m = _f16(b[..., 2:4]) if has_min else None
        start = 4 if has_min else 2
        if kind == T.Q8_0:
            codes, bits, offset = b[..., 2:].view(torch.int8).add(128).to(torch.uint8), 8, 128
        elif kind in (T.Q4_0, T.Q4_1):
            codes, bits, offset = _nibbles(b[..., start:]), 4, 8
        else:
            high = _high_bits(b[..., start:start + 4], 32)
            codes, bits, offset = _nibbles(b[..., start + 4:]) | (high << 4), 5, 16
        minimum = m if has_min else -offset * d
        return AffineCodes(codes.reshape(n, k), d, minimum, 32, bits)
    if kind in (T.Q4_K, T.Q5_K):
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])                               # [N, B]
        sc, mn = _k_scales(b[..., 4:16])                                             # [N, B, 8]
        if kind == T.Q4_K:
            low, bits = b[..., 16:].reshape(n, -1, 4, 32), 4
            codes = torch.stack([low & 15, low >> 4], dim=3)                         # [N, B, 4, 2, 32]
        else:
            high = (b[..., 16:48][..., None, :] >> torch.arange(8, dtype=torch.uint8)[:, None]) & 1  # [N, B, 8, 32]
            low, bits = b[..., 48:].reshape(n, -1, 4, 32), 5
            codes = torch.stack([low & 15, low >> 4], dim=3).flatten(2, 3) | (high << 4)
        scale, minimum = d[..., None] * sc, -dmin[..., None] * mn                    # [N, B, 8]
        return AffineCodes(codes.reshape(n, k), scale.reshape(n, -1), minimum.reshape(n, -1), 32, bits)
    if kind == T.Q6_K:
        ql, qh = b[..., 0:128].reshape(n, -1, 2, 1, 64), b[..., 128:192].reshape(n, -1, 2, 1, 32)
        sc = b[..., 192:208].view(torch.int8).float()                                # [N, B, 16]
        d = _f16(b[..., 208:210])
        low = ((ql >> torch.tensor([0, 4], dtype=torch.uint8)[:, None]) & 15).reshape(n, -1, 8, 32)
        high = ((qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]) & 3).reshape(n, -1, 8, 32)
        scale = d[..., None] * sc                                                    # [N, B, 16]
        return AffineCodes((low | (high << 4)).reshape(n, k), scale.reshape(n, -1),
                           (-32 * scale).reshape(n, -1), 16, 6)
    raise ValueError(f"GGUF type {kind.name} is not kept packed; packed types are "
                     f"{', '.join(t.name for t in PACKED_TYPES)}")


# Rows repacked at a time: a multiple of every CPU's tile (`int4_planes.TILE_N`), so every chunk packs on its own, and small
# enough that a chunk's temporaries (codes, planes, tiles: a few bytes per weight) stay about a MB even
# for a 49152-row embedding, instead of several hundred MB for the whole matrix at once.
REPACK_ROWS = 256
# (group, bits) of each packed type, known before decoding: a layer's parts share the smallest group and
# the widest code, as `concat_rows` would choose for the whole matrix.
_GROUP_AND_BITS = {T.Q4_0: (32, 4), T.Q4_1: (32, 4), T.Q5_0: (32, 5), T.Q5_1: (32, 5), T.Q8_0: (32, 8),
                   T.Q4_K: (32, 4), T.Q5_K: (32, 5), T.Q6_K: (16, 6)}


class _ChunkLayer(torch.nn.Module):
    """What `Int4PlanesMethod.store` fills for one chunk of rows, before the rows move into the layer."""

    def __init__(self, dtype: torch.dtype, gpu_layout: bool):
        super().__init__()
        self.run_dtype, self.run_device, self.gpu_layout = dtype, torch.device("cpu"), gpu_layout


class GGUFLinearMethod(Int4PlanesMethod):
    """Linear layers of a GGUF file: packed types stay packed, dense ones (F32/F16/...) stay dense.

    `repacked`: a store of packed layers (`ondo.loader.repack_cache.RepackCache`) that later loads of
    the same file read instead of repacking: `take(layer, signature)` fills a layer it holds, `add`
    records one packed here."""

    name = "gguf"

    def __init__(self, repacked=None):
        self.repacked = repacked

    def load_weight(self, layer: Linear, tensor, rows: slice) -> None:
        layer.staged.append((rows, tensor))

    def finish_loading(self, layer: Linear) -> None:
        staged = layer.staged
        if all(isinstance(t, GGUFBlocks) and t.ggml_type in PACKED_TYPES for _, t in staged):
            del layer.staged
            staged = sorted(staged, key=lambda item: item[0].start)
            signature = [[rows.start, rows.stop, blocks.ggml_type.name, list(blocks.shape)] for rows, blocks in staged]
            if self.repacked is None or not self.repacked.take(layer, signature):
                self._repack(layer, staged)
                finish_cpu_storage(layer)
                if self.repacked is not None:
                    self.repacked.add(layer, signature)
            _release(staged)
            return
        # A matrix (or one of its shards) stored dense: the whole layer runs dense.
        from ondo.layers.linear import DENSE

        del layer.staged
        layer.method = DENSE
        with torch.device(layer.run_device):
            DENSE.create_weights(layer, layer.run_dtype)
        for rows, tensor in staged:
            dense = tensor.dequantize() if isinstance(tensor, GGUFBlocks) else tensor
            DENSE.load_weight(layer, dense.to(layer.run_dtype), rows)
        _release(staged)

    def _repack(self, layer: Linear, staged: list[tuple[slice, GGUFBlocks]]) -> None:
        """Decode and pack `REPACK_ROWS` output rows at a time straight into the layer's final buffers.

        Each chunk goes through the same `store` as a whole matrix would (same group, same number of
        planes), and tiles never straddle chunks, so the result is byte for byte the whole-matrix one."""
        covered = sum(rows.stop - rows.start for rows, _ in staged)
        if covered != layer.out_features:
            raise ValueError(f"{covered} of {layer.out_features} output rows were loaded")
        group = min(_GROUP_AND_BITS[blocks.ggml_type][0] for _, blocks in staged)
        bits = max(_GROUP_AND_BITS[blocks.ggml_type][1] for _, blocks in staged)
        chunk_layer = _ChunkLayer(layer.run_dtype, layer.gpu_layout)
        with _one_thread():
            self._repack_chunks(layer, staged, group, bits, chunk_layer)
        layer.planes, layer.group = chunk_layer.planes, chunk_layer.group
        layer.padded16, layer.k_eff = chunk_layer.padded16, chunk_layer.k_eff

    def _repack_chunks(self, layer: Linear, staged: list[tuple[slice, GGUFBlocks]], group: int, bits: int,
                       chunk_layer: _ChunkLayer) -> None:
        n = layer.out_features
        # Output rows are padded to whole tiles on the CPU and are columns of the words on a GPU.
        n_pad = n if layer.gpu_layout else -(-n // TILE_N) * TILE_N
        for start in range(0, n, REPACK_ROWS):
            stop = min(start + REPACK_ROWS, n)
            pieces = []
            for rows, blocks in staged:
                lo, hi = max(start, rows.start), min(stop, rows.stop)
                if lo < hi:
                    part = decode_blocks(blocks.shard(0, slice(lo - rows.start, hi - rows.start)))
                    pieces.append(AffineCodes(part.codes, part.scale, part.minimum, part.group, bits).regroup(group))
            super().store(chunk_layer, concat_rows(pieces))
            packed, scales = chunk_layer.qweight, chunk_layer.scales_and_zeros
            rows = slice(start, start + scales.shape[1])
            if start == 0:
                # CPU: tiles [N_pad, K/2], output rows along dim 0; GPU: words [K/8, N], along dim 1.
                shape = (packed.shape[0], n_pad) if layer.gpu_layout else (n_pad, packed.shape[1])
                with torch.device(layer.run_device):
                    qweight = torch.empty(shape, dtype=packed.dtype)
                    scales_and_zeros = torch.empty(scales.shape[0], n_pad, 2, dtype=scales.dtype)
            (qweight[:, rows] if layer.gpu_layout else qweight[rows]).copy_(packed)
            scales_and_zeros[:, rows].copy_(scales)
        layer.register_buffer("qweight", qweight, persistent=False)
        layer.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Repack on one CPU thread: a chunk's ops are small (a million bytes), so splitting them over
    threads gains little, and on a busy 2-core machine every op then waits at the end of its parallel
    region for a descheduled thread: the built-in model's repack took 20-40 s that way, under 1 s on one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _release(staged: list) -> None:
    """Let go of the file pages behind the layer's blocks (see `GGUFFile.release_pages`)."""
    for _, tensor in staged:
        if isinstance(tensor, GGUFBlocks) and tensor.release is not None:
            tensor.release()
