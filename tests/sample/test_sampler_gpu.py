"""The sampler on CUDA: same results as on the CPU, no hidden host syncs, seeding per row."""

from __future__ import annotations

import pytest
import torch
from sample_fakes import fused_and_rule_draws, request

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


def test_a_tiny_repetition_penalty_stays_finite_as_on_the_cpu():
    # The Triton penalty kernel must clamp an overflow to the largest float32, as the torch path does.
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1)) * 4
    logits[0, 3], logits[0, 2] = float("-inf"), 5.0   # 5 / 1.2e-38 overflows float32
    reqs = [request(prompt=[1, 2, 3, 5], output=[7], repetition_penalty=1.2e-38),
            request(prompt=[1], output=[], repetition_penalty=1.3)]
    cpu = Sampler().apply_processors(logits, reqs)
    gpu = Sampler().apply_processors(logits.cuda(), reqs).cpu()
    assert torch.equal(gpu, cpu)
    assert cpu[0].max() == torch.finfo(torch.float32).max and not cpu.isnan().any() and torch.isneginf(cpu[0, 3])


def test_no_host_sync_before_the_final_copy():
    logits = torch.randn(7, VOCAB, device="cuda")
    reqs = every_option_batch("cuda")
    sampler = Sampler()
    sampler(logits, reqs)  # warm-up: lazy CUDA initialisation may sync once
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample = sampler.sample_on_device(logits, reqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sample.token_ids.shape == (7,)


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


def fast_path_batch(device: str) -> list:
    """Rows that take the candidates' fast path with device-side penalties, one seeded."""
    reqs = [request(prompt=list(range(100, 612)), output=[5, 6, 5], temperature=0.8, top_p=0.95, top_k=50,
                    repetition_penalty=1.1),
            request(prompt=[1, 2, 3], top_p=0.9, presence_penalty=0.5, frequency_penalty=0.2),
            request(top_k=20, min_p=0.05, temperature=1.3),
            request(temperature=0)]
    reqs[0].generator = torch.Generator(device=device).manual_seed(3)
    return reqs


def test_fast_path_matches_cpu_and_never_syncs():
    from ondo.sample.candidates import candidate_budget, keep_mask, select_candidates

    vocab = 32_000
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(1)) * 3
    cpu_reqs, gpu_reqs = fast_path_batch("cpu"), fast_path_batch("cuda")
    sampler = Sampler()
    cpu = sampler.apply_processors(logits, cpu_reqs)
    gpu = sampler.apply_processors(logits.cuda(), gpu_reqs)
    assert_same(gpu.cpu(), cpu)
    params = [r.sampling_params for r in cpu_reqs[:3]]
    budgets = [candidate_budget(p, vocab) for p in params]
    on_cpu = select_candidates(cpu[:3], params, budgets)
    on_gpu = select_candidates(gpu[:3], params, budgets)
    decided = ~on_cpu.needs_full_sort
    assert decided.any()
    assert torch.equal(on_gpu.needs_full_sort.cpu(), on_cpu.needs_full_sort)
    assert_same(keep_mask(on_gpu, vocab).cpu()[decided], keep_mask(on_cpu, vocab)[decided])

    on_device = logits.cuda()
    sampler(on_device, gpu_reqs)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        processed = sampler.apply_processors(on_device, gpu_reqs)
        ahead = sampler.sample_on_device(on_device, gpu_reqs).token_ids
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert processed.shape == (4, vocab) and ahead.shape == (4,)


def test_fast_seeded_row_is_batch_independent_on_cuda():
    vocab = 32_000

    def run(batch, position):
        tokens, sampler = [], Sampler()
        for step in range(5):
            logits = torch.randn(len(batch), vocab, device="cuda")
            logits[position] = torch.randn(vocab, generator=torch.Generator().manual_seed(step)).cuda() * 4
            tokens.append(sampler(logits, batch).token_ids[position])
        return tokens

    def seeded():
        r = request(temperature=0.8, top_p=0.95, top_k=50, repetition_penalty=1.1)
        r.generator = torch.Generator(device="cuda").manual_seed(7)
        return r

    alone = run([seeded()], 0)
    assert run([request(temperature=0.5), request(top_k=3), seeded(), request(top_p=0.9), request()], 2) == alone


def test_fused_kernel_draws_what_the_torch_rules_draw():
    vocab = 32_000
    logits = torch.randn(12, vocab, device="cuda") * 3
    logits[6:] = (logits[6:] * 2).round() / 2  # ties at the boundaries
    settings = [dict(top_k=50), dict(top_p=0.9), dict(temperature=0.8, top_k=50, top_p=0.95),
                dict(top_p=0.5, min_p=0.2), dict(top_k=20, min_p=0.1), dict(top_p=0.999)] * 2
    params = [request(**s).sampling_params for s in settings]
    generators = [None] * 11 + [torch.Generator(device="cuda")]
    for trial in range(5):
        fused, by_rules = fused_and_rule_draws(logits, params, generators, trial)
        assert torch.equal(fused, by_rules)


def test_fused_penalties_match_the_processors_and_add_each_rows_new_token():
    from ondo.sample import logits_processors as lp
    from ondo.sample.penalties_triton import apply_penalties
    from ondo.sample.penalty_state import PenaltySlots

    rows, vocab = 5, 151_936
    x = torch.randn(rows, vocab, device="cuda") * 3
    x[0, :100] = float("-inf")
    seen = torch.rand(8, vocab, device="cuda") < 0.05   # the buffers hold more slots than the batch
    counts = torch.randint(0, 4, (8, vocab), device="cuda").float()
    slots = torch.tensor([6, 0, 3, 5, 1], device="cuda")
    new_tokens = torch.tensor([7, -1, vocab - 1, 2048, 0], device="cuda")  # block edges; -1 adds nothing
    values = torch.tensor([[1.3, 0.5, 0.2], [1.0, 0.0, 0.0], [0.7, -1.0, 0.3], [1.1, 0.0, 0.0],
                           [2.0, 1.5, 1.0]], device="cuda")
    want_seen, want_counts = seen.clone(), counts.clone()
    added = new_tokens >= 0
    want_seen[slots[added], new_tokens[added]] = True
    want_counts[slots[added], new_tokens[added]] += 1
    expected = lp.apply_presence_frequency(lp.apply_repetition_penalty(x, want_seen[slots], values[:, 0]),
                                           want_counts[slots], values[:, 1], values[:, 2])
    assert_same(apply_penalties(x, PenaltySlots(seen, counts, slots, new_tokens), values), expected)
    assert torch.equal(seen, want_seen) and torch.equal(counts, want_counts)   # added in place, once
    nothing = torch.full_like(new_tokens, -1)
    assert torch.equal(apply_penalties(x, PenaltySlots(seen, None, slots, nothing), values),
                       lp.apply_repetition_penalty(x, want_seen[slots], values[:, 0]))
    assert torch.equal(seen, want_seen)


def test_graphed_topk_equals_topk_and_reads_each_calls_logits():
    from ondo.sample.graphed_topk import MAX_GRAPHED_ROWS, GraphedTopK

    topk = GraphedTopK()
    generator = torch.Generator(device="cuda").manual_seed(3)
    for rows in (1, 3, MAX_GRAPHED_ROWS + 1):
        for step in range(3):  # the same shape again: the graph replays on the new logits
            logits = (torch.randn(rows, 151936, device="cuda", generator=generator) * 3).bfloat16().float()
            values, ids = topk(logits, 128)
            want_values, _ = logits.topk(128, dim=-1, sorted=False)
            assert torch.equal(values.sort(-1).values, want_values.sort(-1).values)
            assert torch.equal(logits.gather(1, ids), values)  # ids point at their values
    assert len(topk._captured) == 2  # the rows past MAX_GRAPHED_ROWS stay eager


def test_fast_launch_reuses_each_compiled_kernel_and_tells_alignments_apart():
    from ondo.sample import logits_processors as lp
    from ondo.sample.penalties_triton import _launch_penalties, apply_penalties
    from ondo.sample.penalty_state import PenaltySlots

    rows, vocab = 3, 5000
    seen = torch.zeros(rows, vocab, dtype=torch.bool, device="cuda")
    slots, values = torch.arange(rows, device="cuda"), torch.tensor([[1.5, 0.0, 0.0]] * rows, device="cuda")
    compiled_before = len(_launch_penalties._compiled)
    for trial in range(4):
        storage = torch.randn(rows * vocab + 1, device="cuda") * 3
        # the last trial's logits start 4 bytes into their storage: Triton compiles them apart
        x = storage[1:].view(rows, vocab) if trial == 3 else storage[:-1].view(rows, vocab)
        new_tokens = torch.tensor([trial, -1, vocab - 1 - trial], device="cuda")
        want = seen.clone()
        want[slots[[0, 2]], new_tokens[[0, 2]]] = True
        expected = lp.apply_repetition_penalty(x, want, values[:, 0])
        assert torch.equal(apply_penalties(x, PenaltySlots(seen, None, slots, new_tokens), values), expected)
        assert torch.equal(seen, want)
    assert _launch_penalties.enabled and len(_launch_penalties._runners) >= 1
    assert len(_launch_penalties._compiled) - compiled_before in (1, 2)   # 2 unless another test compiled one
