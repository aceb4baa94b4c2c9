"""Tensor parallelism side by side: the same model at several `tensor_parallel_size`s in one run, on random
bf16 weights, with the workloads of gpu_suite.py (single stream 128 + 256, 2048-token TTFT, 256 x (512 + 256)).

    python benchmarks/tensor_parallel.py --models llama3-8b --tp-sizes 1 2 --output-dir bench-tp
    python benchmarks/tensor_parallel.py --models llama3-70b --tp-sizes 2       # 140 GB: does not fit one H200

Each (model, size) loads once in its own child process; the table puts every size beside the first one.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import gpu_suite


def size_figures(result: dict) -> dict[str, float]:
    """metric -> value for one child's rows (the metric names of gpu_suite's summary)."""
    return {row["metric"]: row["ondo"] for row in gpu_suite.summary_rows("", [result]) if row["ondo"] is not None}


def main() -> None:
    parser = gpu_suite.suite_parser(__doc__, output_dir="bench-tp")
    parser.add_argument("--models", nargs="+", default=["llama3-8b"])
    parser.add_argument("--tp-sizes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help=argparse.SUPPRESS)   # set per child
    args = parser.parse_args()
    args.peer = []
    if args.child_engine:
        common.run_engines(args, [], gpu_suite.run_engine)
    started, table = time.perf_counter(), []
    for model in args.models:
        args.model = model
        by_size = {}
        for size in args.tp_sizes:
            [result] = common.run_engines(args, ["ondo"], gpu_suite.run_engine,
                                          extra_argv=("--model", model, "--tensor-parallel-size", str(size)))
            by_size[size] = result
            print(f"{model} TP={size} finished at {time.perf_counter() - started:.0f} s", flush=True)
        figures = {size: size_figures(result) for size, result in by_size.items()}
        first = args.tp_sizes[0]
        for metric in dict.fromkeys(m for f in figures.values() for m in f):
            row = {"model": model, "metric": metric}
            for size in args.tp_sizes:
                value = figures[size].get(metric)
                row[f"TP={size}"] = value
                if size != first and value and figures[first].get(metric):
                    row[f"TP={size} / TP={first}"] = value / figures[first][metric]
            table.append(row)
        common.write_json(str(Path(args.output_dir) / f"tp-{model}.json"),
                          {"benchmark": "tensor_parallel", "model": model, "summary": [r for r in table if r["model"] == model],
                           "results": {str(k): v for k, v in by_size.items()}, "args": vars(args)})
    sizes = args.tp_sizes
    columns = [("model", "model"), ("metric", "metric")] + [(f"TP={s}", f"TP={s}") for s in sizes]
    columns += [(f"TP={s} / TP={sizes[0]}", f"TP={s} / TP={sizes[0]}") for s in sizes[1:]]
    common.print_table("tensor parallelism (random bf16 weights)", table, columns)


if __name__ == "__main__":
    main()
