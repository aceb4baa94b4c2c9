"""NF4: bitsandbytes' 4-bit NormalFloat, byte for byte, so a saved bitsandbytes model loads as is.

The format (QLoRA, Dettmers et al. 2023), as `bitsandbytes.functional.quantize_4bit` writes it:
- the weight is flattened row-major and cut into blocks of 64; each block keeps its absmax;
- each value / absmax is rounded to the nearest of 16 NormalFloat levels (`NF4_CODE`, quantiles of a
  normal distribution, so a normally distributed weight uses every code equally);
- two codes per byte, the first of each pair in the *high* nibble;
- double quantization (optional): the absmax vector minus its mean (`offset`) is itself quantized to
  8 bits in blocks of 256, with bitsandbytes' signed dynamic map (`dynamic_map`), each block keeping
  a float32 absmax. w = code[q] * (map[qa] * nested_absmax + offset).
A 4-bit fp4 checkpoint has the same layout with another 16-value table, so it loads here too.

Storage (`NF4Method`): the packed bytes [N, K / 2] and the absmax (float32 per block, or its 8-bit
codes plus the nested absmax and offsets when double-quantized), kept as the checkpoint has them.
Each shard of a merged layer keeps its own double-quantization state, as bitsandbytes saved it.
Kernel: dequantize a chunk of rows (a table lookup per byte) in float32, round once to the activation
dtype and run the dense GEMM; scratch memory stays a few MB whatever the layer's size.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ondo.layers.linear import Linear, LinearMethod

BLOCK_SIZE = 64
NESTED_BLOCK_SIZE = 256
# Weights dequantized at once on the dense path.
CHUNK_ELEMENTS = 1 << 21

# bitsandbytes' NF4 levels (float32), ascending: index = code.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`), 256 sorted levels.

    A sign, a unary exponent 10^-6 .. 10^0 and the remaining bits as a linear fraction in [0.1, 1]."""
    levels = [0.0, 1.0]
    for exponent in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** exponent + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        levels += ((10 ** (exponent - 6)) * means).tolist() + (-(10 ** (exponent - 6)) * means).tolist()
    return torch.tensor(sorted(levels), dtype=torch.float32)


@dataclass
class NF4Blocks:
    """One matrix in bitsandbytes' 4-bit layout (a checkpoint payload, or `quantize_nf4`'s output)."""

    packed: torch.Tensor                       # uint8 [N * K / 2]
    absmax: torch.Tensor                       # float32 [B], or uint8 [B] when double-quantized
    shape: tuple[int, int]                     # (N, K)
    blocksize: int = BLOCK_SIZE
    code: torch.Tensor = NF4_CODE              # float32 [16]: the level of each 4-bit code
    nested_absmax: torch.Tensor | None = None  # float32 [ceil(B / 256)]
    nested_code: torch.Tensor | None = None    # float32 [256]
    nested_offset: float = 0.0

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every block [B] (the nested 8-bit codes expanded as bitsandbytes does)."""
        if not self.double_quant:
            return self.absmax.float()
        nested = self.nested_absmax.repeat_interleave(NESTED_BLOCK_SIZE)[: self.absmax.numel()]
        levels = self.nested_code.to(self.absmax.device).index_select(0, self.absmax.int())
        return levels * nested + self.nested_offset

    def dequantize(self) -> torch.Tensor:
        pairs = _pair_table(self.code).to(self.packed.device)
        values = pairs.index_select(0, self.packed.int()).view(-1, self.blocksize)  # [B, blocksize]
        return (values * self.block_absmax()[:, None]).view(self.shape)              # [N, K] float32


def quantize_nf4(weight: torch.Tensor, blocksize: int = BLOCK_SIZE, double_quant: bool = False) -> NF4Blocks:
    """Dense [N, K] -> NF4 blocks, rounding exactly as bitsandbytes' `quantize_4bit(quant_type="nf4")`."""
    n, k = weight.shape
    if (n * k) % blocksize:
        raise ValueError(f"NF4 quantizes blocks of {blocksize} weights; this matrix has {n} x {k}")
    blocks = weight.reshape(-1, blocksize).float()                                   # [B, blocksize]
    absmax = blocks.abs().amax(dim=1)                                                # [B]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).view(-1)
    midpoints = ((NF4_CODE[:-1] + NF4_CODE[1:]) / 2).to(scaled.device)
    codes = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]                                        # [N * K / 2]
    if not double_quant:
        return NF4Blocks(packed, absmax, (n, k), blocksize)
    offset = absmax.mean()
    absmax_codes, nested_absmax = _quantize_dynamic(absmax - offset)
    return NF4Blocks(packed, absmax_codes, (n, k), blocksize, NF4_CODE, nested_absmax, dynamic_map(),
                     offset.item())


def _quantize_dynamic(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [B] -> (uint8 codes [B], float32 absmax per block of 256): the nearest level of the dynamic
    map, ties to the lower one, exactly as bitsandbytes' torch backend (`quantize_blockwise`) rounds.
    (Its CPU C kernel searches approximately: near a midpoint it may pick the other neighbour.)"""
    count = values.numel()
    padded = F.pad(values, (0, -count % NESTED_BLOCK_SIZE)).view(-1, NESTED_BLOCK_SIZE)  # [G, 256]
    absmax = padded.abs().amax(dim=1)                                                # [G]
    scale = (1.0 / absmax.clamp(min=1e-38)).repeat_interleave(NESTED_BLOCK_SIZE)[:count]
    levels = dynamic_map().to(values.device)
    codes = torch.bucketize(torch.clamp(values * scale, -1, 1), (levels[:-1] + levels[1:]) / 2, out_int32=True)
    return codes.to(torch.uint8), absmax


@functools.cache
def _pair_table_cpu(code_key: tuple[float, ...]) -> torch.Tensor:
    code = torch.tensor(code_key, dtype=torch.float32)
    byte = torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1)                  # [256, 2]


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """The two levels of every byte value: [256, 2], high nibble first."""
    return _pair_table_cpu(tuple(code.tolist())).to(code.device)


class NF4Method(LinearMethod):
    """bitsandbytes 4-bit storage (NF4, or fp4 from a checkpoint); quantizes dense input as it arrives."""

    name = "nf4"

    def __init__(self, double_quant: bool = False, blocksize: int = BLOCK_SIZE):
        self.double_quant, self.blocksize = double_quant, blocksize

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        layer.run_dtype, layer.run_device = dtype, torch.get_default_device()
        layer.staged = []                                   # (rows, NF4Blocks) until every shard is in

    def load_weight(self, layer: Linear, tensor, rows: slice) -> None:
        expected = (rows.stop - rows.start, layer.in_features)
        if not isinstance(tensor, NF4Blocks):
            dense = tensor if isinstance(tensor, torch.Tensor) else tensor.dequantize()
            if tuple(dense.shape) != expected:
                raise ValueError(f"shape mismatch: checkpoint {tuple(dense.shape)}, model {expected}")
            check_nf4_shape(expected, self.blocksize)
            tensor = quantize_nf4(dense, self.blocksize, self.double_quant)
        elif tuple(tensor.shape) != expected:
            raise ValueError(f"shape mismatch: checkpoint {tuple(tensor.shape)}, model {expected}")
        check_nf4_shape(expected, tensor.blocksize)
        layer.staged.append((rows, tensor))

    def finish_loading(self, layer: Linear) -> None:
        staged = sorted(layer.staged, key=lambda item: item[0].start)
        del layer.staged
        covered = sum(rows.stop - rows.start for rows, _ in staged)
        if covered != layer.out_features:
            raise ValueError(f"{covered} of {layer.out_features} output rows were loaded")
        first = staged[0][1]
        for _, blocks in staged[1:]:
            if (blocks.blocksize, blocks.double_quant) != (first.blocksize, first.double_quant) or \
                    not torch.equal(blocks.code, first.code):
                raise ValueError("the shards of this layer use different 4-bit block sizes or code tables")
        device, k = layer.run_device, layer.in_features
        buffers = {"nf4_packed": torch.cat([b.packed.view(-1, k // 2) for _, b in staged]),   # [N, K/2]
                   "nf4_absmax": torch.cat([b.absmax for _, b in staged]),                     # [B]
                   "nf4_pairs": _pair_table(first.code)}                                       # [256, 2]
        layer.nf4_blocksize = first.blocksize
        layer.nf4_double_quant = first.double_quant
        if first.double_quant:
            nested_sizes = [b.nested_absmax.numel() for _, b in staged]
            buffers.update(
                nf4_nested_absmax=torch.cat([b.nested_absmax for _, b in staged]),
                nf4_nested_code=first.nested_code.float(),
                nf4_shard_rows=torch.tensor([rows.start for rows, _ in staged]),
                nf4_shard_nested=torch.tensor([sum(nested_sizes[:i]) for i in range(len(staged))]),
                nf4_shard_offset=torch.tensor([b.nested_offset for _, b in staged], dtype=torch.float32))
        for name, value in buffers.items():
            layer.register_buffer(name, value.to(device), persistent=False)

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        step = max(1, CHUNK_ELEMENTS // layer.in_features)
        out = torch.cat([F.linear(x, self._rows(layer, slice(start, min(start + step, layer.out_features)), x.dtype))
                         for start in range(0, layer.out_features, step)], dim=-1)    # [..., out]
        return out + bias if bias is not None else out

    def embed(self, layer: Linear, token_ids: torch.Tensor) -> torch.Tensor:
        return self._rows(layer, token_ids.reshape(-1), layer.run_dtype).view(*token_ids.shape, -1)  # [T, in]

    def dense_weight(self, layer: Linear) -> torch.Tensor:
        return self._rows(layer, slice(0, layer.out_features), layer.run_dtype)

    # Lookups use index_select: advanced indexing of small tensors is far slower on the CPU.
    def _rows(self, layer: Linear, rows: slice | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows [R, K]: levels * absmax in float32 (as bitsandbytes), rounded once to `dtype`."""
        packed = layer.nf4_packed[rows] if isinstance(rows, slice) else layer.nf4_packed.index_select(0, rows)
        count = packed.shape[0]
        values = layer.nf4_pairs.index_select(0, packed.reshape(-1).int())            # [R * K/2, 2]
        values = values.view(count, -1, layer.nf4_blocksize)                           # [R, K/bs, bs]
        return (values * self._absmax(layer, rows)[..., None]).view(count, -1).to(dtype)

    def _absmax(self, layer: Linear, rows: slice | torch.Tensor) -> torch.Tensor:
        """The float32 absmax of every block of these rows: [R, K / blocksize]."""
        per_row = layer.in_features // layer.nf4_blocksize
        table = layer.nf4_absmax.view(-1, per_row)
        stored = table[rows] if isinstance(rows, slice) else table.index_select(0, rows)   # [R, K/bs]
        if not layer.nf4_double_quant:
            return stored
        if isinstance(rows, slice):
            rows = torch.arange(rows.start, rows.stop, device=stored.device)
        shard = torch.searchsorted(layer.nf4_shard_rows, rows, right=True) - 1          # [R]
        first_row = layer.nf4_shard_rows.index_select(0, shard)
        local = (rows - first_row)[:, None] * per_row + torch.arange(per_row, device=rows.device)  # [R, K/bs]
        nested = layer.nf4_shard_nested.index_select(0, shard)[:, None] + local // NESTED_BLOCK_SIZE
        levels = layer.nf4_nested_code.index_select(0, stored.reshape(-1).int()).view(stored.shape)
        scales = layer.nf4_nested_absmax.index_select(0, nested.reshape(-1)).view(stored.shape)
        return levels * scales + layer.nf4_shard_offset.index_select(0, shard)[:, None]


def check_nf4_shape(shape: tuple[int, int], blocksize: int) -> None:
    """Blocks must not straddle rows, so any row range dequantizes on its own."""
    if shape[1] % blocksize:
        raise ValueError(f"4-bit blocks of {blocksize} must tile each row: in_features must be a multiple "
                         f"of {blocksize}, got {shape[1]}")
