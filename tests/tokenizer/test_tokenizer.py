"""Tokenizer loading, special ids, BOS handling and round trips."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ondo.tokenizer import Tokenizer, TokenizerLoadError, load_tokenizer
from tests.tokenizer.conftest import CHATML_TEMPLATE, build_tiny_bpe

TEXTS = [
    "Hello world!",
    "  leading spaces and\ttabs\nnewlines  ",
    "안녕하세요, 반갑습니다.",
    "Emoji 😀🎉👍🏽 mixed with café and 日本語",
    "",
]


def test_folder_tokenizer_fields(tiny_bpe_folder):
    tok = load_tokenizer(tiny_bpe_folder)
    hf = tok.hf
    assert tok.vocab_size == len(hf)
    assert tok.bos_token_id == hf.convert_tokens_to_ids("<s>")
    assert tok.eos_token_id == hf.convert_tokens_to_ids("</s>")
    assert tok.all_special_ids == frozenset(hf.all_special_ids)
    assert {tok.bos_token_id, tok.eos_token_id} <= tok.all_special_ids
    # </s> is the EOS; <|im_end|> ends every turn of the ChatML template.
    assert tok.end_of_turn_token_ids == {tok.eos_token_id, hf.convert_tokens_to_ids("<|im_end|>")}
    assert tok.chat_template == CHATML_TEMPLATE


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_byte_level(tiny_bpe_folder, text):
    tok = load_tokenizer(tiny_bpe_folder)
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text


def test_bos_handling(tiny_bpe_folder):
    tok = load_tokenizer(tiny_bpe_folder)
    plain = tok.encode("Hello world", add_special_tokens=False)
    assert tok.bos_token_id not in plain
    assert tok.encode("Hello world") == [tok.bos_token_id] + plain
    # A prompt that already starts with the BOS text gets exactly one BOS.
    assert tok.encode("<s>Hello world") == [tok.bos_token_id] + plain


def test_no_bos_tokenizer(tmp_path):
    tok = load_tokenizer(build_tiny_bpe(tmp_path, add_bos=False))
    ids = tok.encode("Hello world")
    assert ids == tok.encode("Hello world", add_special_tokens=False)
    assert tok.bos_token_id not in ids


def test_generation_config_eos_ids_end_turns(tmp_path):
    folder = build_tiny_bpe(tmp_path, chat_template=None, generation_eos=[1, 4])
    tok = load_tokenizer(folder)
    assert tok.chat_template is None
    assert tok.end_of_turn_token_ids == {1, 4}


def test_template_without_turn_token_keeps_eos_only(tmp_path):
    tok = load_tokenizer(build_tiny_bpe(tmp_path, chat_template="{{ messages[0]['content'] }}"))
    assert tok.end_of_turn_token_ids == {tok.eos_token_id}


def test_chat_template_override_string_and_file(tiny_bpe_folder, tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    tok = load_tokenizer(tiny_bpe_folder, chat_template=template)
    assert tok.chat_template == template
    file = tmp_path / "template.jinja"
    file.write_text(template)
    assert load_tokenizer(tiny_bpe_folder, chat_template=str(file)).chat_template == template
    with pytest.raises(FileNotFoundError, match="missing.jinja"):
        load_tokenizer(tiny_bpe_folder, chat_template=str(tmp_path / "missing.jinja"))


def test_spaces_between_special_tokens(tiny_bpe_folder):
    tok = load_tokenizer(tiny_bpe_folder)
    hf = tok.hf
    ids = hf.encode("Hi", add_special_tokens=False) + [hf.convert_tokens_to_ids("<|im_end|>")] \
        + hf.encode("there", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=False) == "Hi<|im_end|>there"
    assert tok.decode(ids, skip_special_tokens=True) == "Hithere"


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder or a .gguf file"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerLoadError, match="cannot load a tokenizer from .*empty"):
        load_tokenizer(tmp_path / "empty")


def test_tokenizer_file_path_loads_its_folder(tiny_bpe_folder):
    tok = load_tokenizer(tiny_bpe_folder / "tokenizer.json")
    assert tok.encode("Hello") == load_tokenizer(tiny_bpe_folder).encode("Hello")


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_matches_transformers(smollm2_path, smollm2_tokenizer):
    reference = AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    tok = smollm2_tokenizer
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == len(reference) == 49152
    assert (tok.bos_token_id, tok.eos_token_id) == (reference.bos_token_id, reference.eos_token_id)
    assert tok.all_special_ids == frozenset(reference.all_special_ids)
    assert tok.chat_template == reference.chat_template
    assert tok.eos_token_id in tok.end_of_turn_token_ids
    for text in TEXTS + ["<|im_start|>user\nHi<|im_end|>\n"]:
        ids = tok.encode(text)
        assert ids == reference.encode(text)
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    # The file says add_bos_token = false: SmolLM2 prompts carry no BOS.
    assert tok.encode("Hello")[0] != tok.bos_token_id


@pytest.mark.parametrize("source", ["smollm2 gguf", "gemma3 gguf", "tiny bpe folder"])
def test_decode_equals_transformers_decode_with_or_without_its_python_layers(source, smollm2_tokenizer,
                                                                              tiny_bpe_folder):
    """Tokenizer.decode calls the `tokenizers` backend directly where transformers' decode would add
    nothing: the text must be transformers' own, special tokens kept or skipped."""
    import random

    from tests.tokenizer.model_files import gemma3_gguf_path

    tok = {"smollm2 gguf": lambda: smollm2_tokenizer, "tiny bpe folder": lambda: load_tokenizer(tiny_bpe_folder),
           "gemma3 gguf": lambda: load_tokenizer(gemma3_gguf_path())}[source]()
    if source != "tiny bpe folder":
        assert tok._backend_decode is not None   # the fast path is taken for these
    rng = random.Random(0)
    special = sorted(tok.all_special_ids)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 6))] + rng.sample(special, 1)
        rng.shuffle(ids)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == tok.hf.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_gguf_tokenizer_from_the_cache_equals_the_conversion(model, tmp_path, monkeypatch):
    """The converted tokenizer is saved once per GGUF file; later loads read it back (no conversion) and
    encode, decode, template and name special tokens exactly as the file's own conversion does. A damaged
    cache folder is converted again."""
    import ondo.loader.gguf_tokenizer as gguf_tokenizer
    from tests.tokenizer.model_files import gemma3_gguf_path, smollm2_gguf_path

    path = smollm2_gguf_path() if model == "smollm2" else gemma3_gguf_path()
    monkeypatch.setenv("ONDO_CACHE_DIR", str(tmp_path))
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    converted = gguf_tokenizer.load_gguf_tokenizer(path)
    (folder,) = (tmp_path / "gguf-tokenizers").iterdir()
    assert (folder / "tokenizer.json").is_file()

    def no_conversion(*args):
        raise AssertionError("the GGUF vocabulary was converted again")

    monkeypatch.setattr(gguf_tokenizer, "_write_cached", no_conversion)
    cached = gguf_tokenizer.load_gguf_tokenizer(path)
    chat = [{"role": "user", "content": "안녕하세요"}, {"role": "assistant", "content": "Hi 😀"},
            {"role": "user", "content": "  spaces\tand tabs"}]
    for tok in (converted, cached):
        assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id) == (len(reference), reference.bos_token_id,
                                                                        reference.eos_token_id)
        assert tok.all_special_ids == frozenset(reference.all_special_ids)
        assert tok.chat_template == reference.chat_template
        assert tok.end_of_turn_token_ids == converted.end_of_turn_token_ids
        for text in TEXTS + ["<|im_start|>user\nHi<|im_end|>\n", "<start_of_turn>user\nHi<end_of_turn>\n"]:
            ids = tok.encode(text)
            assert ids == reference.encode(text), (text, model)
            assert tok.decode(ids, skip_special_tokens=False) == reference.decode(ids), (text, model)
        if reference.chat_template is not None:   # the Gemma 3 file carries none
            assert tok.apply_chat_template(chat) == converted.apply_chat_template(chat)

    monkeypatch.undo()
    monkeypatch.setenv("ONDO_CACHE_DIR", str(tmp_path))
    (folder / "tokenizer.json").write_text("{ damaged")
    assert gguf_tokenizer.load_gguf_tokenizer(path).encode(TEXTS[2]) == reference.encode(TEXTS[2])
    assert gguf_tokenizer.load_gguf_tokenizer(path).encode(TEXTS[3]) == reference.encode(TEXTS[3])


def test_a_tokenizer_cache_that_cannot_be_written_is_skipped(tmp_path, monkeypatch):
    """A cache root that is a file (so nothing can be created under it) leaves the load as it is."""
    import ondo.loader.gguf_tokenizer as gguf_tokenizer
    from tests.tokenizer.model_files import smollm2_gguf_path

    path = smollm2_gguf_path()
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("ONDO_CACHE_DIR", str(blocked))
    tok = gguf_tokenizer.load_gguf_tokenizer(path)
    assert tok.encode(TEXTS[0]) == AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).encode(TEXTS[0])
    assert blocked.is_file()
