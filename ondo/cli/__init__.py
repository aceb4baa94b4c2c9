"""The `ondo` command line: `generate` (complete prompts, streaming), `chat` (a terminal chat) and
`serve` (the OpenAI-compatible server). `ondo COMMAND --help` documents each.

MODEL is optional everywhere; without it the built-in SmolLM2-135M-Instruct runs. Every error a user
can cause (a missing file, an option out of range, an unsupported architecture) ends the command
with ONE line on stderr (`error: top_p must be in (0, 1], got 1.5`) and exit status 2, checked
before the model loads wherever possible.
"""
from __future__ import annotations

import argparse
import os
import sys

from ondo.cli.options import EXIT_USAGE, CLIError, build_parser, engine_config, quiet_logs

__all__ = ["main"]

EXIT_INTERRUPTED = 130    # Ctrl-C, as shells report SIGINT


def _generate(args: argparse.Namespace) -> int:
    from ondo.cli.generate import run_generate, split_inputs

    _apply_model_sampling_defaults(args, split_inputs(args.inputs, args.prompts_file)[0])
    return run_generate(args)


def _chat(args: argparse.Namespace) -> int:
    from ondo.cli.chat import run_chat

    _apply_model_sampling_defaults(args, args.model)
    return run_chat(args)


def _apply_model_sampling_defaults(args: argparse.Namespace, model: str | None) -> None:
    """The model's generation_config.json sampling options (temperature, top_p, top_k, min_p,
    repetition_penalty) for the flags left out, as the server and vLLM do; a flag given wins."""
    from pathlib import Path

    from ondo.loader.hf import load_generation_config
    from ondo.server.params import model_sampling_defaults

    if not model:
        return
    path = Path(model).expanduser()
    folder = path.parent if path.is_file() and path.name.endswith(".json") else path
    if folder.is_dir():
        for name, value in model_sampling_defaults(load_generation_config(folder)).items():
            if getattr(args, name, None) is None:
                setattr(args, name, value)


def _serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise CLIError(f"port must be in [0, 65535], got {args.port}")
    if args.api_server_count < 1:
        raise CLIError(f"api-server-count must be >= 1, got {args.api_server_count}")
    if args.prefill_tokens_while_decoding is None:   # a server keeps its streams' pace while prompts arrive
        args.prefill_tokens_while_decoding = "auto"
    config = engine_config(args, args.model, max_waiting=args.max_waiting)
    from ondo.server import ServerLimits, run_server

    limits = ServerLimits(max_request_body_bytes=args.max_request_body_bytes,
                          request_timeout_s=args.request_timeout, timeout_keep_alive_s=args.timeout_keep_alive,
                          limit_concurrency=args.limit_concurrency or None,
                          shutdown_timeout_s=args.shutdown_timeout)
    run_server(config, args.host, args.port, args.api_key, args.max_waiting, args.served_model_name,
               tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser, limits=limits,
               engine_process=args.engine_process, api_server_count=args.api_server_count)
    return 0


def _add_serve_limits(parser: argparse.ArgumentParser) -> None:
    """`ondo serve`'s protections against clients (defaults: ondo.server.guard.ServerLimits)."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    group = serve.add_argument_group("limits on clients")
    group.add_argument("--max-request-body-bytes", type=int, default=32 * 1024 * 1024, metavar="N",
                       help="larger request bodies are refused with 413 (default 32 MiB)")
    group.add_argument("--request-timeout", type=float, default=30.0, metavar="S",
                       help="seconds a client has to send a request's headers, and then its body; "
                            "slower connections are closed (408 for a body) (default 30)")
    group.add_argument("--timeout-keep-alive", type=float, default=5.0, metavar="S",
                       help="idle keep-alive connections are closed after S seconds (default 5)")
    group.add_argument("--limit-concurrency", type=int, default=512, metavar="N",
                       help="connections at most; more are answered 503 (default 512; 0 = no limit)")
    serve.add_argument("--api-server-count", type=int, default=1, metavar="N",
                       help="API server processes sharing the port and one engine process (implies "
                            "--engine-process): for streaming more tokens a second than one process can")
    serve.add_argument("--engine-process", action="store_true",
                       help="run the engine loop in a process of its own; the server's process keeps HTTP, "
                            "tokenizing and detokenizing")
    group.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                       help="on SIGTERM, new requests get 503 and running ones may finish within S "
                            "seconds before they are aborted (default 10)")


def _merge_lora(args: argparse.Namespace) -> int:
    from ondo.cli.merge_lora import run_merge_lora

    return run_merge_lora(args)


_COMMANDS = {"generate": _generate, "chat": _chat, "serve": _serve, "merge-lora": _merge_lora}


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (the console script passes it to sys.exit)."""
    parser = build_parser()
    _add_serve_limits(parser)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command != "serve":
        quiet_logs()
    try:
        return _COMMANDS[args.command](args)
    except BrokenPipeError:
        return _stdout_closed()
    except (ValueError, OSError) as error:
        # ondo's user-facing errors are all ValueErrors (ConfigError, SamplingParamsError, RequestError,
        # ModelLoadError, UnsupportedModelError, ChatTemplateError); a missing file is an OSError.
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.strerror}: {error.filename}"
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())


def _stdout_closed() -> int:
    # `ondo generate ... | head` closed the pipe: stop quietly, and keep Python from failing to flush at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0
