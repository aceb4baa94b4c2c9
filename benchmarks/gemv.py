"""One-row products with dense bf16 weights (single-stream decode): ondo's Triton GEMV beside cuBLAS.

    python benchmarks/gemv.py --output-json gemv.json            # needs a CUDA GPU

Every projection of the Qwen3-0.6B and Llama-3-8B shapes and their LM heads. Each shape is timed as one
CUDA graph over as many distinct weight matrices as the model has layers (so nothing is served from
L2, and launch gaps are those of the engine's graphs); the model total adds the layers' four products
and the LM head. Bandwidth counts the weight bytes read once.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import common

SHAPES = {  # model: (layers, {projection: (N, K)}) and the LM head's (N, K)
    "qwen3-0.6b": (28, {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072),
                        "lm_head": (151936, 1024)}),
    "llama3-8b": (32, {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
                       "lm_head": (128256, 4096)}),
}
REPS = 50
COLUMNS = [("model", "model"), ("product", "product"), ("shape", "N x K"), ("cublas_us", "cuBLAS us"),
           ("ondo_us", "ondo us"), ("cublas_tb_s", "cuBLAS TB/s"), ("ondo_tb_s", "ondo TB/s"),
           ("speedup", "speed-up")]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU")
    from ondo.layers.dense_gemv import gemv

    torch.manual_seed(0)
    rows = []
    for model, (layers, shapes) in SHAPES.items():
        totals = {"cublas_us": 0.0, "ondo_us": 0.0}
        for product, (n, k) in shapes.items():
            copies = 1 if product == "lm_head" else layers
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            got, want = gemv(x, weights[0]).double(), x.double() @ weights[0].double().t()
            assert (got - want).abs().max() <= 8e-3 * want.abs().max(), (model, product)
            cublas = common.replay_seconds(common.capture_cuda_graph(lambda: [F.linear(x, w) for w in weights]), REPS) / copies
            ondo = common.replay_seconds(common.capture_cuda_graph(lambda: [gemv(x, w) for w in weights]), REPS) / copies
            nbytes = n * k * 2
            rows.append({"model": model, "product": product, "shape": f"{n} x {k}", "cublas_us": cublas * 1e6,
                         "ondo_us": ondo * 1e6, "cublas_tb_s": nbytes / cublas / 1e12, "ondo_tb_s": nbytes / ondo / 1e12,
                         "speedup": cublas / ondo})
            totals["cublas_us"] += cublas * 1e6 * copies
            totals["ondo_us"] += ondo * 1e6 * copies
            weights.clear()
            torch.cuda.empty_cache()
        rows.append({"model": model, "product": "model total", "shape": "", **totals,
                     "speedup": totals["cublas_us"] / totals["ondo_us"]})
    common.print_table("One-row bf16 products (us per product; model total: layers + LM head)", rows, COLUMNS)
    payload = {"benchmark": "gemv", "rows": rows, "args": vars(args), "environment": common.environment("cuda")}
    common.write_json(args.output_json, payload)
    return payload


if __name__ == "__main__":
    main()
