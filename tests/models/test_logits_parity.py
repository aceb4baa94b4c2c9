"""ondo's models against transformers, family by family, on tiny random-weight float32 models.

Criterion: for every position of every prompt, max |ondo logit - transformers logit| <= 1e-4, with the
reference logits spread over several units (std > 0.5) so that the bound is tight. Prompts of different
lengths run together in one flat batch over a paged cache: whole, in chunks that read the cached
prefix, and as decode steps after a prefill.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tiny_models import (FAMILIES, VOCAB, PagedDriver, build_tiny_model, load_ondo_model, load_ondo_weights,
                         read_safetensors, reference_logits)

from ondo.layers.attention import Attention

TOLERANCE = 1e-4
PROMPT_LENGTHS = (29, 7, 40, 1)


@dataclasses.dataclass
class Family:
    name: str
    model: torch.nn.Module
    folder: Path
    prompts: list[list[int]]
    references: list[torch.Tensor]   # per prompt: transformers' logits [len, vocab]

    def driver(self) -> PagedDriver:
        return PagedDriver(self.model, len(self.prompts), max(PROMPT_LENGTHS))


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Builds each family once per module, on first use."""
    built: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in built:
            seed = FAMILIES.index(name)
            folder = tmp_path_factory.mktemp(name)
            hf_model = build_tiny_model(name, folder, seed=seed)
            generator = torch.Generator().manual_seed(seed)
            prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
            references = [reference_logits(hf_model, p) for p in prompts]
            assert min(r.std().item() for r in references if r.shape[0] > 1) > 0.5
            built[name] = Family(name, load_ondo_model(folder), folder, prompts, references)
        return built[name]

    return get


def assert_logits_match(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for i, (ours, ref) in enumerate(zip(actual, expected)):
        assert ours.shape == ref.shape
        diff = (ours - ref).abs().max().item()
        assert diff <= TOLERANCE, f"prompt {i}: max |ondo - transformers| = {diff:.3g} > {TOLERANCE}"


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_in_one_flat_batch(families, name):
    family = families(name)
    logits = family.driver().run(family.prompts, [[len(p)] for p in family.prompts])
    assert_logits_match(logits, family.references)


@pytest.mark.parametrize("name", FAMILIES)
def test_chunked_prefill_reads_cached_prefix(families, name):
    family = families(name)
    # Chunks end inside blocks (block_size 4) and past the sliding window; the last round mixes a
    # one-token chunk with a longer one.
    chunks = [[11, 17, 1], [3, 4], [5, 20, 15], [1]]
    logits = family.driver().run(family.prompts, chunks)
    assert_logits_match(logits, family.references)


@pytest.mark.parametrize("name", FAMILIES)
def test_decode_steps_after_prefill(families, name):
    family = families(name)
    # A short prefill, then one token per sequence per step (is_decode): sequences of different
    # lengths decode together and drop out as they finish.
    prefill = [max(1, len(p) // 4) for p in family.prompts]
    chunks = [[n] + [1] * (len(p) - n) for n, p in zip(prefill, family.prompts)]
    logits = family.driver().run(family.prompts, chunks)
    assert_logits_match(logits, family.references)


def _without_sliding_window(model):
    for module in model.modules():
        if isinstance(module, Attention):
            module.sliding_window = None


def _without_attention_softcap(model):
    for module in model.modules():
        if isinstance(module, Attention):
            module.logit_softcap = None


def _without_final_softcap(model):
    model.config.final_logit_softcapping = None


@pytest.mark.parametrize("name, switch_off", [
    ("mistral", _without_sliding_window), ("qwen2", _without_sliding_window),
    ("gemma2", _without_sliding_window), ("gemma3", _without_sliding_window),
    ("gemma2", _without_attention_softcap), ("gemma2", _without_final_softcap),
    ("gemma3", _without_final_softcap),
])
def test_the_prompts_exercise_windows_and_caps(families, name, switch_off):
    """The parity above would catch a missing sliding window or soft cap: without it, logits move."""
    family = families(name)
    model = load_ondo_model(family.folder)
    switch_off(model)
    logits = PagedDriver(model, len(family.prompts), max(PROMPT_LENGTHS)).run(
        family.prompts, [[len(p)] for p in family.prompts])
    worst = max((ours - ref).abs().max().item() for ours, ref in zip(logits, family.references))
    assert worst > 100 * TOLERANCE


def test_gpt2_loads_checkpoints_without_the_transformer_prefix(families):
    family = families("gpt2")
    bare = ((n.removeprefix("transformer."), t) for n, t in read_safetensors(family.folder))
    model = load_ondo_weights(family.folder, bare)
    expected = family.model.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
