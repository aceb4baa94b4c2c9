"""GGUF loading of the built-in SmolLM2 GGUF against transformers' GGUF loader, plus the reader,
the q/k un-permutation and the error paths."""
from __future__ import annotations

from collections.abc import Iterator

import gguf
import numpy as np
import pytest
import torch

from ondo.loader.gguf import GGUFConfigError, GGUFFormatError, load_gguf, unpermute_rope_rows
from ondo.loader.gguf_reader import GGUFFile
from tests.tokenizer.model_files import smollm2_gguf_path
from tests.loader.gguf_dense import dense_values

CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "max_position_embeddings",
                 "tie_word_embeddings", "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id",
                 "unk_token_id", "model_type")


@pytest.fixture(scope="module")
def smollm2_path():
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def ondo_smollm2(smollm2_path):
    return load_gguf(smollm2_path, torch.float32)


@pytest.mark.slow
def test_smollm2_config_matches_transformers(ondo_smollm2, smollm2_reference):
    ours, reference = ondo_smollm2.config, smollm2_reference.config
    for field in CONFIG_FIELDS:
        assert getattr(ours, field) == getattr(reference, field), field
    assert ours.architectures == ["LlamaForCausalLM"]
    assert (ours.num_hidden_layers, ours.hidden_size, ours.tie_word_embeddings) == (30, 576, True)


@pytest.mark.slow
def test_smollm2_weights_match_transformers(ondo_smollm2, smollm2_reference):
    assert isinstance(ondo_smollm2.weights, Iterator)  # lazy: read as the model consumes them
    weights = dict(ondo_smollm2.weights)
    reference = smollm2_reference.state_dict()
    # The LM head is tied to the embedding: the file (and so the iterator) has no separate tensor.
    assert set(weights) == set(reference) - {"lm_head.weight"}
    for name, tensor in weights.items():
        tensor = dense_values(tensor)
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)


def test_smollm2_tokenizer_and_generation_defaults(ondo_smollm2):
    tok = ondo_smollm2.tokenizer
    assert tok.hf.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"
    assert ondo_smollm2.generation_defaults["eos_token_id"] == sorted(tok.end_of_turn_token_ids)
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_reader_dequantizes_like_gguf_py(tmp_path, type_name):
    qtype = gguf.GGMLQuantizationType[type_name]
    array = np.random.default_rng(1).standard_normal((3, 2, 64)).astype(np.float32)  # [outer, rows, row]
    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("some.floats", [0.5, 1.5])
    writer.add_string("some.text", "안녕 😀")
    data = gguf.quants.quantize(array, qtype)
    writer.add_tensor("t", data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = GGUFFile(path)
    reference = gguf.GGUFReader(path)
    assert ours.metadata["some.floats"] == [0.5, 1.5] and ours.metadata["some.text"] == "안녕 😀"
    assert ours.tensors["t"].shape == array.shape and ours.tensors["t"].ggml_type == qtype
    tensor = reference.tensors[0]
    expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(array.shape)
    np.testing.assert_array_equal(ours.read_tensor("t"), expected)


@pytest.mark.slow
def test_reader_matches_gguf_py(smollm2_path):
    ours = GGUFFile(smollm2_path)
    reference = gguf.GGUFReader(smollm2_path)
    for key, field in reference.fields.items():
        if key.startswith("GGUF."):
            continue
        assert ours.metadata[key] == field.contents(), key
    assert list(ours.tensors) == [t.name for t in reference.tensors]
    types_seen = set()
    for tensor in reference.tensors:
        info = ours.tensors[tensor.name]
        assert info.shape == tuple(reversed(tensor.shape.tolist()))
        if tensor.tensor_type not in types_seen:  # one tensor per type keeps this quick
            types_seen.add(tensor.tensor_type)
            expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(info.shape)
            np.testing.assert_array_equal(ours.read_tensor(tensor.name), expected)
    assert {t.name for t in types_seen} >= {"F32", "Q4_1"}


@pytest.mark.parametrize("num_heads, head_dim", [(4, 8), (2, 16), (1, 4)])
def test_unpermute_inverts_llama_cpp_permute(num_heads, head_dim):
    weight = np.random.default_rng(0).standard_normal((num_heads * head_dim, 12)).astype(np.float32)
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    permuted = weight.reshape(num_heads, 2, head_dim // 2, 12).swapaxes(1, 2).reshape(weight.shape)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, num_heads), weight)
    bias = weight[:, 0].copy()
    permuted_bias = bias.reshape(num_heads, 2, head_dim // 2).swapaxes(1, 2).reshape(bias.shape)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted_bias, num_heads), bias)


def write_minimal_gguf(path, arch: str, tensors: dict[str, np.ndarray]):
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in {"block_count": 1, "context_length": 64, "embedding_length": 8, "feed_forward_length": 16,
                       "attention.head_count": 2, "attention.head_count_kv": 2}.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture(tmp_path):
    path = write_minimal_gguf(tmp_path / "m.gguf", "mamba", {"output_norm.weight": np.ones(8, np.float32)})
    with pytest.raises(GGUFConfigError, match=r"architecture must be one of .*'llama'.*got 'mamba'"):
        load_gguf(path, torch.float32)


def test_unknown_tensor_is_named(tmp_path):
    path = write_minimal_gguf(tmp_path / "m.gguf", "llama", {"blk.0.mystery.weight": np.ones(8, np.float32)})
    with pytest.raises(GGUFConfigError, match="blk.0.mystery.weight"):
        load_gguf(path, torch.float32)


def test_missing_metadata_is_named(tmp_path):
    writer_path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(writer_path), "qwen2")
    writer.add_uint32("qwen2.block_count", 1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFConfigError, match="qwen2.embedding_length"):
        load_gguf(writer_path, torch.float32)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        load_gguf(path, torch.float32)


def test_truncated_file(tmp_path):
    full = write_minimal_gguf(tmp_path / "full.gguf", "llama", {"output_norm.weight": np.ones(64, np.float32)})
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:-100])
    with pytest.raises(GGUFFormatError, match="output_norm.weight extends past the end"):
        GGUFFile(cut)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        load_gguf(tmp_path / "nothing.gguf", torch.float32)
