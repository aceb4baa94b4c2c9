"""benchmarks/serving.py end to end on the built-in model and the CPU: it launches `ondo serve`, streams a
tiny workload through it, runs the same requests through LLM.generate, and writes figures that add up."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serving.py"
NUM_REQUESTS, MAX_TOKENS, PROMPT_LEN = 4, 8, 16


def run_benchmark(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    output = tmp_path / "serving.json"
    command = [sys.executable, str(SCRIPT), "--launch-server", "--offline", "--device", "cpu",
               "--num-requests", str(NUM_REQUESTS), "--max-tokens", str(MAX_TOKENS),
               "--prompt-len", str(PROMPT_LEN), "--concurrency", "2", "--warmup", "1",
               "--max-num-seqs", "4", "--max-model-len", "256", "--goodput", "ttft:600000", "itl:600000",
               "--output-json", str(output), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(output.read_text())


@pytest.mark.slow
def test_launched_server_and_offline_run_report_the_same_workload(tmp_path):
    done, record = run_benchmark(tmp_path)
    server, offline = record["server"], record["offline"]

    assert server["requests"] == server["completed"] == server["complete_length"] == NUM_REQUESTS
    assert server["failed"] == 0 and server["errors"] == []
    assert server["output_tokens"] == offline["output_tokens"] == NUM_REQUESTS * MAX_TOKENS
    assert server["prompt_tokens"] == offline["prompt_tokens"] == NUM_REQUESTS * PROMPT_LEN
    assert offline["complete_length"] == NUM_REQUESTS
    for figures in (server, offline):
        assert figures["elapsed_s"] > 0 and figures["output_tokens_per_s"] > 0 and figures["requests_per_s"] > 0
    assert math.isclose(record["server_over_offline_output_tok_s"],
                        server["output_tokens_per_s"] / offline["output_tokens_per_s"], rel_tol=0.01)
    assert "server / offline output tok/s" in done.stdout

    for name in ("ttft", "itl", "e2e"):
        p50, p90, p99 = (server[name][f"p{q}_ms"] for q in (50, 90, 99))
        assert 0 < p50 <= p90 <= p99
    assert server["ttft"]["p99_ms"] <= server["e2e"]["p99_ms"]
    # Generous targets: every request meets them, so goodput equals the throughput.
    assert server["goodput"]["requests"] == NUM_REQUESTS
    assert server["goodput"]["output_tokens_per_s"] == server["output_tokens_per_s"]

    requests = record["per_request"]
    assert len(requests) == NUM_REQUESTS
    for request in requests:
        assert request["complete"] and request["output_tokens"] == request["expected_output_tokens"] == MAX_TOKENS
        assert request["chunks"] > 1          # the built-in model has a tokenizer: it streams token by token
        assert request["streamed_token_ids"] == MAX_TOKENS   # return_token_ids: every token listed once
        assert 0 < request["ttft_s"] <= request["last_token_s"] <= request["e2e_s"]

    assert record["engine_options"] == {"device": "cpu", "max_num_seqs": 4, "max_model_len": 256}
    assert "--max-num-seqs" in record["server_command"] and record["settings"]["concurrency"] == 2


def test_bad_options_are_refused_with_the_flag_named():
    for argv, message in ((["--goodput", "ttfb:100"], "--goodput takes ttft:MS"),
                          (["--request-rate", "0"], "--request-rate must be > 0"),
                          (["--input-range", "50", "10"], "--input-range must be 1 <= MIN <= MAX"),
                          (["--launch-server", "--url", "http://x"], "not both")):
        done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr, done.stderr


@pytest.fixture(scope="module")
def serving():
    """benchmarks/serving.py as a module. It imports its neighbour `common.py`, and another `common`
    (examples/common.py, imported by tests/examples) may already sit in sys.modules: swap it out."""
    import importlib.util

    others = {name: sys.modules.pop(name) for name in ("common",) if name in sys.modules}
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("serving_benchmark", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["serving_benchmark"] = module   # dataclasses look their module up while being built
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
        sys.modules.pop("common", None)
        sys.modules.update(others)
    return module


@pytest.mark.parametrize("dataset", ["random", "sharegpt-like"])
def test_datasets_draw_seeded_lengths_within_the_ranges(serving, dataset):
    args = serving.parse_args(["--dataset", dataset, "--num-requests", "400"])
    items = serving.build_workload(args, 400, seed=3)
    assert items == serving.build_workload(args, 400, seed=3)
    assert all(16 <= i.prompt_len <= 1024 and len(i.prompt) == i.prompt_len for i in items)
    assert all(16 <= i.output_len <= 512 for i in items)
    assert all(100 <= t < 1000 for i in items for t in i.prompt)
    median_output = sorted(i.output_len for i in items)[200]
    # Uniform lengths centre on the middle of the range; log-uniform ones on its geometric middle (~91).
    assert (200 < median_output < 330) if dataset == "random" else (60 < median_output < 130)


def test_word_prompts_and_the_fixed_dataset(serving):
    args = serving.parse_args(["--prompt-format", "words", "--prompt-len", "12", "--max-tokens", "5"])
    items = serving.build_workload(args, 3, seed=0)
    assert [(len(i.prompt.split()), i.output_len) for i in items] == [(12, 5)] * 3


def test_poisson_arrivals_have_the_asked_rate(serving):
    times = serving.arrival_times(2000, rate=50.0, seed=1)
    assert times[0] == 0 and all(a <= b for a, b in zip(times, times[1:]))
    assert 0.9 < (len(times) - 1) / times[-1] / 50.0 < 1.1
    assert serving.arrival_times(5, rate=math.inf, seed=1) == [0.0] * 5
