"""The fused candidates kernel (ondo/sample/candidates_triton.py: division by the temperature, the
reference's stable order, top_k / top_p / min_p and the draw in one program a row) under Triton's
interpreter on the CPU, against candidates.py's PyTorch rules: the same tokens, -1 where both give the
row to the full sort. tests/sample/test_sampler_gpu.py runs the same comparison on a GPU."""
from __future__ import annotations

from tests.triton_interpreter import assert_passes_in_triton_interpreter

_INTERPRETED = r"""
import sys
import torch
sys.path.insert(0, "tests/sample")
from sample_fakes import fused_and_rule_draws, request

vocab = 5000
torch.manual_seed(0)
logits = torch.randn(8, vocab) * 3
logits[4:] = (logits[4:] * 2).round() / 2  # ties at the budgets' ends
logits[1, :5] = float("-inf")               # banned tokens
settings = [dict(top_k=50), dict(top_p=0.9), dict(temperature=0.8, top_k=50, top_p=0.95),
            dict(top_p=0.5, min_p=0.2, temperature=0.7), dict(top_k=20, min_p=0.1), dict(top_p=0.999),
            dict(temperature=1.3, top_k=5), dict(top_k=7)]
params = [request(**s).sampling_params for s in settings]
generators = [None] * 7 + [torch.Generator()]
flagged = 0
for trial in range(2):
    got, expected = fused_and_rule_draws(logits, params, generators, trial)
    assert torch.equal(got, expected), (trial, got.tolist(), expected.tolist())
    flagged += int((got == -1).sum())
assert 0 < flagged < 16, flagged   # some rows go to the full sort, most are decided here
print("ok")
"""


def test_fused_candidates_kernel_draws_what_the_torch_rules_draw():
    assert_passes_in_triton_interpreter(_INTERPRETED)
