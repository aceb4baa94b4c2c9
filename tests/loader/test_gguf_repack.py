"""Repacking GGUF blocks a chunk of rows at a time gives exactly the whole-matrix packing, and frees
the file's pages once a layer holds its own copy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from ondo.layers.linear import MergedLinear, linear_method_scope
from ondo.layers.quantization import gguf_blocks
from ondo.layers.quantization.gguf_blocks import GGUFBlocks, GGUFLinearMethod, decode_blocks
from ondo.layers.quantization.int4_planes import Int4PlanesMethod, concat_rows, finish_cpu_storage
from tests.layers.test_gguf_packed import random_blocks

K = 256
# A merged layer whose parts differ in type, as in Q4_K_M files (v and ffn_down in Q6_K): the whole
# layer takes the smallest group and the widest code, and each chunk must take the same.
MIXED_PARTS = [(T.Q4_K, 160), (T.Q6_K, 96), (T.Q8_0, 200)]


def merged_layer(parts, dtype: torch.dtype) -> MergedLinear:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with linear_method_scope(lambda layer: GGUFLinearMethod()):
            return MergedLinear(K, [rows for _, rows in parts], bias=False)
    finally:
        torch.set_default_dtype(previous)


def whole_matrix_packing(parts, raws, dtype: torch.dtype) -> MergedLinear:
    """The reference: every part decoded whole, concatenated, stored in one go, then finished as every
    loaded CPU layer (float16 scales where they are exact, 8-bit digits as code bytes and the scales in
    blocks of rows where the kernel reads them)."""
    layer = merged_layer(parts, dtype)
    affine = concat_rows([decode_blocks(GGUFBlocks(kind, (rows, K), raw)) for (kind, rows), raw in zip(parts, raws)])
    Int4PlanesMethod.store(layer.method, layer, affine)
    finish_cpu_storage(layer)
    return layer


@pytest.mark.parametrize("parts", [MIXED_PARTS, [(T.Q4_1, 330)], [(T.Q8_0, 130)]],
                         ids=["mixed", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunked_repack_is_byte_for_byte_the_whole_matrix_packing(monkeypatch, parts, dtype):
    monkeypatch.setattr(gguf_blocks, "REPACK_ROWS", 64)   # several chunks, the last one partial
    raws = [random_blocks(kind, rows, K, seed=i) for i, (kind, rows) in enumerate(parts)]
    layer = merged_layer(parts, dtype)
    for shard, ((kind, rows), raw) in enumerate(zip(parts, raws)):
        layer.load("weight", GGUFBlocks(kind, (rows, K), raw), shard)
    layer.finish_loading()
    reference = whole_matrix_packing(parts, raws, dtype)
    assert torch.equal(layer.qweight, reference.qweight)
    assert torch.equal(layer.scales_and_zeros, reference.scales_and_zeros)
    assert (layer.planes, layer.group, layer.padded16, layer.k_eff, layer.digits, layer.codes_layout) == \
        (reference.planes, reference.group, reference.padded16, reference.k_eff, reference.digits, reference.codes_layout)
    assert not hasattr(layer, "staged")


def test_repack_restores_the_thread_count_and_releases_each_part_once():
    parts = [(T.Q4_1, 96), (T.Q8_0, 64)]
    released = []
    layer = merged_layer(parts, torch.float32)
    for shard, (kind, rows) in enumerate(parts):
        blocks = GGUFBlocks(kind, (rows, K), random_blocks(kind, rows, K, seed=shard),
                            release=lambda shard=shard: released.append(shard))
        layer.load("weight", blocks, shard)
    threads = torch.get_num_threads()
    layer.finish_loading()
    assert torch.get_num_threads() == threads
    assert sorted(released) == [0, 1]


def test_missing_rows_are_reported():
    layer = merged_layer([(T.Q4_1, 64), (T.Q4_1, 64)], torch.float32)
    layer.load("weight", GGUFBlocks(T.Q4_1, (64, K), random_blocks(T.Q4_1, 64, K)), 0)
    with pytest.raises(ValueError, match="64 of 128 output rows were loaded"):
        layer.finish_loading()


def test_released_pages_leave_the_tensor_readable(tmp_path):
    from tests.loader.test_gguf import write_minimal_gguf
    from ondo.loader.gguf_reader import GGUFFile

    values = np.arange(4096, dtype=np.float32)
    path = write_minimal_gguf(tmp_path / "tiny.gguf", "llama", {"output_norm.weight": values})
    gguf = GGUFFile(path)
    before = gguf.read_tensor("output_norm.weight").copy()
    gguf.release_pages("output_norm.weight")
    np.testing.assert_array_equal(gguf.read_tensor("output_norm.weight"), before)
    np.testing.assert_array_equal(before, values)
