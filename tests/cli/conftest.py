"""The CLI runs as a subprocess (`python -m ondo ...`), as a user runs it. Each start imports torch and
transformers (seconds), so the tests combine their checks into few runs."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import build_tiny_llama

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "ONDO_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
ENV.pop("ONDO_LOG_LEVEL", None)


@pytest.fixture(scope="session")
def cli_model(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """A 2-layer random Llama over the real SmolLM2 tokenizer and chat template; its 4096-token context
    lets an answer run long enough to be interrupted."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("cli-model")
    for item in smollm2_tokenizer_dir.iterdir():
        shutil.copy(item, path / item.name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    build_tiny_llama(path, vocab_size=len(tokenizer), seed=11, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, max_position_embeddings=4096)
    return path


def run_ondo(*args, stdin: str | None = None, module: str = "ondo", timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=ENV, cwd=REPO)


class LiveCLI:
    """`ondo ...` running in the background with its stdout and stderr collected by reader threads,
    so a test can wait for output, send a signal mid-stream and write the next line."""

    def __init__(self, *args) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "ondo", *map(str, args)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=REPO)
        self._chunks = {"stdout": bytearray(), "stderr": bytearray()}
        self._readers = [threading.Thread(target=self._read, args=(name,), daemon=True) for name in self._chunks]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str) -> None:
        stream = getattr(self.process, name)
        while chunk := os.read(stream.fileno(), 4096):
            self._chunks[name] += chunk

    @property
    def stdout(self) -> str:
        return bytes(self._chunks["stdout"]).decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return bytes(self._chunks["stderr"]).decode("utf-8", errors="replace")

    def wait_for(self, condition, what: str, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.process.poll() is not None and not condition():
                time.sleep(0.2)   # let the readers drain what the process wrote last
                if condition():
                    return
                raise AssertionError(f"ondo exited ({self.process.returncode}) before {what}:\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.stderr[-3000:]}")
            time.sleep(0.05)

    def send_line(self, line: str) -> None:
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def interrupt(self) -> None:
        self.process.send_signal(signal.SIGINT)

    def finish(self, timeout_s: float = 60) -> int:
        """Close stdin (end of input) and return the exit status."""
        self.process.stdin.close()
        try:
            status = self.process.wait(timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        for reader in self._readers:
            reader.join(5)
        return status


@pytest.fixture(scope="session")
def reference_llm(cli_model):
    """The same model through the offline API: what the CLI prints must be exactly what it generates."""
    from ondo import LLM

    return LLM(str(cli_model))


@pytest.fixture()
def run_main(capsys):
    """`ondo ARGS` in this process: fast (torch is imported already) where a subprocess adds nothing.
    Returns (exit status, stdout, stderr)."""
    from ondo.cli import main

    level = logging.getLogger("ondo").level

    def run(*args) -> tuple[int, str, str]:
        try:
            status = main([str(a) for a in args])
        except SystemExit as stop:   # argparse's own errors and --help
            status = stop.code
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    yield run
    logging.getLogger("ondo").setLevel(level)   # main() quiets ondo's logger
