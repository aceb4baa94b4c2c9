"""Tokenizers for the tokenizer/detokenizer/chat-template tests: a tiny byte-level BPE trained in a
tmp dir, and the real SmolLM2 tokenizer embedded in its GGUF."""
from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tests.tokenizer.model_files import smollm2_gguf_path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Streaming text token by token.",
    "안녕하세요, 반갑습니다. 한국어 문장입니다.",
    "Emoji: 😀 🎉 👍🏽 and café, naïve, 日本語.",
] * 20
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_bpe(folder, *, add_bos: bool = True, chat_template: str | None = CHATML_TEMPLATE,
                   generation_eos: list[int] | None = None):
    """Train a ~400-token byte-level BPE and save it as an HF tokenizer folder."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(CORPUS, trainer)
    if add_bos:
        bos_id = raw.token_to_id("<s>")
        raw.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos_id)])
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template is not None:
        hf.chat_template = chat_template
    hf.save_pretrained(folder)
    if generation_eos is not None:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return folder


@pytest.fixture(scope="session")
def tiny_bpe_folder(tmp_path_factory):
    return build_tiny_bpe(tmp_path_factory.mktemp("tiny-bpe"))


@pytest.fixture(scope="session")
def smollm2_path():
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from ondo.tokenizer.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_path)
