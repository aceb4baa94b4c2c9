"""The GPU comparison in one command: ondo against transformers `generate` on random bf16 weights in the
Qwen3-0.6B and Llama-3-8B shapes, the workloads the peers were measured on:

  single   1 request, 128 prompt + 256 new tokens, greedy, EOS ignored: TTFT and decode tok/s
  ttft     1 request, 2048-token prompt: time to first token
  batch    256 requests x (512 prompt + 256 new tokens): output and total tok/s
           (transformers: padded batches of 64, as in the reference)

    python benchmarks/gpu_suite.py --output-dir bench-gpu                  # both models, about 6-8 minutes
    python benchmarks/gpu_suite.py --models qwen3-0.6b --engines ondo      # a part of it

Each (model, engine) pair runs in one child process that loads the model once and runs the three
workloads (loading random Llama-3-8B weights twice would cost minutes). Results are written per model as
soon as they exist, so a run cut short keeps what it finished. The summary table puts ondo beside
transformers and beside the reference figures of transformers measured on an H100.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import latency
import throughput

MODELS = ["qwen3-0.6b", "llama3-8b"]
# transformers on an H100 (shared/reference/README.md): single decode tok/s, batch output tok/s (bs 64).
REFERENCE_HF_H100 = {"qwen3-0.6b": (9.9, 1242), "llama3-8b": (11.3, 1124)}


def workloads(args: argparse.Namespace) -> tuple[argparse.Namespace, argparse.Namespace]:
    shared, tiny = dict(vars(args)), args.smoke    # --smoke: the same steps on small sizes, to check the script
    single = argparse.Namespace(**{**shared, "prompt_len": 16 if tiny else 128, "output_len": 16 if tiny else 256,
                                   "ttft_prompt_len": [64 if tiny else 2048]})
    batch = argparse.Namespace(**{**shared, "num_prompts": 8 if tiny else 256, "prompt_len": 32 if tiny else 512,
                                  "output_len": 16 if tiny else 256, "workload": "greedy",
                                  "hf_batch_size": 4 if tiny else 64})
    return single, batch


def run_engine(args: argparse.Namespace, engine: str) -> dict:
    spec = common.resolve_model(args.model, args.load_format)
    single, batch = workloads(args)
    started = time.perf_counter()
    runner = common.build_runner(engine, args, spec, max_model_len=args.max_model_len or common.round_up(2048 + 256),
                                 max_num_seqs=args.max_num_seqs or 256)
    print(f"[{args.model} / {engine}] loaded in {runner.load_s:.1f} s", flush=True)
    rows = latency.measure(runner, engine, single, runner.vocab_size)
    print(f"[{args.model} / {engine}] latency done at {time.perf_counter() - started:.0f} s", flush=True)
    rows += throughput.measure(runner, engine, batch, runner.vocab_size)
    print(f"[{args.model} / {engine}] throughput done at {time.perf_counter() - started:.0f} s", flush=True)
    return {"engine": engine, "rows": common.finish_rows(rows, runner), "details": runner.details,
            "env": common.environment(runner.device)}


def summary_rows(model: str, results: list[dict]) -> list[dict]:
    figures = {}
    for result in results:
        for row in result.get("rows", []):
            engine = row["engine"]
            if row.get("prompt_len") and row.get("output_tokens", 0) > 1:
                figures[("single decode tok/s", engine)] = row["decode_tok_s"]
                figures[(f"TTFT ms, {row['prompt_len']}-token prompt", engine)] = row["ttft_ms"]
            elif row.get("prompt_len"):
                figures[(f"TTFT ms, {row['prompt_len']}-token prompt", engine)] = row["ttft_ms"]
            elif "output_tok_s" in row:
                figures[("batch output tok/s", engine)] = row["output_tok_s"]
                figures[("batch total tok/s", engine)] = row["total_tok_s"]
                figures[("load s", engine)] = row["load_s"]
                figures[("peak GPU memory GiB (allocated)", engine)] = row.get("peak_gpu_alloc_gib")
    reference = dict(zip(["single decode tok/s", "batch output tok/s"], REFERENCE_HF_H100.get(model, ())))
    rows = []
    for metric in dict.fromkeys(m for m, _ in figures):
        ondo, peer = figures.get((metric, "ondo")), figures.get((metric, "transformers"))
        if ondo is None and peer is None:
            continue
        rows.append({"model": model, "metric": metric, "ondo": ondo, "transformers": peer,
                     "ondo / transformers": ondo / peer if ondo and peer else None,
                     "transformers, H100 reference": reference.get(metric)})
    return rows


def suite_parser(doc: str, output_dir: str) -> argparse.ArgumentParser:
    """The options of a script running these workloads on random bf16 weights on the GPU."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(parser)
    parser.set_defaults(load_format="dummy", dtype="bfloat16", device="cuda")
    parser.add_argument("--num-iters", type=int, default=1, help="timed iterations of every workload")
    parser.add_argument("--output-dir", default=output_dir)
    parser.add_argument("--smoke", action="store_true", help="tiny workloads: checks the script, measures nothing")
    return parser


def main() -> None:
    parser = suite_parser(__doc__, output_dir="bench-gpu")
    parser.add_argument("--models", nargs="+", default=MODELS,
                        help=f"config names (default: {' '.join(MODELS)}; tiny-llama for a --smoke check on the CPU)")
    parser.add_argument("--engines", nargs="+", default=["ondo", "transformers"], choices=["ondo", "transformers"])
    args = parser.parse_args()
    args.peer = []
    if args.child_engine:
        common.run_engines(args, [], run_engine)
    started, table = time.perf_counter(), []
    for model in args.models:
        args.model = model
        results = common.run_engines(args, args.engines, run_engine, extra_argv=("--model", model))
        path = Path(args.output_dir) / f"gpu-{model}.json"
        rows = summary_rows(model, results)
        common.write_json(str(path), {"benchmark": "gpu_suite", "model": model, "summary": rows,
                                      "results": results, "args": vars(args)})
        table += rows
        print(f"{model} finished at {time.perf_counter() - started:.0f} s", flush=True)
    title = "smoke check (tiny workloads)" if args.smoke else \
        "GPU suite (random weights; batch = 256 x (512 + 256), transformers in batches of 64)"
    common.print_table(title, table, [(k, k) for k in ("model", "metric", "ondo", "transformers", "ondo / transformers",
                                                "transformers, H100 reference")])


if __name__ == "__main__":
    main()
