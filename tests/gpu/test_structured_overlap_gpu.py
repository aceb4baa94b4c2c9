"""On CUDA, a batch with structured output runs under async scheduling (ondo/engine/in_flight.py): the
forward of step N+1 is queued before N's tokens are read, and N+1 is sampled with its grammar's mask
once the host has advanced the matchers. Greedy outputs are token for token the synchronous path's,
every constrained output parses, and the steps were launched ahead rather than run synchronously.

A tiny random-weight Llama over the built-in model's tokenizer: its free text is noise, so every valid
output is the grammar's doing. What the grammar costs at batch 64 is benchmarks/structured.py's figure.
Run on a GPU machine: `pytest -q tests/gpu/test_structured_overlap_gpu.py -s` (skipped without CUDA; where
the built-in model's package is not installed, ONDO_TEST_TOKENIZER_DIR names a folder with its tokenizer).
"""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from ondo import LLM, SamplingParams
from ondo.sampling_params import StructuredOutputsParams

pytestmark = pytest.mark.gpu

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"]}
REGEX = r"[A-Z][a-z]{2,8}-[0-9]{3}"
CHOICES = ["Paris", "London", "Berlin", "Madrid"]


@pytest.fixture(scope="module")
def engines(tiny_llama_with_tokenizer):
    """(launched ahead, synchronous) LLMs over the same model."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    folder = str(tiny_llama_with_tokenizer[0])
    options = dict(device="cuda", dtype="bfloat16", max_model_len=512, max_num_seqs=64, kv_cache_memory_bytes=2 << 30)
    fast, sync = LLM(folder, **options), LLM(folder, async_scheduling=False, **options)
    assert fast.engine.async_scheduling, "CUDA graphs should turn async scheduling on"
    return fast, sync


def chat(llm: LLM, texts: list[str]) -> list[str]:
    return [llm.tokenizer.render_chat([{"role": "user", "content": text}]) for text in texts]


def summary(outputs):
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in outputs]


def assert_no_leak(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and stats["num_requests"] == 0


def test_a_mixed_batch_of_64_matches_sync_and_runs_ahead(engines):
    fast, sync = engines
    kinds = ["json", "regex", "choice", "plain"] * 16
    constraints = {"json": StructuredOutputsParams(json=SCHEMA), "regex": StructuredOutputsParams(regex=REGEX),
                   "choice": StructuredOutputsParams(choice=CHOICES), "plain": None}
    # The plain rows stop by length at different steps, the constrained ones when their grammar ends.
    params = [SamplingParams(temperature=0, max_tokens=96 if kind != "plain" else 8 + 5 * (i % 16),
                             ignore_eos=kind == "plain", structured_outputs=constraints[kind])
              for i, kind in enumerate(kinds)]
    prompts = chat(fast, [f"Describe person number {i} as JSON, or name a city." for i in range(len(kinds))])
    launched_ahead = fast.engine.num_steps_launched_ahead
    expected = summary(sync.generate(prompts, params))
    got = fast.generate(prompts, params)
    assert summary(got) == expected
    for kind, output in zip(kinds, got):
        text = output.outputs[0].text
        if kind == "json" and output.outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(text), SCHEMA)
        elif kind == "regex":
            assert re.fullmatch(REGEX, text), text
        elif kind == "choice":
            assert text in CHOICES, text
    steps = max(len(tokens) for tokens, _, _ in expected)
    launched_ahead = fast.engine.num_steps_launched_ahead - launched_ahead
    print(f"structured batch of 64: {launched_ahead} steps launched ahead, longest request {steps} tokens")
    assert launched_ahead >= steps - 1   # every step but the first
    assert_no_leak(fast)
