"""A cached GGUF tokenizer and config loaded without transformers (`PlainTokenizer`, `jinja_chat.py`,
`PlainConfig`) against transformers' own: the same ids, texts, prompts and config values, and a process
that never imports transformers."""
from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest

from ondo.loader.gguf_reader import GGUFFile
from ondo.loader.gguf_tokenizer import load_gguf_tokenizer
from ondo.loader.plain_config import PlainConfig, cached_config
from ondo.tokenizer.chat_template import ChatTemplateError
from ondo.tokenizer.tokenizer import Tokenizer
from tests.server.chat_templates import QWEN3_STYLE
from tests.tokenizer.conftest import CHATML_TEMPLATE, CORPUS
from tests.tokenizer.model_files import gemma3_gguf_path, smollm2_gguf_path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ONDO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def plain_and_hf(path, chat_template=None) -> tuple[Tokenizer, Tokenizer]:
    """The file's tokenizer loaded twice: converted by transformers, then from the cache without it."""
    first = load_gguf_tokenizer(path, chat_template=chat_template)
    second = load_gguf_tokenizer(path, chat_template=chat_template)
    assert first.plain is None
    return second, first


TEXTS = CORPUS[:4] + ["", "  two spaces\n\nand\ttabs ", "digits 0123456789 3.14", "<b>&amp;</b> 'q' \"qq\""]


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_plain_tokenizer_gives_transformers_ids_and_texts(model, cache_dir):
    path = smollm2_gguf_path() if model == "smollm2" else gemma3_gguf_path()
    plain, hf = plain_and_hf(path)
    if model == "smollm2":
        assert plain.plain is not None                  # the built-in model's loads skip transformers
    if plain.plain is None:
        pytest.skip(f"{model}'s tokenizer class decodes on its own: transformers serves it")
    assert (plain.vocab_size, plain.bos_token_id, plain.eos_token_id) == (hf.vocab_size, hf.bos_token_id,
                                                                          hf.eos_token_id)
    assert plain.all_special_ids == hf.all_special_ids and plain.end_of_turn_token_ids == hf.end_of_turn_token_ids
    assert plain.chat_template == hf.chat_template
    specials = "".join(hf.hf.convert_ids_to_tokens(sorted(hf.all_special_ids)))
    for text in TEXTS + [f"{specials} in {specials}text"]:
        for special in (True, False):
            ids = plain.encode(text, add_special_tokens=special)
            assert ids == hf.encode(text, add_special_tokens=special), text
            for skip in (True, False):
                for spaces in (True, False):
                    assert plain.decode(ids, skip, spaces) == hf.decode(ids, skip, spaces), text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[2]}]
    if hf.chat_template is not None:                    # (this Gemma 3 file has none)
        assert plain.apply_chat_template(chat) == hf.apply_chat_template(chat)
    copied = pickle.loads(pickle.dumps(plain))          # sent to another process, say
    assert copied.plain is not None and copied.encode(TEXTS[2]) == plain.encode(TEXTS[2])
    assert copied.hf.encode(TEXTS[2]) == hf.hf.encode(TEXTS[2])   # transformers' own, loaded on demand


LLAMA3_STYLE = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- for message in messages %}
{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}{{ raise_exception('bad role ' + message['role']) }}{% endif %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"""

GEMMA_STYLE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}{{ raise_exception('System role not supported') }}{%- endif -%}
{%- set ns = namespace(turns=0) -%}
{%- for message in messages -%}
{%- set ns.turns = ns.turns + 1 -%}
{%- if message['content'] is string -%}{%- set text = message['content'] -%}
{%- else -%}{%- set text = message['content'] | map(attribute='text') | join('') -%}{%- endif -%}
{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' + text | trim + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"""

REASONING_STYLE = """{%- for message in messages %}{% if loop.index > 6 %}{% break %}{% endif %}
<|im_start|>{{ message.role }}
{% if message.reasoning_content %}<think>{{ message.reasoning_content }}</think>{% endif %}
{%- if message.role == 'assistant' %}{% generation %}{{ message.content }}{% endgeneration %}{% else %}{{ message.content }}{% endif %}<|im_end|>
{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}{{ dict(a=1) | tojson }} {{ tools | tojson(indent=2) if tools else '' }}"""

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & \"here\"",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi <b>there</b> & 'you'"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "안녕?"},
     {"role": "assistant", "content": "Hello.", "reasoning_content": "greet back"}, {"role": "user", "content": "More"}],
    [{"role": "user", "content": [{"type": "text", "text": "parts "}, {"type": "text", "text": "joined"}]}],
    [{"role": "user", "content": "Weather?"},
     {"role": "assistant", "content": None, "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Seoul"}}}]},
     {"role": "tool", "content": "{\"temp\": 3}"}],
    [{"role": "moderator", "content": "not a role the Llama template knows"}],
]


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, QWEN3_STYLE, LLAMA3_STYLE, GEMMA_STYLE, REASONING_STYLE, None],
                         ids=["chatml", "qwen3", "llama3", "gemma", "reasoning", "file"])
def test_chat_templates_render_as_transformers_renders_them(template, cache_dir):
    """Every conversation, with and without tools and a generation prompt, and continuing the last
    message: the same prompt text, or the same error."""
    plain, hf = plain_and_hf(smollm2_gguf_path(), chat_template=template)
    assert plain.plain is not None

    def outcome(tokenizer, chat, **options):
        try:
            return tokenizer.render_chat(chat, **options)
        except ChatTemplateError as error:
            return "error", str(error)

    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # system turns folded into the user's, both ways
        for chat in CONVERSATIONS:
            for options in (dict(add_generation_prompt=True), dict(add_generation_prompt=False),
                            dict(tools=TOOLS), dict(continue_final_message=True), dict(enable_thinking=False)):
                want = outcome(hf, chat, **options)
                assert outcome(plain, chat, **options) == want, (chat, options)
                checked += isinstance(want, str)
    assert checked >= 10                                # most of them render (not all errors)


def test_a_damaged_description_falls_back_to_transformers(cache_dir):
    path = smollm2_gguf_path()
    converted = load_gguf_tokenizer(path)
    [description] = cache_dir.glob("gguf-tokenizers/*/ondo-plain-tokenizer.json")
    description.write_text("{not json")
    tokenizer = load_gguf_tokenizer(path)
    assert tokenizer.plain is None and tokenizer.encode(TEXTS[3]) == converted.encode(TEXTS[3])


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_plain_config_holds_the_transformers_configs_values(model, cache_dir):
    path = smollm2_gguf_path() if model == "smollm2" else gemma3_gguf_path()
    gguf = GGUFFile(path, metadata_only=True)
    names = set(gguf.tensors)
    built = cached_config(gguf.metadata, names, gguf.metadata_digest())
    plain = cached_config(gguf.metadata, names, gguf.metadata_digest())
    assert not isinstance(built, PlainConfig) and isinstance(plain, PlainConfig)
    kept = {name: value for name, value in vars(plain).items() if not name.startswith("_")}
    assert len(kept) > 40 and {"hidden_size", "rope_parameters", "model_type", "tie_word_embeddings"} <= kept.keys()
    for name, value in kept.items():
        assert getattr(built, name) == value, name
    for name in plain._left_out:                       # not JSON values: reading one is an error, not a default
        with pytest.raises(RuntimeError, match="not kept"):
            getattr(plain, name, None)
    assert getattr(plain, "no_such_attribute", "default") == "default"
    for copied in (pickle.loads(pickle.dumps(plain)), copy.deepcopy(plain)):
        assert copied.to_dict() == plain.to_dict() and copied._left_out == plain._left_out


def test_a_config_with_scaled_rope_is_not_saved(cache_dir):
    gguf = GGUFFile(smollm2_gguf_path(), metadata_only=True)
    metadata = dict(gguf.metadata)
    metadata["llama.rope.scaling.type"] = "linear"
    metadata["llama.rope.scaling.factor"] = 2.0
    for _ in range(2):   # rotary.py hands transformers' frequency functions the config itself
        assert not isinstance(cached_config(metadata, set(gguf.tensors), "scaled"), PlainConfig)


def test_a_cached_gguf_model_runs_without_importing_transformers(tmp_path):
    """The built-in model's second load, a generation and a chat, in a process that blocks transformers."""
    script = textwrap.dedent("""
        import sys, importlib.abc, json
        if sys.argv[1] == "block":
            class Block(importlib.abc.MetaPathFinder):
                def find_spec(self, name, path, target=None):
                    if name.split(".")[0] in ("transformers", "huggingface_hub"):
                        raise ImportError(f"{name} imported")
            sys.meta_path.insert(0, Block())
        from ondo import LLM, SamplingParams
        llm = LLM(max_model_len=256)
        greedy = SamplingParams(max_tokens=8, temperature=0)
        text = llm.generate(["The capital of France is"], greedy)[0].outputs[0].text
        chat = llm.chat([{"role": "user", "content": "What is the capital of France?"}], greedy)[0].outputs[0].text
        print(json.dumps([text, chat, type(llm.engine.hf_config).__name__]))
    """)
    env = {**__import__("os").environ, "ONDO_CACHE_DIR": str(tmp_path / "cache")}

    def run(mode):
        result = subprocess.run([sys.executable, "-c", script, mode], env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    first = run("allow")
    second = run("block")
    assert first[:2] == second[:2] and "Paris" in second[1]
    assert (first[2], second[2]) == ("LlamaConfig", "PlainConfig")
