"""The Triton multi-LoRA kernels against the per-token reference, inside a CUDA graph, and an engine
with adapters under CUDA graphs against transformers + PEFT."""
from __future__ import annotations

import pytest
import torch

from ondo.lora.layers import add_lora_reference, token_spans

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _random_pool(loras: int, width: int, k: int, n: int, dtype, seed: int):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(loras, width, k, device="cuda", dtype=dtype, generator=generator) * 0.05   # [L, R, K]
    b = torch.randn(loras, n, width, device="cuda", dtype=dtype, generator=generator) * 0.05  # [L, N, R]
    return a, b


def _groups(slots: list[int], loras: int):
    from ondo.lora.triton_ops import TokenGroups

    groups = TokenGroups(loras, 512, torch.device("cuda"))
    groups.write(token_spans(slots, [1] * len(slots)))
    return groups


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,k,n,width", [(1, 4096, 6144, 48), (7, 4096, 28672, 32), (64, 14336, 4096, 16),
                                              (300, 200, 130, 24)])
def test_kernel_matches_reference(dtype, tokens, k, n, width):
    from ondo.lora.triton_ops import add_lora

    a, b = _random_pool(4, width, k, n, dtype, seed=tokens)
    x = torch.randn(tokens, k, device="cuda", dtype=dtype)
    out = torch.randn(tokens, n, device="cuda", dtype=dtype)
    slots = torch.randint(-1, 4, (tokens,), generator=torch.Generator().manual_seed(tokens)).tolist()
    expected = add_lora_reference(x, a, b, slots, out)
    result = add_lora(x, a, b, _groups(slots, 4), out.clone()).float()
    torch.testing.assert_close(result, expected, rtol=2e-2, atol=2e-2)
    untouched = torch.tensor(slots, device="cuda") == -1
    assert torch.equal(result[untouched], out.float()[untouched])   # slot -1 adds nothing


def test_kernel_replays_in_a_cuda_graph_with_new_groups():
    from ondo.lora.triton_ops import add_lora

    a, b = _random_pool(3, 16, 512, 384, torch.bfloat16, seed=0)
    x = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    base = torch.randn(8, 384, device="cuda", dtype=torch.bfloat16)
    groups = _groups([-1] * 8, 3)
    out = base.clone()
    add_lora(x, a, b, groups, out)   # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(base)
        add_lora(x, a, b, groups, out)
    for pattern in ([0, 1, 2, -1, 0, 1, 2, -1], [2, 2, 2, 2, -1, -1, 1, 0], [1, -1, -1, -1, -1, -1, -1, -1]):
        groups.write(token_spans(pattern, [1] * len(pattern)))
        graph.replay()
        torch.testing.assert_close(out.float(), add_lora_reference(x, a, b, pattern, base), rtol=2e-2, atol=2e-2)


def test_engine_with_adapters_under_cuda_graphs_matches_peft(tmp_path):
    from ondo import LLM, LoRARequest, SamplingParams
    from tests.lora.adapters import base_and_adapters

    base, adapters = base_and_adapters(tmp_path, "llama", count=2)
    loras = [LoRARequest(f"a{i}", i + 1, str(folder)) for i, (folder, _) in enumerate(adapters)]
    llm = LLM(str(base), dtype="bfloat16", enable_lora=True, max_num_seqs=8)
    graphs = llm.engine.runner.cuda_graphs
    assert graphs is not None and {variant for variant, _ in graphs.graphs} == {"base", "lora"}
    replayed = []
    graphs.run = _recording(graphs.run, replayed)
    prompt = [5, 9, 33, 7, 12, 40, 3]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    outputs = llm.generate([prompt] * 3, params, lora_request=[loras[0], None, loras[1]])
    assert replayed and set(replayed) == {"lora"}
    before = len(replayed)
    llm.generate([prompt], params)
    assert len(replayed) > before and set(replayed[before:]) == {"base"}   # no adapter: no LoRA kernels
    for output, (_, peft_model) in zip((outputs[0], outputs[2]), adapters):
        peft_model = peft_model.to("cuda")
        with torch.no_grad():
            ids = list(prompt)
            for step, token in enumerate(output.outputs[0].token_ids):
                logits = peft_model(torch.tensor([ids], device="cuda")).logits[0, -1].float()
                logprobs = torch.log_softmax(logits, -1)
                # bf16 against float32 (on an H200 the log-probs differ by ~0.1): the chosen token is
                # (near) the reference's best, and its log-prob close to the reference's.
                assert float(logprobs.max() - logprobs[token]) < 0.3
                assert output.outputs[0].logprobs[step][token].logprob == pytest.approx(float(logprobs[token]), abs=0.3)
                ids.append(token)


def _recording(run, replayed: list[str]):
    def recorded(*args, **kwargs):
        replayed.append(kwargs.get("variant", ""))
        return run(*args, **kwargs)
    return recorded
