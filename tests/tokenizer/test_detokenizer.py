"""Streaming detokenization: pieces concatenate to decode(all ids), never a broken character."""
from __future__ import annotations

import pytest

from ondo.engine.detokenizer import IncrementalDetokenizer
from ondo.tokenizer import load_tokenizer

STREAM_TEXTS = [
    "안녕하세요! 오늘 날씨가 정말 좋네요. 한국어 스트리밍 테스트입니다.",
    "Emoji stream: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇰🇷 done.",
    "Mixed: café naïve 日本語のテキスト, Ελληνικά, русский, עברית and ASCII.",
    "Plain English text with numbers 12345 and punctuation!?",
]


def stream(tokenizer, ids, chunk=1, **options):
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=[1, 2, 3], **options)
    pieces = [detok.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return detok, pieces, detok.flush()


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_stream_equals_decode(smollm2_tokenizer, text, chunk):
    tok = smollm2_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    detok, pieces, tail = stream(tok, ids, chunk)
    assert "".join(pieces) + tail == tok.decode(ids) == detok.text == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_byte_level_tokens_split_characters(smollm2_tokenizer):
    """The premise of the tests above: single SmolLM2 tokens decode to U+FFFD mid-character."""
    tok = smollm2_tokenizer
    ids = tok.encode(STREAM_TEXTS[0], add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    _, pieces, _ = stream(tok, ids)
    assert "" in pieces  # some tokens were held back until their character completed


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_in_stream(smollm2_tokenizer, skip_special_tokens):
    tok = smollm2_tokenizer
    im_end = tok.hf.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode("반가워요 👋", add_special_tokens=False) + [im_end] + tok.encode(" bye", add_special_tokens=False)
    detok, pieces, tail = stream(tok, ids, skip_special_tokens=skip_special_tokens)
    expected = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) + tail == expected
    assert ("<|im_end|>" in expected) is (not skip_special_tokens)
    assert all("\ufffd" not in piece for piece in pieces)


def test_flush_releases_an_unfinished_character(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("ok 😀", add_special_tokens=False)
    truncated = ids[:-1]  # the emoji's last byte never arrives (e.g. max_tokens hit)
    assert tok.decode(truncated).endswith("\ufffd")
    detok, pieces, tail = stream(tok, truncated)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + tail == tok.decode(truncated)
    assert detok.flush() == ""  # a second flush has nothing left


def test_work_per_token_is_bounded(smollm2_tokenizer):
    """Each push decodes a short window, not the whole output so far."""
    tok = smollm2_tokenizer
    ids = tok.encode(" ".join(STREAM_TEXTS) * 4, add_special_tokens=False)
    assert len(ids) > 300
    detok = IncrementalDetokenizer(tok, [])
    window_sizes = []
    real_decode = detok._decode
    detok._decode = lambda window: window_sizes.append(len(window)) or real_decode(window)
    for token_id in ids:
        detok.push([token_id])
    assert max(window_sizes) <= 12
    streamed = detok.text
    assert streamed + detok.flush() == tok.decode(ids)


def test_tiny_bpe_stream_with_spaces(tiny_bpe_folder):
    tok = load_tokenizer(tiny_bpe_folder)
    for text in STREAM_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        _, pieces, tail = stream(tok, ids)
        assert "".join(pieces) + tail == text
        assert all("\ufffd" not in piece for piece in pieces)
