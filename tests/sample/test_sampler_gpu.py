"""The sampler on CUDA: same results as on the CPU, no hidden host syncs, seeding per row."""

from __future__ import annotations

import pytest
import torch
from sample_fakes import request

from ondo.sample import Sampler, warp

pytestmark = pytest.mark.gpu  # skipped by tests/conftest.py without CUDA

VOCAB = 1000


def every_option_batch(device: str) -> list:
    """One row per option (and a plain one), with CUDA generators for the seeded rows."""
    history = dict(prompt=[1, 2, 3, 1, 2], output=[3, 1, 2, 7])
    reqs = [
        request(**history, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3),
        request(**history, no_repeat_ngram_size=2, temperature=0.7, top_k=40),
        request(**history, bad_words=[[2, 9], [5]], top_p=0.9, min_p=0.05),
        request(**history, logit_bias={4: 3.0}, allowed_token_ids=list(range(0, VOCAB, 3)),
                typical_p=0.8),
        request(**history, eos={0}, stop={6}, min_tokens=9, epsilon_cutoff=1e-4, eta_cutoff=1e-3),
        request(**history, temperature=0),
        request(**history),
    ]
    for seed, r in enumerate(reqs):
        r.generator = torch.Generator(device=device).manual_seed(seed)
    return reqs


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-4, atol=1e-4)


def test_cuda_processing_matches_cpu():
    logits = torch.randn(7, VOCAB, generator=torch.Generator().manual_seed(0)) * 4
    cpu_reqs, gpu_reqs = every_option_batch("cpu"), every_option_batch("cuda")
    sampler = Sampler()
    cpu = sampler.apply_processors(logits, cpu_reqs)
    gpu = sampler.apply_processors(logits.cuda(), gpu_reqs)
    assert_same(gpu.cpu(), cpu)
    params = [r.sampling_params for r in cpu_reqs]
    assert_same(warp(gpu, params).cpu(), warp(cpu, params))


def test_no_host_sync_before_the_final_copy():
    logits = torch.randn(7, VOCAB, device="cuda")
    reqs = every_option_batch("cuda")
    sampler = Sampler()
    sampler(logits, reqs)  # warm-up: lazy CUDA initialisation may sync once
    torch.cuda.set_sync_debug_mode("error")
    try:
        token_ids = sampler._choose(sampler.apply_processors(logits, reqs), reqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert token_ids.shape == (7,)


def test_seeded_row_is_batch_independent_on_cuda():
    def run(batch, position):
        tokens = []
        for step in range(5):
            logits = torch.randn(len(batch), VOCAB, device="cuda")
            logits[position] = torch.randn(VOCAB, generator=torch.Generator().manual_seed(step)).cuda()
            tokens.append(Sampler()(logits, batch).token_ids[position])
        return tokens

    def seeded():
        r = request(temperature=1.2, top_p=0.95)
        r.generator = torch.Generator(device="cuda").manual_seed(7)
        return r

    alone = run([seeded()], 0)
    assert run([request(temperature=0.5), request(top_k=3), seeded(), request()], 2) == alone
