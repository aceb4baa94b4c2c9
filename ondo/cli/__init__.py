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
    from ondo.cli.generate import run_generate

    return run_generate(args)


def _chat(args: argparse.Namespace) -> int:
    from ondo.cli.chat import run_chat

    return run_chat(args)


def _serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise CLIError(f"port must be in [0, 65535], got {args.port}")
    config = engine_config(args, args.model, max_waiting=args.max_waiting)
    from ondo.server import run_server

    run_server(config, args.host, args.port, args.api_key, args.max_waiting, args.served_model_name,
               tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser)
    return 0


_COMMANDS = {"generate": _generate, "chat": _chat, "serve": _serve}


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (the console script passes it to sys.exit)."""
    parser = build_parser()
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
