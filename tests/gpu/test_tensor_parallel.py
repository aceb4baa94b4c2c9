"""Tensor parallelism on two GPUs: TP=2 (NCCL, CUDA graphs with the all-reduces inside) against TP=1
in bfloat16 on a Qwen3-shaped random model. Reductions split over two ranks round differently, so a
token may differ where the model hesitates: the first 16 tokens must match, and a mismatch is only
allowed where TP=1's top-2 log-probabilities were within 0.05 of each other."""
from __future__ import annotations

import gc
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ondo import LLM, SamplingParams
from ondo.distributed import parallel_state

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

NUM_TOKENS = 16
NEAR_TIE = 0.05


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    from transformers import AutoModelForCausalLM, Qwen3Config

    path = tmp_path_factory.mktemp("qwen3-tp")
    config = Qwen3Config(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=64, vocab_size=4096, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():   # spread logits, so that most steps are no near tie
            param.normal_(0, 0.08)
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def generate(folder, prompts, logprobs=2, **options):
    """The completions, and how many steps were launched before the previous step's tokens were read:
    none with logprobs, which the host must see before the next step."""
    llm = LLM(str(folder), dtype="bfloat16", max_model_len=512, kv_cache_memory_bytes=1 << 30, max_num_seqs=32,
              **options)
    try:
        params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True, logprobs=logprobs)
        outputs = [o.outputs[0] for o in llm.generate(prompts, params)]
        return outputs, llm.engine.num_steps_launched_ahead
    finally:
        llm.engine.shutdown()
        del llm
        gc.collect()   # the engine holds reference cycles: free its KV cache before the next one
        torch.cuda.empty_cache()


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
def test_tp2_matches_tp1(qwen3_folder, enforce_eager):
    generator = torch.Generator().manual_seed(1)
    # 20 prompts: several decode graph buckets; lengths that chunk and that do not.
    prompts = [torch.randint(3, 4096, (int(n),), generator=generator).tolist()
               for n in torch.randint(4, 300, (20,), generator=generator)]
    single, _ = generate(qwen3_folder, prompts, enforce_eager=enforce_eager)
    # Without logprobs steps are launched ahead, their placeholder ids broadcast from rank 0.
    split, adopted = generate(qwen3_folder, prompts, logprobs=None, enforce_eager=enforce_eager, tensor_parallel_size=2)
    assert adopted > 0 or enforce_eager
    for ref, ours in zip(single, split):
        for step, (expected, got) in enumerate(zip(ref.token_ids, ours.token_ids)):
            if expected != got:
                top2 = sorted((lp.logprob for lp in ref.logprobs[step].values()), reverse=True)[:2]
                assert len(top2) == 2 and top2[0] - top2[1] < NEAR_TIE, \
                    f"token {step} differs ({expected} vs {got}) with a top-2 gap of {top2[0] - top2[1]:.3f}"
                break   # after a near tie the continuations may part; what follows is not comparable


def test_tp2_stops_promptly_after_a_step_launched_ahead(qwen3_folder):
    """The last step launched ahead is never sampled but still runs on every rank: each rank waits
    for it, destroys its CUDA graphs (which hold NCCL kernels: with them alive, NCCL's abort blocked
    for over 10 s), then aborts its group (docs/distributed.md). This module's tests run one TP=2
    engine after another in one process: each joins a new group after the last one left."""
    llm = LLM(str(qwen3_folder), dtype="bfloat16", max_model_len=512, kv_cache_memory_bytes=1 << 30,
              max_num_seqs=32, tensor_parallel_size=2)
    llm.generate([[5, 6, 7]] * 8, SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True))
    assert llm.engine.num_steps_launched_ahead > 0
    workers = llm.engine.executor.processes
    started = time.perf_counter()
    llm.engine.shutdown()
    took = time.perf_counter() - started
    assert took < 5, f"shutdown took {took:.1f} s"   # a blocked abort is given up only after 10 s
    assert [w.returncode for w in workers] == [0] * len(workers)
    del llm
    gc.collect()
    torch.cuda.empty_cache()


# ---- the symmetric-memory all-reduce ----------------------------------------------------------------

def _symmetric_against_nccl(rank: int, port: int) -> None:
    os.environ["ONDO_SYMMETRIC_ALL_REDUCE"] = "1"
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, device_id=device)
    parallel_state.init_tensor_parallel(dist.group.WORLD, rank, 2)
    try:
        assert parallel_state.enable_symmetric_all_reduce(device, torch.bfloat16)
        symmetric = parallel_state._symmetric
        # one token, a decode batch, a prefill chunk that fills the buffer, and one too big for it (NCCL)
        for shape in [(1, 4096), (256, 4096), (2048, 4096), (4096, 4096)]:
            x = torch.randn(shape, dtype=torch.bfloat16, device=device,
                            generator=torch.Generator(device).manual_seed(rank * 100 + shape[0]))
            expected = x.clone()
            dist.all_reduce(expected)
            assert symmetric.fits(x) == (x.numel() * 2 <= symmetric.MAX_BYTES)
            assert torch.equal(parallel_state.all_reduce(x.clone()), expected), shape   # a + b, rounded once
        # inside a CUDA graph, as the decode graphs run it, replayed on new values
        static = torch.zeros(8, 4096, dtype=torch.bfloat16, device=device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            parallel_state.all_reduce(static * 2)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = parallel_state.all_reduce(static * 2)
        for value in (1.0, 3.0):
            static.fill_(value * (rank + 1))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.all(out == 2 * value * 3), value
    finally:
        parallel_state.init_tensor_parallel(None, 0, 1)
        dist.destroy_process_group()


def test_symmetric_all_reduce_equals_nccl():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_symmetric_against_nccl, args=(port,), nprocs=2, join=True)
