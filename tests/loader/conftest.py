"""Fixtures shared by the loader tests: transformers' own float32 models of the real GGUF files, loaded
once for the package (transformers dequantizes a GGUF in Python: ~45 s for Gemma 3 270M on a 2-core
machine), read but never changed by the tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tokenizer.model_files import gemma3_gguf_path, smollm2_gguf_path


def transformers_gguf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="package")
def smollm2_reference():
    return transformers_gguf_model(smollm2_gguf_path())


@pytest.fixture(scope="package")
def gemma3_reference():
    return transformers_gguf_model(gemma3_gguf_path())
