"""`ondo chat`: a multi-turn chat in the terminal, each answer streamed as it is generated.

Every turn re-renders the whole conversation with the model's chat template (the prefix cache
makes the repeated history cheap). Ctrl-C while an answer streams aborts that request in the
engine and keeps the chat open: the SIGINT handler then only raises a flag that the loop checks
between engine steps, so a step is never torn in half. The partial answer stays in the history,
as the user saw it; an answer stopped before its first character leaves no trace (the user's
message is dropped too, so user and assistant turns keep alternating as templates expect).
"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time

from ondo.cli.options import CLIError, engine_config, load_engine, sampling_params

COMMANDS = "/reset clears the history, /system TEXT sets the system prompt (/system alone removes it), /exit leaves"


def run_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args, max_tokens=None)   # None: until the model ends its turn
    if params.n != 1:
        raise CLIError(f"chat shows one answer per turn: n must be 1, got {params.n}")
    engine = load_engine(engine_config(args, args.model))
    if engine.tokenizer is None:
        raise CLIError("this model has no tokenizer, so it cannot chat")
    if engine.tokenizer.chat_template is None:
        raise CLIError("this model has no chat template: pass --chat-template JINJA_OR_FILE")
    return ChatSession(engine, params, args.system, args.stats).run()


class _SigintHandler:
    """Ctrl-C while a terminal line is being typed raises KeyboardInterrupt, which drops that line.
    Anywhere else it only sets `interrupted`, which the answer loop checks between engine steps.
    From a pipe no line is being typed, and raising there could lose lines already read into
    stdin's buffer, so Ctrl-C between answers is ignored."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive
        self.reading = False
        self.interrupted = False

    def __call__(self, signum, frame) -> None:
        if self.reading and self.interactive:
            raise KeyboardInterrupt
        self.interrupted = True

    def read_line(self, prompt: str) -> str:
        self.reading = True
        try:
            line = input(prompt)
        finally:
            self.reading = False
        self.interrupted = False   # a Ctrl-C from here on is about the answer to this line
        return line


class ChatSession:
    def __init__(self, engine, params, system: str | None, show_stats: bool) -> None:
        self.engine, self.params, self.system, self.show_stats = engine, params, system, show_stats
        self.history: list[dict] = []   # user and assistant turns, without the system prompt
        self.interactive = sys.stdin.isatty()
        self.sigint = _SigintHandler(self.interactive)
        self.turns = 0

    def run(self) -> int:
        """Read messages until /exit or the end of stdin; returns the exit status."""
        previous = signal.signal(signal.SIGINT, self.sigint)
        # Announced once Ctrl-C is handled: from here on it never ends the chat.
        if self.interactive:
            import readline  # noqa: F401  (line editing and history for input())

            self.notice(f"chatting with {self.engine.model_name}. {COMMANDS}. "
                        f"Ctrl-C stops an answer, Ctrl-D exits.")
        elif self.show_stats:
            self.notice(f"[model {self.engine.model_name}, loaded in {self.engine.load_time_s:.1f} s]")
        try:
            while True:
                try:
                    line = self.sigint.read_line(">>> " if self.interactive else "")
                    if not self.handle(line.strip()):
                        return 0
                except EOFError:
                    if self.interactive:
                        print()
                    return 0
                except KeyboardInterrupt:   # Ctrl-C at the prompt: the chat goes on
                    self.notice("")
        finally:
            signal.signal(signal.SIGINT, previous)

    def handle(self, line: str) -> bool:
        """One line of input; False when the chat should end."""
        if not line:
            return True
        if not line.startswith("/"):
            self.answer(line)
            return True
        command, _, rest = line.partition(" ")
        if command in ("/exit", "/quit", "/bye"):
            return False
        if command == "/reset":
            self.history.clear()
            self.notice("[history cleared]")
        elif command == "/system":
            self.system = rest.strip() or None
            self.notice("[system prompt set]" if self.system else "[system prompt removed]")
        elif command == "/help":
            self.notice(COMMANDS)
        else:
            self.notice(f"unknown command {command}: {COMMANDS}")
        return True

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def answer(self, text: str) -> None:
        user = {"role": "user", "content": text}
        self.turns += 1
        request_id = f"chat-{self.turns}"
        try:
            prompt_ids = self.engine.tokenizer.apply_chat_template(self.messages() + [user], add_generation_prompt=True)
            self.engine.add_request(request_id, prompt_ids, self._params_for(len(prompt_ids)))
        except ValueError as error:   # the turn is not recorded: the user may /reset or rephrase
            self.notice(f"error: {' '.join(str(error).split())}")
            return
        start = time.perf_counter()
        text_seen, last = self._stream(request_id)
        elapsed = time.perf_counter() - start
        stopped = self.sigint.interrupted and (last is None or not last.finished)
        if stopped:
            self.notice("[answer stopped]")
        if last is not None and last.error:
            self.notice(f"error: {last.error}")
            return
        if stopped and not text_seen:
            return
        reply = text_seen if stopped else last.outputs[0].text
        self.history += [user, {"role": "assistant", "content": reply}]
        if self.show_stats:
            generated = len(last.outputs[0].token_ids) if last is not None else 0
            reason = "abort" if stopped else last.outputs[0].finish_reason
            self.notice(f"[{len(prompt_ids)} prompt tokens, {generated} generated tokens, finish: {reason}, "
                        f"{generated / elapsed:.1f} tokens/s]")

    def _params_for(self, prompt_len: int):
        """This turn's params: the answer may use the context the conversation leaves free."""
        room = self.engine.max_model_len - prompt_len
        if room < 1:
            raise CLIError(f"the conversation ({prompt_len} tokens) fills the context "
                           f"({self.engine.max_model_len} tokens): /reset to start over")
        max_tokens = room if self.params.max_tokens is None else min(self.params.max_tokens, room)
        return dataclasses.replace(self.params, max_tokens=max_tokens)

    def _stream(self, request_id: str):
        """Print the answer as it comes; returns (the text printed, the last RequestOutput)."""
        text, last = "", None
        while self.engine.has_unfinished_requests():
            if self.sigint.interrupted:
                self.engine.abort_request(request_id)
                break
            for out in self.engine.step():
                delta = out.outputs[0].text_delta
                if delta:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
                    text += delta
                last = out
        sys.stdout.write("\n\n" if self.interactive else "\n")
        sys.stdout.flush()
        return text, last

    def notice(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
