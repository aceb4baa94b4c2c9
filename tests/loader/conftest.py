"""Fixtures shared by the loader tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="package")
def gemma3_reference():
    """transformers' own float32 model of the Gemma 3 270M GGUF, loaded once for the loader tests: its
    dequantization runs in Python and takes ~45 s on a 2-core machine."""
    from transformers import AutoModelForCausalLM

    from tests.tokenizer.model_files import gemma3_gguf_path

    path = gemma3_gguf_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
