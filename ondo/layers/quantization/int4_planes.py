"""Weights kept as planes of 4-bit codes: the storage behind GGUF blocks, int4 and int4 checkpoints.

Every format here is *affine per group*: along each row, a group of `group` weights shares a scale
and a minimum, w = scale * code + minimum, with integer codes of `bits` bits. Such a matrix is exactly
a sum of 4-bit planes, code = sum_p 16^p * code_p, so a 5-, 6- or 8-bit format (Q5_K, Q6_K, Q8_0) is
two int4 matrices side by side along K multiplied by [x, x]: one kernel call, no rounding.

Storage, chosen by the run device at load (both lossless):
- CPU: `qweight` uint8 [N_pad, P * K_eff / 2] in torch's CPU int4 tile layout, whose tile depends on
  the CPU (`cpu_tile_rows`: T = 64 rows with AVX512, 32 with AVX2; the byte at [tile, k, d] holds row
  d in its low nibble and row d + T/2 in its high one). N is padded to 64; groups of 16 (Q6_K) are
  padded to 32 with zero inputs, so K_eff = 2K for them, else K.
- CUDA: `qweight` int32 [P * K_pad / 8, N], codes packed along K (`int4_gpu.py`); K_eff = K_pad.
- Both: `scales_and_zeros` [P * K_eff / g, N(_pad), 2] in the run dtype: w = (code_p - 8) * scale_p + zero_p.
  On the CPU where ondo's kernel reads them (`compact_cpu_scales`), float32 pairs become float16 pairs
  (scale_p, zero_p - 8 scale_p) when every value survives that exactly: GGUF's Q4_0, Q4_1, Q5_0 and Q8_0,
  whose scales are float16 in the file. A weight then costs 0.625 bytes to read, as in the file, not 0.75.
  There they are also kept in blocks of 32 rows, [N_pad / 32, P * G, 32, 2] (`block_cpu_scales`), and on
  AVX2 two planes that are one code's digits as whole code bytes (`mark_digit_planes`).

Kernels (`apply`): on the CPU, ondo's own kernel (`cpu_kernels/int4_mm.c`) reads the packed bytes for
every batch size; torch's fused kernel (`aten._weight_int4pack_mm_for_cpu`) is the fallback where ondo's
kernels are not built (no C compiler, ONDO_CPU_KERNELS=0, float16). torch's kernel is vectorized for
bfloat16 activations only, and exact but 10 to 20 times slower for float32 (2-core AVX2, a 1536 x 576
product: 1.3 ms against 0.12; 128 rows: 370 ms against 19), which is why int4 weights run in bfloat16 by
default where it is the kernel, and in float32 where ondo's is (`loader.resolve_dtype`). On a GPU, Triton kernels (`int4_gpu_kernels.py`): a fused kernel for
decode-sized batches, dequantize + cuBLAS above that, all inside the CUDA graphs.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ondo.layers import cpu_kernels
from ondo.layers.linear import Linear, LinearMethod, row_chunks
from ondo.layers.quantization.int4_gpu import pack_words, padded_k

# CPU rows are padded to a multiple of torch's largest tile (64 rows, AVX512), which every smaller
# tile (`cpu_tile_rows`) divides: the padding is the same on every CPU.
TILE_N = 64
KERNEL_GROUPS = (32, 64, 128, 256)
# Largest batch the int4 kernels serve (benchmarks/int4_kernel.py): on the CPU, torch's kernel costs
# about twice a bfloat16 GEMM per row at any batch, while dequantizing the matrix per call costs far
# more below a few hundred rows, so it serves every batch; that also keeps a prefix-cache hit (one
# row) on the same arithmetic as the full prefill. The GPU path picks its own kernel by batch.
CPU_KERNEL_MAX_TOKENS = 1 << 30
GPU_KERNEL_MAX_TOKENS = 1 << 30


@dataclass
class AffineCodes:
    """w[n, k] = scale[n, k // group] * codes[n, k] + minimum[n, k // group]."""

    codes: torch.Tensor      # uint8 [N, K], each < 2 ** bits
    scale: torch.Tensor      # float32 [N, K // group]
    minimum: torch.Tensor    # float32 [N, K // group]
    group: int
    bits: int

    def dequantize(self) -> torch.Tensor:
        groups = self.codes.float().view(self.codes.shape[0], -1, self.group)        # [N, G, group]
        return (groups * self.scale[..., None] + self.minimum[..., None]).flatten(1)  # [N, K] float32

    def regroup(self, group: int) -> "AffineCodes":
        """The same weights described with smaller groups (each scale repeated)."""
        if group == self.group:
            return self
        repeat = self.group // group
        return AffineCodes(self.codes, self.scale.repeat_interleave(repeat, 1),
                           self.minimum.repeat_interleave(repeat, 1), group, self.bits)


def concat_rows(parts: list[AffineCodes]) -> AffineCodes:
    """Stack shards (q/k/v, gate/up) that may come in different formats into one matrix."""
    group, bits = min(p.group for p in parts), max(p.bits for p in parts)
    parts = [p.regroup(group) for p in parts]
    return AffineCodes(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                       torch.cat([p.minimum for p in parts]), group, bits)


def pack_tiles(codes: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """uint8 codes [N, K] (N a multiple of 64, each < 16) -> torch's CPU int4 tile layout [N, K / 2]:
    tiles of `tile` rows (this CPU's by default), byte [tile, k, d] holding row d in its low nibble and
    row d + tile / 2 in its high one."""
    tile = tile or cpu_tile_rows()
    n, k = codes.shape
    tiles = codes.view(n // tile, tile, k).transpose(1, 2)                          # [N/T, K, T]
    return (tiles[..., :tile // 2] | (tiles[..., tile // 2:] << 4)).reshape(n, k // 2).contiguous()


def unpack_tiles(packed: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """The inverse of `pack_tiles`: [N, K / 2] -> uint8 codes [N, K]."""
    tile = tile or cpu_tile_rows()
    n, half = packed.shape
    tiles = packed.view(n // tile, 2 * half, tile // 2)                             # [N/T, K, T/2]
    codes = torch.cat([tiles & 15, tiles >> 4], dim=2)                              # [N/T, K, T]
    return codes.transpose(1, 2).reshape(n, 2 * half)


@functools.cache
def cpu_tile_rows() -> int:
    """Rows per tile of torch's CPU int4 layout on this machine. torch fixes it per instruction set
    when it is built (`Vectorized<float>::size() * 4`: 64 with AVX512, 32 with AVX2) and its kernel
    reads only that layout, so it is found by packing a probe with torch's own packer: a layout ondo
    does not know stops the load with a clear error instead of multiplying by scrambled weights."""
    probe = ((torch.arange(2 * TILE_N)[:, None] * 7 + torch.arange(64) * 3) % 16).to(torch.int32)  # [128, 64]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for tile in (64, 32, 16):
        if packed.shape == (2 * TILE_N, 32) and torch.equal(packed, pack_tiles(probe.to(torch.uint8), tile)):
            return tile
    raise RuntimeError("torch's CPU int4 kernel uses a weight layout ondo does not know on this machine "
                       f"(torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}); "
                       'load the model with quantization="none" to run it dequantized')


class Int4PlanesMethod(LinearMethod):
    """Storage and kernels of affine-per-group weights; subclasses turn their input into `AffineCodes`."""

    name = "int4-planes"

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        layer.run_dtype, layer.run_device = dtype, torch.get_default_device()
        layer.gpu_layout = layer.run_device.type == "cuda"
        layer.staged = []                                   # (rows, AffineCodes | dense tensor) until loaded

    def load_weight(self, layer: Linear, tensor, rows: slice) -> None:
        layer.staged.append((rows, self.to_codes(layer, tensor)))

    def to_codes(self, layer: Linear, tensor) -> AffineCodes:
        raise NotImplementedError

    def finish_loading(self, layer: Linear) -> None:
        staged = sorted(layer.staged, key=lambda item: item[0].start)
        covered = sum(rows.stop - rows.start for rows, _ in staged)
        if covered != layer.out_features:
            raise ValueError(f"{covered} of {layer.out_features} output rows were loaded")
        self.store(layer, concat_rows([codes for _, codes in staged]))
        finish_cpu_storage(layer)
        del layer.staged

    def store(self, layer: Linear, affine: AffineCodes) -> None:
        if layer.gpu_layout:
            self._store_gpu(layer, affine)
            return
        n = affine.codes.shape[0]
        padded16 = affine.group == 16
        if padded16:                               # pad each group of 16 to 32 with dummy codes
            affine = _pad_groups_to_32(affine)
        elif affine.group not in KERNEL_GROUPS:
            raise ValueError(f"group size must be 16, 32, 64, 128 or 256, got {affine.group}")
        codes, scales, zeros = _planes(affine)
        n_pad = -(-n // TILE_N) * TILE_N
        codes_all = F.pad(torch.cat(codes, dim=1), (0, 0, 0, n_pad - n))            # [N_pad, P*K_eff]
        sz = torch.stack([torch.cat(scales, 1), torch.cat(zeros, 1)], dim=-1)      # [N, P*G, 2]
        sz = F.pad(sz, (0, 0, 0, 0, 0, n_pad - n)).transpose(0, 1).contiguous()    # [P*G, N_pad, 2]
        _keep(layer, pack_tiles(codes_all), sz, len(codes), affine.group, padded16, codes_all.shape[1] // len(codes))

    def _store_gpu(self, layer: Linear, affine: AffineCodes) -> None:
        """The CUDA layout: each plane padded along K to whole blocks, its extra groups zero."""
        if affine.group not in (16,) + KERNEL_GROUPS:
            raise ValueError(f"group size must be 16, 32, 64, 128 or 256, got {affine.group}")
        k = affine.codes.shape[1]
        k_pad = padded_k(k, affine.group)
        extra_groups = (k_pad - k) // affine.group
        codes, scales, zeros = _planes(affine)
        codes_all = torch.cat([F.pad(c, (0, k_pad - k)) for c in codes], dim=1)   # [N, P*K_pad]
        scales = torch.cat([F.pad(s, (0, extra_groups)) for s in scales], dim=1)  # [N, P*G_pad]
        zeros = torch.cat([F.pad(z, (0, extra_groups)) for z in zeros], dim=1)
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()     # [P*G_pad, N, 2]
        _keep(layer, pack_words(codes_all), sz, len(codes), affine.group, False, k_pad)

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 2 and own_cpu_kernel_takes(x) and own_kernel_reads(layer):
            return cpu_kernels.int4_mm(x, layer, bias)                           # [T, out]
        one_plane = layer.__dict__.get("cpu_one_plane")
        if one_plane is None:   # decided at the first call (after every loader has set the planes), not per call
            one_plane = layer.cpu_one_plane = layer.planes == 1 and not layer.padded16 and layer.qweight.is_cpu
        if one_plane and bias is None and x.dim() == 2:
            # The common CPU case (one plane, no bias, a flat batch) in as few Python steps as possible:
            # a decode step calls this 121 times, and each skipped tensor op is microseconds saved.
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.contiguous(), plane_tiles(layer), layer.group, torch_scales(layer))     # [T, N_pad]
            return out if out.shape[1] == layer.out_features else out[:, :layer.out_features]
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self._use_kernel(x):
            if x.is_cuda:
                from ondo.layers.quantization.int4_gpu_kernels import int4_linear

                out = int4_linear(x.contiguous(), layer.qweight, layer.scales_and_zeros, layer.group, layer.planes)
            else:
                out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    self._kernel_input(layer, x), plane_tiles(layer), layer.group, torch_scales(layer))
                out = out[:, :layer.out_features]                                 # [T, out]
        else:  # float32 on a GPU, other devices: dequantize a few thousand rows at a time
            out = torch.cat([F.linear(x, self.dense_weight(layer, rows).to(x.dtype))  # [T, out]
                             for rows in row_chunks(layer.out_features)], dim=1)
        if bias is not None:
            out = out + bias
        return out.reshape(*shape[:-1], layer.out_features)

    @staticmethod
    def _use_kernel(x: torch.Tensor) -> bool:
        if x.is_cuda:
            return x.dtype in (torch.bfloat16, torch.float16) and x.shape[0] <= GPU_KERNEL_MAX_TOKENS
        return x.device.type == "cpu" and x.shape[0] <= CPU_KERNEL_MAX_TOKENS

    def _kernel_input(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if layer.padded16:
            x = F.pad(x.view(x.shape[0], -1, 16), (0, 16)).flatten(1)              # [T, K_eff]
        return x.repeat(1, layer.planes) if layer.planes > 1 else x.contiguous()   # [T, P*K_eff]

    def dense_weight(self, layer: Linear, rows: slice | None = None) -> torch.Tensor:
        """Dequantized rows [n, K] in float32 (all output rows by default)."""
        rows = rows or slice(0, layer.out_features)
        if layer.gpu_layout:
            from ondo.layers.quantization.int4_gpu_kernels import int4_dequant

            return int4_dequant(layer.qweight[:, rows], layer.scales_and_zeros[:, rows], layer.group,
                                layer.in_features, layer.planes, torch.float32).t()
        first = rows.start // TILE_N * TILE_N
        tiles = slice(first, -(-rows.stop // TILE_N) * TILE_N)                      # whole tiles only
        dense = self._rows(layer, unpack_tiles(plane_tiles(layer, tiles)), group_major_scales(layer, tiles))
        return dense[rows.start - first:rows.stop - first]

    def embed(self, layer: Linear, token_ids: torch.Tensor) -> torch.Tensor:
        if layer.gpu_layout:   # the tokens' columns, dequantized by the GPU kernel
            from ondo.layers.quantization.int4_gpu_kernels import int4_dequant

            return int4_dequant(layer.qweight.index_select(1, token_ids), layer.scales_and_zeros.index_select(1, token_ids),
                                layer.group, layer.in_features, layer.planes, layer.run_dtype).t()
        if token_ids.is_cpu and own_kernel_reads(layer) and cpu_kernels.usable_for(layer.run_dtype):
            return cpu_kernels.int4_rows(layer, token_ids, layer.run_dtype)   # one call: some 20 torch ops below
        # index_select, not advanced indexing: the latter costs milliseconds per call on a CPU.
        layout = codes_layout(layer)
        if layout == CodesLayout.CODE_BYTES:   # row d of a tile: byte 2 d + k % 2 of every pair of k, low digit | high << 4
            k_eff = layer.qweight.shape[1]
            tile, d = token_ids // 32, token_ids % 32
            k = torch.arange(k_eff, device=token_ids.device)
            offsets = (tile * 32 * k_eff + 2 * d)[:, None] + (k // 2 * 64 + k % 2)
            packed = layer.qweight.view(-1).index_select(0, offsets.flatten()).view(-1, k_eff)    # [T, K_eff]
            codes = torch.cat([packed & 15, packed >> 4], dim=1)                                # [T, 2 K_eff]
            return self._rows(layer, codes, token_scales(layer, token_ids)).to(layer.run_dtype)
        # Row n sits in tile n // T at byte column n % (T/2) of every k (low nibble for n % T < T/2).
        k_total, half = layer.qweight.shape[1] * 2, cpu_tile_rows() // 2
        tile, d = token_ids // (2 * half), token_ids % (2 * half)
        k = torch.arange(k_total, device=token_ids.device)
        at_k = k // 2 * 2 * half + k % 2 if layout == CodesLayout.ROW_PAIRS else k * half    # (ROW_PAIRS: byte 2 d)
        offsets = (tile * k_total * half + (d % half) * (2 if layout == CodesLayout.ROW_PAIRS else 1))[:, None] + at_k
        packed = layer.qweight.view(-1).index_select(0, offsets.flatten()).view(-1, k_total)  # [T, P*K_eff]
        codes = torch.where((d < half)[:, None], packed & 15, packed >> 4)
        return self._rows(layer, codes, token_scales(layer, token_ids)).to(layer.run_dtype)

    def _rows(self, layer: Linear, codes: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        """Dequantize code rows [R, P*K_eff] with their scales/zeros [P*G, R, 2] -> [R, K]."""
        rows = codes.shape[0]
        groups = codes.view(rows, -1, layer.group).float()                           # [R, P*G, g]
        scale, second = sz[..., 0].t().float()[..., None], sz[..., 1].t().float()[..., None]  # [R, P*G, 1]
        if sz.dtype == torch.float16:                   # (scale, zero - 8 scale): compact_cpu_scales
            w = (groups * scale + second).view(rows, layer.planes, layer.k_eff)     # [R, P, K_eff]
        else:
            w = ((groups - 8) * scale + second).view(rows, layer.planes, layer.k_eff)
        w = w.sum(1) if layer.planes > 1 else w[:, 0]                                # [R, K_eff]
        if layer.padded16:
            w = w.view(rows, -1, 32)[..., :16].flatten(1)                            # [R, K]
        return w


def own_cpu_kernel_takes(x: torch.Tensor) -> bool:
    """Whether a batch x [T, in] goes to ondo's CPU kernel (cpu_kernels/int4_mm.c) rather than torch's: at
    every batch size where the kernels are built, so that a row's result never depends on the rows beside
    it (a prefix-cache hit's one row and the full prefill must agree, bit for bit), and torch's is 10 to
    20 times slower in float32. Against torch's in bfloat16 on a 2-core AVX512 EPYC: within 15 % either
    way from 1 to 128 rows."""
    return cpu_kernels.usable(x)


def own_kernel_reads(layer: Linear) -> bool:
    """Whether ondo's CPU kernel reads this layer's tiles (32 or 64 rows; found once per layer)."""
    tile = layer.__dict__.get("cpu_tile")
    if tile is None:
        tile = layer.cpu_tile = cpu_tile_rows()
    return tile in (32, 64)


def finish_cpu_storage(layer: Linear) -> None:
    """A packed layer's last steps on the CPU, once all its rows are in: the scales' dtype, the digits'
    storage and the scales' layout (each a no-op where it does not apply)."""
    compact_cpu_scales(layer)
    mark_digit_planes(layer)
    block_cpu_scales(layer)


def block_cpu_scales(layer: Linear) -> None:
    """A CPU layer's (scale, zero) pairs [P*G, N_pad, 2] as blocks of SZ_BLOCK rows [N_pad / SZ_BLOCK, P*G,
    SZ_BLOCK, 2], where ondo's kernel reads them: a block of rows then reads its pairs of every group from
    one run of memory, not from one place per group a row of pairs apart (a 32-row tile of the built-in
    model: 18 places 196 KB apart in its head). One decode step of the built-in model on a 2-core Zen 3,
    alternating layouts in one process: 16.2 -> 12.3 ms (median of 8)."""
    sz = layer.scales_and_zeros
    if layer.gpu_layout or sz.dim() != 3 or cpu_kernels.library() is None or not own_kernel_reads(layer):
        return
    groups, n, _ = sz.shape
    blocks = sz.view(groups, n // SZ_BLOCK, SZ_BLOCK, 2).transpose(0, 1).contiguous()
    layer.register_buffer("scales_and_zeros", blocks, persistent=False)
    layer.__dict__.pop("cpu_int4_weight", None)             # the kernel's view of the layer, rebuilt


SZ_BLOCK = 32                 # int4_mm.h's


def group_major_scales(layer: Linear, rows: slice = slice(None)) -> torch.Tensor:
    """Rows of a CPU layer's (scale, zero) pairs as [P*G, R, 2], whichever their layout (`block_cpu_scales`)."""
    sz = layer.scales_and_zeros
    if sz.dim() == 3:
        return sz[:, rows]
    start, stop, _ = rows.indices(sz.shape[0] * SZ_BLOCK)
    first = start // SZ_BLOCK
    blocks = sz[first:-(-stop // SZ_BLOCK)]                                         # [b, P*G, SZ_BLOCK, 2]
    return blocks.transpose(0, 1).reshape(sz.shape[1], -1, 2)[:, start - first * SZ_BLOCK:stop - first * SZ_BLOCK]


def token_scales(layer: Linear, token_ids: torch.Tensor) -> torch.Tensor:
    """The (scale, zero) pairs of the rows `token_ids` [T] as [P*G, T, 2] (an embedding lookup)."""
    sz = layer.scales_and_zeros
    if sz.dim() == 3:
        return sz.index_select(1, token_ids)
    blocks = sz.index_select(0, token_ids // SZ_BLOCK)                               # [T, P*G, SZ_BLOCK, 2]
    at = (token_ids % SZ_BLOCK).view(-1, 1, 1, 1).expand(-1, sz.shape[1], 1, 2)
    return blocks.gather(2, at)[:, :, 0].transpose(0, 1)


def compact_cpu_scales(layer: Linear) -> None:
    """A loaded CPU layer's float32 (scale, zero) pairs as float16 (scale, zero - 8 scale), where every
    value converts exactly and ondo's kernel reads them (it takes zero - 8 scale as it computed it from the
    float32 pair: the same numbers). Single-stream decode reads every weight once a token, so its bytes
    are its time: 0.5 + 0.125 bytes a weight instead of 0.5 + 0.25 (the built-in model: 122 -> 102 MB).
    K-quant scales (d * a 6-bit scale) need more than float16's 11 bits and stay float32."""
    sz = layer.scales_and_zeros
    if (layer.gpu_layout or sz.dtype != torch.float32 or cpu_kernels.library() is None
            or not own_kernel_reads(layer)):
        return
    pairs = torch.stack([sz[..., 0], sz[..., 1] - 8 * sz[..., 0]], dim=-1)        # [P*G, N_pad, 2]
    compact = pairs.to(torch.float16)
    if torch.equal(compact.float(), pairs):                    # exact (an overflow to inf is not)
        layer.register_buffer("scales_and_zeros", compact, persistent=False)


def mark_digit_planes(layer: Linear) -> None:
    """`layer.digits`: whether a loaded CPU layer's two planes are the low and high digits of one code, as
    `_planes` splits them: the high plane's scales exactly 16 times the low plane's and its zeros 0. ondo's
    kernel then counts each code once and never reads the high plane's pairs (int4_mm.c). Found at load,
    where the scales are in memory anyway, and kept by the repack cache, so no later load reads them.

    `layer.codes_layout` (`CodesLayout`) is chosen here too, since it follows `digits`."""
    digits = False
    if not layer.gpu_layout and layer.planes == 2:
        sz = layer.scales_and_zeros
        sz = sz.transpose(0, 1) if sz.dim() == 4 else sz                 # groups first (block_cpu_scales)
        groups = sz.shape[0] // 2
        low, high = sz[:groups], sz[groups:]
        # float16 pairs (compact_cpu_scales) hold zero - 8 scale
        zero = -8 * high[..., 0] if sz.dtype == torch.float16 else torch.zeros_like(high[..., 1])
        digits = torch.equal(high[..., 0], 16 * low[..., 0]) and torch.equal(high[..., 1], zero)
    layer.digits = digits
    layout = CodesLayout.TILES
    if (not layer.gpu_layout and layer.run_dtype in cpu_kernels.DTYPES and cpu_tile_rows() == 32
            and cpu_kernels.int4_reads_code_bytes()):
        layout = CodesLayout.CODE_BYTES if digits else CodesLayout.ROW_PAIRS
    if layout != codes_layout(layer):
        recode_tiles(layer.qweight, codes_layout(layer), layout)
        layer.__dict__.pop("cpu_int4_weight", None)         # the kernel's view of the layer, rebuilt
    layer.codes_layout = layout


class CodesLayout(enum.IntEnum):
    """How a CPU layer's 32-row tiles order their bytes (int4_mm.h `layout`). Where ondo's kernel reads them
    (AVX2, `cpu_kernels.int4_reads_code_bytes`) a layer is stored in the order its product wants, each
    tile keeping its bytes' place: the same numbers, fewer instructions (int4_mm.c: CODE_BYTES, ROW_PAIRS).

    TILES: torch's (byte [tile, k, d] = row d | row d + 16 << 4). CODE_BYTES: two planes that are one
    code's digits as whole codes, byte [tile, k / 2, d, k % 2] = row d's low digit | high digit << 4 (the
    built-in model's 8-bit head, one row: 2.7 -> 1.7 ms on a 2-core Zen 3). ROW_PAIRS: torch's bytes with
    each pair of k interleaved, [tile, k / 2, d, k % 2] for d < 16 (a decode step of the built-in model
    12.3-12.8 -> 11.4-12.0 ms)."""

    TILES = 0
    CODE_BYTES = 1
    ROW_PAIRS = 2


def codes_layout(layer: Linear) -> CodesLayout:
    return CodesLayout(getattr(layer, "codes_layout", CodesLayout.TILES))


_RECODE_TILES = 256           # tiles recoded at a time: a few hundred KB of temporaries, not the matrix's size


def to_row_pairs(tiles: torch.Tensor) -> torch.Tensor:
    """32-row tiles [n, K / 2] (all planes' k) -> each pair of k's bytes interleaved by row."""
    n, half_k = tiles.shape
    return tiles.view(n // 32, half_k, 2, 16).transpose(2, 3).reshape(n, half_k)


def from_row_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_row_pairs`."""
    n, half_k = pairs.shape
    return pairs.view(n // 32, half_k, 16, 2).transpose(2, 3).reshape(n, half_k)


def to_code_bytes(tiles: torch.Tensor) -> torch.Tensor:
    """Digit planes in 32-row tiles [n, 2 K / 2] (plane 0's K bytes of each tile, then plane 1's) -> code
    bytes [n, K]: byte [tile, k / 2, d, k % 2] = row d's code at k, low digit | high digit << 4."""
    n, k = tiles.shape[0], tiles.shape[1]
    t = tiles.view(n // 32, 2, k, 16)                            # [tiles, plane, k, byte d: rows d, d + 16]
    rows_low = (t[:, 0] & 15) | ((t[:, 1] & 15) << 4)           # rows 0-15 [tiles, k, 16]
    rows_high = (t[:, 0] >> 4) | (t[:, 1] & 0xF0)               # rows 16-31
    codes = torch.cat([rows_low, rows_high], dim=-1)             # [tiles, k, 32]
    return codes.view(n // 32, k // 2, 2, 32).transpose(2, 3).reshape(n, k)


def from_code_bytes(code_bytes: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_code_bytes`: whole tiles of code bytes [n, K] -> digit planes [n, 2 K / 2]."""
    n, k = code_bytes.shape
    codes = code_bytes.view(n // 32, k // 2, 32, 2).transpose(2, 3).reshape(n // 32, k, 32)
    rows_low, rows_high = codes[..., :16], codes[..., 16:]
    low = (rows_low & 15) | ((rows_high & 15) << 4)              # plane 0 [tiles, k, 16]
    high = (rows_low >> 4) | (rows_high & 0xF0)                  # plane 1
    return torch.stack([low, high], dim=1).reshape(n, k)


_TO = {CodesLayout.TILES: lambda t: t, CodesLayout.CODE_BYTES: to_code_bytes, CodesLayout.ROW_PAIRS: to_row_pairs}
_FROM = {CodesLayout.TILES: lambda t: t, CodesLayout.CODE_BYTES: from_code_bytes, CodesLayout.ROW_PAIRS: from_row_pairs}


def recode_tiles(qweight: torch.Tensor, source: CodesLayout, target: CodesLayout) -> None:
    """One `CodesLayout` to another in place, a few tiles at a time (a tile keeps its bytes' place)."""
    rows = _RECODE_TILES * 32
    for start in range(0, qweight.shape[0], rows):
        part = qweight[start:start + rows]
        part.copy_(_TO[target](_FROM[source](part)))


def plane_tiles(layer: Linear, rows: slice = slice(None)) -> torch.Tensor:
    """Rows (whole tiles) of a CPU layer's codes in torch's tile layout, however stored (for torch's kernel
    and dequantizing: the product itself reads them as they are)."""
    return _FROM[codes_layout(layer)](layer.qweight[rows])


def torch_scales(layer: Linear) -> torch.Tensor:
    """The layer's scales as torch's CPU kernel reads them: (scale, zero) pairs [P*G, N_pad, 2] in the run dtype."""
    sz = group_major_scales(layer)
    if sz.dtype != torch.float16:
        return sz
    scale, minimum = sz[..., 0].float(), sz[..., 1].float()
    return torch.stack([scale, minimum + 8 * scale], dim=-1).to(layer.run_dtype)


def _keep(layer: Linear, qweight: torch.Tensor, sz: torch.Tensor, planes: int, group: int, padded16: bool,
          k_eff: int) -> None:
    """The packed weight and its scales on the run device, and what the kernels need to read them."""
    layer.register_buffer("qweight", qweight.to(layer.run_device), persistent=False)
    layer.register_buffer("scales_and_zeros", sz.to(device=layer.run_device, dtype=layer.run_dtype), persistent=False)
    layer.planes, layer.group, layer.padded16, layer.k_eff = planes, group, padded16, k_eff


def _planes(affine: AffineCodes) -> tuple[list, list, list]:
    """Codes, scales and zeros per 4-bit plane: w = sum_p (code_p - 8) * scale_p + zero_p."""
    if affine.bits <= 4:
        return [affine.codes], [affine.scale], [8 * affine.scale + affine.minimum]
    # Wider codes are centred and split into signed 4-bit digits, c - 2^(b-1) = 16 h + l, stored as l
    # and h + 8, so every zero but the first is 0 and the first stays small: a bfloat16 zero then
    # rounds by a fraction of one step, not of the whole offset.
    centred = affine.codes.to(torch.int16) - 2 ** (affine.bits - 1)
    codes = [(centred & 15).to(torch.uint8), ((centred >> 4) + 8).to(torch.uint8)]
    scales = [affine.scale, affine.scale * 16]
    zeros = [(8 + 2 ** (affine.bits - 1)) * affine.scale + affine.minimum, torch.zeros_like(affine.scale)]
    return codes, scales, zeros


def _pad_groups_to_32(affine: AffineCodes) -> AffineCodes:
    n = affine.codes.shape[0]
    codes = F.pad(affine.codes.view(n, -1, 16), (0, 16)).flatten(1)                 # [N, 2K]
    return AffineCodes(codes, affine.scale, affine.minimum, 32, affine.bits)
