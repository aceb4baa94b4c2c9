"""The command line's options: the argparse tree, and SamplingParams / EngineConfig built from it.

Every option defaults to None ("not given") so that SamplingParams and EngineConfig keep their own
defaults and do all the validation: the CLI never restates a range.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

EXIT_USAGE = 2            # the user's input is wrong (as argparse uses it)

BUILTIN = "the built-in SmolLM2-135M-Instruct"
DEFAULT_GENERATE_MAX_TOKENS = 256


class CLIError(ValueError):
    """Bad command-line input that only the CLI can see (a prompt file, the positionals)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line instead of argparse's usage block: the message names the option already.
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


# ---- options ---------------------------------------------------------------------------------------

# (flag, type, help): each becomes the SamplingParams field of the same name; unset ones keep its default.
_SAMPLING_OPTIONS = [
    ("--min-tokens", int, "tokens to generate before EOS may end the answer (default 0)"),
    ("--temperature", float, "0 = greedy (default 1.0)"),
    ("--top-p", float, "nucleus mass kept, in (0, 1] (default 1.0 = off)"),
    ("--top-k", int, "-1 = off (default)"),
    ("--min-p", float, "drop tokens below min_p * p_max, in [0, 1] (default 0 = off)"),
    ("--typical-p", float, "locally typical sampling mass, in (0, 1] (default 1.0 = off)"),
    ("--epsilon-cutoff", float, "drop tokens with p < epsilon, in [0, 1) (default 0 = off)"),
    ("--eta-cutoff", float, "entropy-dependent cutoff, in [0, 1) (default 0 = off)"),
    ("--repetition-penalty", float, "multiplicative, over prompt and output tokens, > 0 (default 1.0)"),
    ("--presence-penalty", float, "OpenAI form, in [-2, 2] (default 0)"),
    ("--frequency-penalty", float, "OpenAI form, in [-2, 2] (default 0)"),
    ("--no-repeat-ngram-size", int, "forbid repeating n-grams of this size (default 0 = off)"),
    ("--n", int, "sequences returned per prompt (default 1)"),
    ("--best-of", int, "sequences generated, the n most likely returned (default n)"),
    ("--logprobs", int, "return the top-k log-probabilities of every generated token (see --json)"),
    ("--prompt-logprobs", int, "return the top-k log-probabilities of every prompt token (see --json)"),
    ("--truncate-prompt-tokens", int, "keep only the last k prompt tokens"),
]


def _add_sampling_options(parser: argparse.ArgumentParser, max_tokens_default: str) -> None:
    group = parser.add_argument_group("decoding options (SamplingParams)")
    group.add_argument("--max-tokens", type=int, metavar="INT",
                       help=f"tokens to generate at most (default {max_tokens_default})")
    for flag, kind, text in _SAMPLING_OPTIONS:
        group.add_argument(flag, type=kind, metavar=kind.__name__.upper(), help=text)
    group.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    group.add_argument("--stop-token-id", dest="stop_token_ids", action="append", type=int, metavar="ID",
                       help="stop token id (repeatable)")
    group.add_argument("--bad-word", dest="bad_words", action="append", metavar="TEXT",
                       help="word that must never be generated (repeatable)")
    group.add_argument("--logit-bias", action="append", type=_logit_bias, metavar="ID=BIAS",
                       help="add BIAS in [-100, 100] to token ID's logit (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", default=None, help="keep generating after EOS")
    group.add_argument("--include-stop-str-in-output", action="store_true", default=None)
    group.add_argument("--keep-special-tokens", dest="skip_special_tokens", action="store_false", default=None,
                       help="show special tokens in the text")
    shape = parser.add_argument_group("structured output (one of these)")
    shape.add_argument("--json-schema", metavar="FILE", help="the output is JSON following the schema in FILE")
    shape.add_argument("--json-object", action="store_true", default=None, help="the output is a JSON object")
    shape.add_argument("--regex", metavar="PATTERN", help="the whole output matches PATTERN")
    shape.add_argument("--choice", action="append", metavar="TEXT",
                       help="the output is exactly one of these (repeatable)")
    shape.add_argument("--grammar", metavar="FILE", help="the output follows the grammar in FILE (GBNF, rule root; or Lark, rule start)")


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine options (EngineConfig)")
    add = group.add_argument
    add("--dtype", help="auto | float32 | bfloat16 | float16 (default auto: float32 on the CPU, "
                        "bfloat16 for packed weights where the CPU has it)")
    add("--device", help="auto | cpu | cuda | cuda:N (default auto: cuda when available)")
    add("--max-model-len", type=int, metavar="TOKENS", help="context length (default: the model's, <= 8192 on the CPU)")
    add("--max-num-seqs", type=int, metavar="N", help="requests in one step at most (default 64)")
    add("--max-num-batched-tokens", type=int, metavar="N", help="token budget of one step (default 8192 on a GPU, 2048 on the CPU)")
    add("--prefill-tokens-while-decoding", type=_tokens_or_auto, metavar="N|auto",
        help="prompt tokens per step while other requests decode, so running streams keep their pace; "
             "auto: 256 on the CPU, on a GPU what ~30 ms of a step prefills, timed at start-up; 0: no cap "
             "(default: auto for serve; 256 on the CPU and no cap on a GPU otherwise)")
    add("--block-size", type=int, metavar="N", help="tokens per KV block: 8, 16, 32, 64 or 128 (default 16)")
    add("--kv-cache-memory-bytes", type=_byte_size, metavar="SIZE",
        help="KV cache budget: bytes or 512MiB, 2GiB... (default: from --gpu-memory-utilization, or 2 GiB on the CPU)")
    add("--kv-cache-dtype", metavar="DTYPE",
        help="auto | float32 | bfloat16 | float16: the KV cache's element type (default auto: the activations' "
             "dtype; float16 on the CPU for quantized weights with float32 activations)")
    add("--gpu-memory-utilization", type=float, metavar="F", help="share of GPU memory ondo may use, in (0, 1] (default 0.9)")
    add("--tensor-parallel-size", type=int, metavar="N",
        help="split the model over N devices, one worker process each (default 1; see docs/distributed.md)")
    add("--enforce-eager", action="store_true", default=None, help="turn CUDA graphs and fused kernels off")
    add("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
        help="schedule and launch each step before the previous step's tokens reach the host "
             "(default: on where CUDA graphs run)")
    add("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None)
    add("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false", default=None)
    add("--checkpoint", metavar="FILE", help="fine-tuned state dict (.ckpt/.pt/.bin/.safetensors) loaded over MODEL")
    add("--chat-template", metavar="JINJA_OR_FILE", help="chat template replacing the model's")
    add("--tokenizer", metavar="PATH", help="tokenizer folder or .gguf (default: the model's)")
    add("--seed", type=int, help="random seed: the engine's and, in generate and chat, each request's")
    add("--load-format", metavar="FORMAT", help="auto | dummy (random weights, for benchmarks) (default auto)")
    add("--quantization", metavar="METHOD",
        help="int8 | int4 | nf4: quantize a model folder while loading; none: dequantize a GGUF file "
             "(default: as stored: GGUF blocks stay packed, a folder's quantization_config is read)")


_ENGINE_FIELDS = ("dtype", "device", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                  "prefill_tokens_while_decoding", "block_size",
                  "kv_cache_memory_bytes", "kv_cache_dtype", "gpu_memory_utilization", "enforce_eager", "async_scheduling",
                  "enable_prefix_caching",
                  "enable_chunked_prefill", "checkpoint", "chat_template", "tokenizer", "seed", "load_format",
                  "quantization", "tensor_parallel_size")


def _tokens_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or auto, got {text!r}") from None


def _logit_bias(text: str) -> tuple[int, float]:
    token, sep, bias = text.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS such as 50256=-100, got {text!r}") from None


_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}


def _byte_size(text: str) -> int:
    number = text.strip().rstrip("kKmMgGtTiIbB")
    unit = text.strip()[len(number):].lower()
    try:
        return int(float(number) * _UNITS[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a size such as 2GiB, 512MiB or 1000000, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ondo", description="ondo: a fast, self-hosted LLM inference engine.",
                     epilog=f"MODEL (an HF model folder, a .gguf file or a config.json) is optional: without it "
                            f"{BUILTIN} runs. 'ondo COMMAND --help' lists every option.")
    parser.add_argument("--version", action="version", version=f"ondo {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    generate = commands.add_parser(
        "generate", usage="%(prog)s [options] [MODEL] PROMPT\n       %(prog)s [options] [MODEL] --prompts-file FILE",
        help="complete a prompt, streaming the text",
        description="Complete PROMPT (raw text, like /v1/completions; --chat applies the chat template) and "
                    "stream the text to stdout. Several prompts (--prompts-file) run as one batch.",
        epilog=f"MODEL is optional. With two arguments they are MODEL and PROMPT. With one, it is the PROMPT and "
               f"{BUILTIN} runs -- unless --prompts-file is given (then it is the MODEL). A lone argument "
               f"that is an existing path, or looks like one (./x, /x, ~/x, x.gguf), is refused as a prompt. "
               f"Put '--' before a prompt that starts with '-'. Examples:  ondo generate 'Once upon a time'   "
               f"ondo generate ./my-model 'Hello' --max-tokens 64 --temperature 0")
    generate.add_argument("inputs", nargs="*", metavar="[MODEL] PROMPT",
                          help="MODEL: an HF model folder, a .gguf file or a config.json (optional); "
                               "PROMPT: the text to complete")
    generate.add_argument("--prompts-file", metavar="FILE",
                          help="one prompt per line, or JSONL of {\"prompt\": text or token ids} / "
                               "{\"messages\": [...]} objects ('-' = stdin); all run as one batch")
    generate.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    generate.add_argument("--system", metavar="TEXT", help="system prompt (with --chat)")
    generate.add_argument("--json", action="store_true",
                          help="print each full RequestOutput as one line of JSON instead of streaming text")
    generate.add_argument("--stats", action="store_true", help="print token counts and speed on stderr")
    _add_sampling_options(generate, str(DEFAULT_GENERATE_MAX_TOKENS))
    _add_engine_options(generate)
    _add_lora_options(generate, serve=False)

    chat = commands.add_parser(
        "chat", usage="%(prog)s [options] [MODEL]", help="chat with a model in the terminal",
        description="A multi-turn chat: type a message, the answer streams back. Commands: /reset clears the "
                    "history, /system TEXT sets the system prompt (/system alone removes it), /exit leaves. "
                    "Ctrl-C stops the answer being written (the partial answer stays in the history; "
                    "nothing is kept if the model had not written anything yet); Ctrl-D or the end of stdin exits.",
        epilog=f"MODEL is optional: without it {BUILTIN} runs. Answers go to stdout, notices to stderr; "
               f"stdin may be a pipe (one message per line).")
    chat.add_argument("model", nargs="?", metavar="MODEL", help="an HF model folder, a .gguf file or a config.json")
    chat.add_argument("--system", metavar="TEXT", help="system prompt")
    chat.add_argument("--stats", action="store_true", help="after each answer, print token counts and speed on stderr")
    _add_sampling_options(chat, "none: until the model ends its turn or the context is full")
    _add_engine_options(chat)
    _add_lora_options(chat, serve=False)

    serve = commands.add_parser(
        "serve", usage="%(prog)s [options] [MODEL]", help="serve the OpenAI-compatible API and the web playground",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics and the "
                    "playground. SIGTERM or Ctrl-C stop the server.",
        epilog=f"MODEL is optional: without it {BUILTIN} is served.")
    serve.add_argument("model", nargs="?", metavar="MODEL", help="an HF model folder, a .gguf file or a config.json")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--api-key", default=os.environ.get("ONDO_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $ONDO_API_KEY, else no key)")
    serve.add_argument("--max-waiting", type=int, metavar="N",
                       help="waiting requests at most; more are answered 503 (default unbounded)")
    serve.add_argument("--served-model-name", metavar="NAME", help="model name the API reports and accepts")
    serve.add_argument("--tool-call-parser", choices=("auto", "hermes", "llama3_json", "mistral", "none"),
                       default="auto", help="how tool calls are read from chat answers (default auto: from the "
                                            "chat template; hermes when it does not render tools)")
    serve.add_argument("--reasoning-parser", choices=("auto", "qwen3", "deepseek_r1", "none"), default="auto",
                       help="split <think>...</think> off as reasoning_content (default auto: when the chat "
                            "template mentions <think>)")
    _add_engine_options(serve)
    _add_lora_options(serve, serve=True)
    from ondo.cli.merge_lora import add_merge_lora_parser

    add_merge_lora_parser(commands)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ondo")
    except PackageNotFoundError:
        return "unknown"


# ---- building the engine's inputs ------------------------------------------------------------------

def sampling_params(args: argparse.Namespace, **defaults):
    """SamplingParams from the options given; `defaults` fill the ones left out."""
    from ondo.sampling_params import SamplingParams

    names = [flag[2:].replace("-", "_") for flag, _, _ in _SAMPLING_OPTIONS]
    names += ["max_tokens", "stop", "stop_token_ids", "bad_words", "ignore_eos", "include_stop_str_in_output", "skip_special_tokens"]
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.logit_bias:
        given["logit_bias"] = dict(args.logit_bias)
    if args.seed is not None:
        given["seed"] = args.seed
    structured = structured_outputs(args)
    if structured is not None:
        given["structured_outputs"] = structured
    return SamplingParams(**{**defaults, **given})


_SHAPE_FLAGS = {"json_schema": "--json-schema", "json_object": "--json-object", "regex": "--regex",
                "choice": "--choice", "grammar": "--grammar"}
_SHAPE_FIELDS = {"json_schema": "json", "json_object": "json_object", "regex": "regex", "choice": "choice",
                 "grammar": "grammar"}


def structured_outputs(args: argparse.Namespace):
    """StructuredOutputsParams from --json-schema / --json-object / --regex / --choice / --grammar."""
    from ondo.sample.structured import StructuredOutputError, StructuredOutputsParams

    given = [name for name in _SHAPE_FLAGS if getattr(args, name, None) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise CLIError(f"give one of {', '.join(_SHAPE_FLAGS.values())}; got {_SHAPE_FLAGS[given[0]]} "
                       f"and {_SHAPE_FLAGS[given[1]]}")
    name = given[0]
    value = getattr(args, name)
    if name in ("json_schema", "grammar"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise CLIError(f"{_SHAPE_FLAGS[name]} file not found: {value}")
        value = path.read_text(encoding="utf-8")
    try:
        return StructuredOutputsParams(**{_SHAPE_FIELDS[name]: value})
    except StructuredOutputError as error:
        field = f"structured_outputs.{error.field}"
        raise CLIError(str(error).replace(field, f"{_SHAPE_FLAGS[name]} {_shown(name, getattr(args, name))}", 1)
                       if error.field else str(error)) from None


def _shown(name: str, value) -> str:
    return repr(value) if name in ("regex", "choice") else str(value)


def _add_lora_options(parser: argparse.ArgumentParser, serve: bool) -> None:
    group = parser.add_argument_group("LoRA adapters (PEFT folders)")
    if serve:
        group.add_argument("--lora-modules", nargs="+", type=_lora_module, metavar="NAME=PATH",
                           help="adapters served as models of their own (implies --enable-lora)")
        group.add_argument("--enable-lora", action="store_true", default=None,
                           help="accept adapters loaded later through POST /v1/load_lora_adapter")
    else:
        group.add_argument("--lora", metavar="PATH", help="run every prompt through this PEFT LoRA adapter")
    group.add_argument("--max-loras", type=int, metavar="N", help="adapters resident on the device at once (default 4)")
    group.add_argument("--max-lora-rank", type=int, metavar="R", help="largest adapter rank (default 16)")


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"a LoRA module must be NAME=PATH, got {text!r}")
    return name, path


def _lora_options(args: argparse.Namespace) -> dict:
    options = {name: getattr(args, name) for name in ("max_loras", "max_lora_rank")
               if getattr(args, name, None) is not None}
    if getattr(args, "lora", None):
        if not Path(args.lora).expanduser().is_dir():
            raise CLIError(f"LoRA adapter not found: {args.lora} (give a PEFT adapter folder)")
        options.update(enable_lora=True, lora_modules=(("lora", args.lora),), default_lora="lora")
    if getattr(args, "lora_modules", None):
        options.update(enable_lora=True, lora_modules=tuple(args.lora_modules))
    if getattr(args, "enable_lora", None):
        options["enable_lora"] = True
    return options


def engine_config(args: argparse.Namespace, model: str | None, **extra):
    from ondo.config import EngineConfig

    given = {name: getattr(args, name) for name in _ENGINE_FIELDS if getattr(args, name) is not None}
    given.update(_lora_options(args))
    config = EngineConfig(model=model, **given, **extra)
    _check_paths_exist(config)
    return config


def _check_paths_exist(config) -> None:
    """Fail before anything loads (and before a server starts listening) when a file is not there."""
    if config.tokenizer is not None and not Path(config.tokenizer).expanduser().exists():
        raise CLIError(f"tokenizer not found: {config.tokenizer} (give a tokenizer folder or a .gguf file)")
    if config.model is None or Path(config.model).expanduser().exists():
        return
    if config.load_format == "dummy":
        from ondo.loader.dummy import KNOWN_CONFIGS

        if config.model in KNOWN_CONFIGS:
            return
    raise CLIError(f"model not found: {config.model} (give an HF model folder, a .gguf file or a config.json)")


def quiet_logs() -> None:
    # The engine's INFO lines (KV cache size...) would interleave with the text; ONDO_LOG_LEVEL still wins.
    if "ONDO_LOG_LEVEL" not in os.environ:
        logging.getLogger("ondo").setLevel(logging.WARNING)


def load_engine(config):
    from ondo.engine.engine import Engine

    return Engine(config)
