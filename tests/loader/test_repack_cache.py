"""The repack cache (`ondo/loader/repack_cache.py`): a second load of a GGUF file reads its packed layers
instead of repacking them, byte for byte the same; a changed file, a damaged cache file or an unwritable
cache directory never gives wrong weights or a failed load."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from ondo.config import EngineConfig
from ondo.layers.linear import linear_layers
from ondo.layers.quantization.gguf_blocks import GGUFLinearMethod
from ondo.loader import builtin_model_path, load_model

pytestmark = pytest.mark.usefixtures("one_cpu_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def gguf_copy(tmp_path_factory):
    """The built-in GGUF copied, so its cache entry is this test's own."""
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    shutil.copyfile(builtin_model_path(), path)
    return path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("ONDO_CACHE_DIR", str(folder))
    return folder


def load(path):
    return load_model(EngineConfig(model=str(path), device="cpu"), torch.device("cpu"))[0].model


def packed_state(model) -> dict:
    state = {}
    for name, layer in linear_layers(model):
        if isinstance(layer.method, GGUFLinearMethod):
            state[name] = (layer.qweight.clone(), layer.scales_and_zeros.clone(),
                           (layer.planes, layer.group, layer.padded16, layer.k_eff))
    return state


def assert_same_packing(a: dict, b: dict):
    assert a.keys() == b.keys() and len(a) > 100           # SmolLM2: 30 layers x 4 + the embedding
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]), name
        assert a[name][2] == b[name][2], name


def cache_files(cache_dir):
    return sorted((cache_dir / "gguf-repacked").glob("*.safetensors"))


def no_repack(monkeypatch):
    def refuse(self, layer, staged):
        raise AssertionError("repacked although the cache holds the layer")
    monkeypatch.setattr(GGUFLinearMethod, "_repack", refuse)


def test_a_second_load_reads_the_packed_layers(gguf_copy, cache_dir, monkeypatch):
    first = packed_state(load(gguf_copy))
    assert len(cache_files(cache_dir)) == 1
    with monkeypatch.context() as patch:
        no_repack(patch)
        assert_same_packing(first, packed_state(load(gguf_copy)))
        patch.setenv("ONDO_REPACK_CACHE", "0")
        with pytest.raises(AssertionError, match="repacked although"):
            load(gguf_copy)


def test_a_changed_file_is_packed_again_and_replaces_the_older_one(gguf_copy, cache_dir):
    """A GGUF rewritten in place, or installed anew (a new modification time): repacked, and the cache
    keeps only the new packing."""
    load(gguf_copy)
    [older] = cache_files(cache_dir)
    stat = os.stat(gguf_copy)
    os.utime(gguf_copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load(gguf_copy)
    [newer] = cache_files(cache_dir)
    assert newer != older


def test_new_packing_code_replaces_the_older_file(gguf_copy, cache_dir, monkeypatch):
    """An upgrade's repack supersedes the file of the packing code before it (and those named as before
    names had three digests); another file name's packing, or another layout's (dtype, tile, rank), stays."""
    from ondo.loader import repack_cache

    load(gguf_copy)
    [older] = cache_files(cache_dir)
    legacy = [older.with_name(f"{gguf_copy.stem}-{'0' * 32}.safetensors"),
              older.with_name(f"{gguf_copy.stem}-{'4' * 16}-{'5' * 16}.safetensors")]
    other_model = older.with_name(f"{gguf_copy.stem}-v2-{'1' * 16}-{'2' * 16}-{'6' * 16}.safetensors")
    other_layout = older.with_name(older.name.replace(older.name.split("-")[-3], "3" * 16))
    for kept in (*legacy, other_model, other_layout):
        kept.write_bytes(b"")
    monkeypatch.setattr(repack_cache, "packing_sources_digest", lambda: "changed code")
    load(gguf_copy)
    [newer] = set(cache_files(cache_dir)) - {other_model, other_layout}
    assert newer != older and not older.exists() and not any(path.exists() for path in legacy)
    assert other_model.exists() and other_layout.exists()


def test_a_damaged_cache_file_is_packed_again_and_rewritten(gguf_copy, cache_dir, monkeypatch):
    first = packed_state(load(gguf_copy))
    [file] = cache_files(cache_dir)
    size = file.stat().st_size
    with open(file, "r+b") as handle:
        handle.truncate(size // 3)
    assert_same_packing(first, packed_state(load(gguf_copy)))
    assert file.stat().st_size == size
    no_repack(monkeypatch)
    assert_same_packing(first, packed_state(load(gguf_copy)))


def test_an_unwritable_cache_directory_is_skipped(gguf_copy, tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("ONDO_CACHE_DIR", str(blocked))
    assert len(packed_state(load(gguf_copy))) > 100


def test_a_layer_whose_parts_differ_from_the_cached_ones_is_packed_again(gguf_copy, cache_dir, monkeypatch):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    first = packed_state(load(gguf_copy))
    [file] = cache_files(cache_dir)
    with safe_open(str(file), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        layers = json.loads(handle.metadata()["layers"])
    layers["3"]["signature"][0][1] -= 1                      # layer 3 staged other rows than these
    save_file(tensors, str(file), metadata={"layers": json.dumps(layers)})
    repacked = []
    original = GGUFLinearMethod._repack
    monkeypatch.setattr(GGUFLinearMethod, "_repack",
                        lambda self, layer, staged: (repacked.append(layer), original(self, layer, staged)))
    assert_same_packing(first, packed_state(load(gguf_copy)))
    assert len(repacked) == 1
    load(gguf_copy)                                          # the file was rewritten with the right parts
    assert len(repacked) == 1
