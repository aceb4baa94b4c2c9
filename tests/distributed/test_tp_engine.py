"""Tensor parallelism end to end on the CPU: `LLM(..., tensor_parallel_size=2)` runs rank 1 in a worker
process over gloo and must give what one process gives; a dead worker, a model that cannot be split
and too few GPUs end in clear errors, never a hang.

Each test builds its single-process reference before its tensor-parallel engine and shuts that
engine down before returning: the tensor-parallel rank of a process is global, so a one-rank model
must not run while this process is rank 0 of a group.
"""
from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ondo import LLM, SamplingParams
from ondo.config import ConfigError, EngineConfig
from ondo.distributed.executor import TensorParallelError, check_world
from ondo.distributed.worker import Rendezvous
from ondo.engine.model_runner import StepInput
from tests.distributed.conftest import free_port
from tests.models.tiny_models import build_tiny_model

PROMPTS = [[1, 5, 9, 30, 40, 41, 7], [1, 7, 7, 100], list(range(3, 40))]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
OPTIONS = dict(device="cpu", dtype="float32", max_model_len=128)


# Two ranks on a small machine: more threads per rank only wait on each other.
pytestmark = pytest.mark.usefixtures("one_cpu_thread")   # tests/conftest.py


def greedy_run(model: str, prompts=PROMPTS, **options) -> list:
    """[(token ids, [{token: logprob}] per step)] per prompt; the engine is shut down after."""
    llm = LLM(model, **{**OPTIONS, **options})
    try:
        outputs = llm.generate(prompts, GREEDY)
    finally:
        llm.engine.shutdown()
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
            for o in outputs]


def assert_same_generation(reference: list, ours: list, tolerance: float = 1e-4) -> None:
    for (ref_ids, ref_lps), (ids, lps) in zip(reference, ours):
        assert ids == ref_ids
        for ref_step, step in zip(ref_lps, lps):
            assert ref_step.keys() == step.keys()
            for token, logprob in ref_step.items():
                assert step[token] == pytest.approx(logprob, abs=tolerance)


def tp_versus_single(model: str, tolerance: float = 1e-4, **options) -> None:
    reference = greedy_run(model, **options)
    assert_same_generation(reference, greedy_run(model, tensor_parallel_size=2, **options), tolerance)


def packed_tolerance() -> float:
    """Log-probabilities of int4-planes weights (int4, GGUF blocks) at TP=2 against TP=1: where ondo's CPU
    int4 product rounds activations to 16-bit integers per group, an input that the shards' other sum
    order moves across a rounding boundary moves by a step (1.5e-5 of its group's largest input): 1e-3
    (measured 1.2e-4)."""
    from ondo.layers import cpu_kernels

    return 1e-3 if cpu_kernels.int4_rounds_activations() else 1e-4


# ---- the step message ------------------------------------------------------------------------------

class _NoTorchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        assert not module.startswith("torch"), f"a StepInput carries {module}.{name}"
        return super().find_class(module, name)


def test_step_input_is_plain_data(tmp_path):
    build_tiny_model("llama", tmp_path)
    llm = LLM(str(tmp_path), **OPTIONS)
    engine = llm.engine
    engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=4, prompt_logprobs=1))
    engine.add_request("b", PROMPTS[1], SamplingParams(max_tokens=4))
    step = engine.runner.prepare(engine.scheduler.schedule())
    copy = _NoTorchUnpickler(io.BytesIO(pickle.dumps(step))).load()
    assert isinstance(copy, StepInput) and copy.num_tokens == len(PROMPTS[0]) + len(PROMPTS[1])
    for name, value in vars(step).items():
        assert not isinstance(value, torch.Tensor), name
        other = getattr(copy, name)
        assert (np.array_equal(value, other) if isinstance(value, np.ndarray) else value == other), name
    assert copy.prompt_logits_rows == [(0, 0, len(PROMPTS[0]))] and copy.sample_indices == [0, 1]


# ---- errors before anything starts ---------------------------------------------------------------

def test_heads_not_divisible_is_one_line_error(tmp_path):
    build_tiny_model("llama", tmp_path)   # 4 attention heads
    with pytest.raises(ConfigError, match=r"attention heads \(4\) must be divisible by tensor_parallel_size \(3\)"):
        LLM(str(tmp_path), tensor_parallel_size=3, **OPTIONS)


def test_more_gpus_than_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="tensor_parallel_size 4 needs 4 GPUs, 1 visible"):
        check_world(Rendezvous("env://", 4), "cuda")


def test_tensor_parallel_size_is_validated():
    with pytest.raises(ConfigError, match="tensor_parallel_size must be >= 1, got 0"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ConfigError, match="with tensor_parallel_size > 1"):
        EngineConfig(tensor_parallel_size=2, device="cuda:1")


# ---- same tokens as one process ------------------------------------------------------------------

@pytest.mark.parametrize("family", [
    "llama", "qwen3", "gemma2", "gpt2",
    pytest.param("mistral", marks=pytest.mark.slow), pytest.param("qwen2", marks=pytest.mark.slow),
    pytest.param("gemma3", marks=pytest.mark.slow)])
def test_greedy_matches_single_process(family, tmp_path):
    build_tiny_model(family, tmp_path)
    tp_versus_single(str(tmp_path))


def test_steps_launched_ahead_broadcast_their_placeholder_ids(tmp_path):
    """A step launched before its input tokens reach the host (async scheduling, engine/in_flight.py; on
    where CUDA graphs run, forced here on the CPU) runs on rank 1 with the ids rank 0 broadcasts: the
    same tokens as one process."""
    build_tiny_model("llama", tmp_path)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def run(**options) -> tuple[list, int]:
        llm = LLM(str(tmp_path), **OPTIONS, **options, async_scheduling=True)
        try:
            outputs = llm.generate(PROMPTS, params)
        finally:
            llm.engine.shutdown()
        return [o.outputs[0].token_ids for o in outputs], llm.engine.num_steps_launched_ahead

    reference, _ = run()
    tokens, launched_ahead = run(tensor_parallel_size=2)
    assert tokens == reference
    assert launched_ahead >= 11   # every step after the first


@pytest.mark.slow
def test_gguf_file(tmp_path):
    from tests.loader.test_gguf_synthetic import FAMILIES, write_gguf
    from transformers import AutoModelForCausalLM

    config, arch = FAMILIES["llama"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    path = tmp_path / "llama.gguf"
    write_gguf(path, model, arch, quantize={"blk.0.ffn_up.weight", "blk.1.attn_q.weight"})
    tp_versus_single(str(path), packed_tolerance())


@pytest.mark.slow
def test_int4_quantized_folder(tmp_path):
    build_tiny_model("qwen3", tmp_path)
    tp_versus_single(str(tmp_path), packed_tolerance(), quantization="int4")


# ---- several nodes ---------------------------------------------------------------------------------

def test_two_nodes_through_env_rendezvous(tmp_path, monkeypatch):
    """Node 0 is this process (rank 0); node 1 is `python -m ondo.distributed.worker` started on its own,
    as another machine would start it; they meet at MASTER_ADDR:MASTER_PORT."""
    build_tiny_model("llama", tmp_path)
    reference = greedy_run(str(tmp_path))
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "ONDO_NNODES": "2"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    node1 = subprocess.Popen([sys.executable, "-m", "ondo.distributed.worker", "--tensor-parallel-size", "2",
                              "--nnodes", "2", "--node-rank", "1", "--device", "cpu"], env={**os.environ, **env})
    try:
        assert_same_generation(reference, greedy_run(str(tmp_path), tensor_parallel_size=2))
        assert node1.wait(timeout=30) == 0   # rank 0's stop message ends node 1's rank
    finally:
        if node1.poll() is None:
            node1.kill()


# ---- a worker that dies ------------------------------------------------------------------------------

def test_dead_worker_is_a_clear_error(tmp_path, monkeypatch):
    """Through the shared-memory channel (the one GPUs use), which the other tests leave to gloo."""
    monkeypatch.setenv("ONDO_TP_CHANNEL", "shm")
    build_tiny_model("llama", tmp_path)
    llm = LLM(str(tmp_path), tensor_parallel_size=2, **OPTIONS)
    executor = llm.engine.executor
    try:
        assert llm.generate(PROMPTS[:1], GREEDY)[0].outputs[0].token_ids
        worker = executor.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"worker rank 1 \(pid \d+\) died \(killed by signal 9\)"):
            llm.generate(PROMPTS[:1], GREEDY)
        assert time.monotonic() - start < 10
    finally:
        llm.engine.shutdown()
    assert all(p.poll() is not None for p in executor.processes)
