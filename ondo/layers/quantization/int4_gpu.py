"""Affine 4-bit weights laid out for the GPU (the kernels that read them: `int4_gpu_kernels.py`,
imported only where a GPU runs, so a CPU run never loads Triton).

Layout (`pack_words`): codes are packed along K into int32 words, column-major over N, in blocks of
128 inputs: word i of block b in column n holds input k = 128 b + 16 j + i in nibble j (i < 16,
j < 8). A [16, BLOCK_N] load of words is then 8 slices of 16 consecutive inputs, each unpacked with
one shift and mask and meeting a contiguous 16-wide slice of the activations; loads coalesce along
N. K is padded to whole blocks (and groups) with zero codes whose groups have zero scale and zero.
A weight of P planes (5- to 8-bit GGUF codes split into 4-bit digits, `int4_planes.py`) is P such
matrices stacked along K, all multiplied by the same x. Groups of 16 (Q6_K) need no padding here.

`scales_and_zeros` [groups, N, 2] in the run dtype, as on the CPU: w = (code - 8) * scale + zero.

Kernels (`int4_gpu_kernels.py`), picked by batch size (benchmarks/int4_kernel.py, H200, Llama-3-8B shapes):
- `int4_gemv` for one row (single-stream decode), on the CUDA cores. Where x is a 16-bit float row and
  groups hold 32 inputs or more (on-the-fly int4, GPTQ/AWQ, most GGUF types), the integer kernel: x
  rounded to int16 per chunk of 32 inputs (one scale each; its exact float sum kept for the zeros),
  byte c of every word lies in chunk c, so four word rows byte-transposed (PRMT) give four bytes of
  one chunk, whose nibbles meet x pairs in IDP2A (two multiply-adds a instruction, exact integer sums);
  a chunk's scale, group scale and zero apply once per column. 256 columns a program. Otherwise the
  float kernel: one-warp programs of 64 columns, each thread summing its columns' 16 word rows in
  registers, a nibble made a float by one mask and multiplied in one FMA; each group's scale and zero
  apply once. Both split K. (Not fused with the MLP's activation as the dense GEMV is: a variant taking
  gate and up columns side by side in each program ran ten times slower on the H200.)
  Llama-3-8B layer stack: integer 1.87 ms, float 2.03 ms (bf16 cuBLAS 3.75 ms; `int4_mm` 3.6 ms).
- `int4_mm` from 2 up to `FUSED_MAX_TOKENS` rows: one program owns BLOCK_N outputs and a slice of K; codes
  become floats with the exponent trick (code | 0x4B000000 is the float 2^23 + code, no int-to-float
  conversion), are scaled per group (a second plane added in float32, so each weight is rounded
  once) and meet the activations on the tensor cores. Matrices too narrow to fill the GPU split K
  across programs, the last of which adds the partial sums (`ondo/layers/split_k.py`). Llama-3-8B layer stack: 4.0 ms for 4 rows
  (bf16 cuBLAS 3.76 ms), 4.8 ms for 17 rows, 11.6 ms for 64.
- above it, `int4_dequant` writes the dense W^T once per call (about 5.5 ms for that stack) and
  cuBLAS multiplies: 9.3 ms at any batch up to a few hundred rows.
Launch shapes depend only on host integers, so both run inside the CUDA graphs.
"""
from __future__ import annotations

import torch

BLOCK_K = 128                 # inputs per packed block
SLICE = 16                    # inputs per nibble position in a block


def padded_k(k: int, group: int) -> int:
    """K padded to whole blocks and whole groups (groups are powers of two from 16 to 256)."""
    unit = max(BLOCK_K, group)
    return -(-k // unit) * unit


def pack_words(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (K a multiple of 128, each < 16) -> int32 words [K / 8, N]."""
    n, k = codes.shape
    c = codes.view(n, k // BLOCK_K, 8, SLICE).permute(1, 3, 2, 0).to(torch.int64)  # [B, i, j, N]
    shifts = (4 * torch.arange(8, device=codes.device, dtype=torch.int64)).view(1, 1, 8, 1)
    words = (c << shifts).sum(2)                                                     # [B, i, N] < 2^32
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)                   # the same bits as int32
    return words.to(torch.int32).reshape(k // 8, n)


def unpack_words(words: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_words`: int32 [K / 8, N] -> uint8 codes [N, K]."""
    k8, n = words.shape
    w = words.reshape(k8 // SLICE, SLICE, n).to(torch.int64) & 0xFFFFFFFF           # [B, i, N]
    c = torch.stack([(w >> (4 * j)) & 15 for j in range(8)], dim=1)                 # [B, j, i, N]
    return c.reshape(k8 * 8, n).t().to(torch.uint8).contiguous()


