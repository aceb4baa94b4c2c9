"""The int4 matrix kernels against bfloat16 on the Llama-3-8B layer shapes, per batch size.

    python benchmarks/int4_kernel.py --output-json int4.json           # GPU: Triton tiles vs cuBLAS bf16
    python benchmarks/int4_kernel.py --device cpu --threads 2           # CPU: torch's int4 kernel vs bf16

For each batch size M: the time of one token's matrix products of a whole layer stack (qkv, o, gate_up,
down per layer) through (a) the fused int4 kernel, (b) dequantize + dense GEMM, the path larger batches
take, and (c) dense bfloat16; and the weight bytes each reads per call. On a GPU every layer has its
own matrices (so nothing is served from L2) and the stack is timed as one CUDA graph.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import common

SHAPES = {  # (out, in) per layer; layer count
    "llama3-8b": ([(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)], 32),
    "smollm2-135m": ([(960, 576), (576, 576), (3072, 576), (576, 1536)], 30),
}


def timed(fn, device: str, reps: int) -> float:
    """Seconds per call: on a GPU per replay of a CUDA graph of fn (common.replay_seconds)."""
    for _ in range(3):
        fn()
    if device == "cuda":
        return common.replay_seconds(common.capture_cuda_graph(fn), reps)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-sizes", default="1,4,16,64,128,256")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from ondo.layers.linear import Linear, linear_method_scope
    from ondo.layers.quantization.int4 import Int4Method
    from ondo.layers.quantization import int4_planes

    shapes, layers = SHAPES[args.model]
    torch.set_default_dtype(torch.bfloat16)
    copies = layers if args.device == "cuda" else 1     # the CPU times one layer's set, times the count
    with torch.device(args.device):
        dense = [Linear(k, n) for _ in range(copies) for n, k in shapes]
        with linear_method_scope(lambda layer: Int4Method()):
            packed = [Linear(k, n) for _ in range(copies) for n, k in shapes]
    for d, p in zip(dense, packed):
        d.weight.data.normal_(0, 0.02)
        p.load("weight", d.weight.data.float())
        p.finish_loading()
    rows = []
    reps = 20 if args.device == "cuda" else 5
    for m in [int(v) for v in args.batch_sizes.split(",")]:
        xs = {k: torch.randn(m, k, device=args.device) for _, k in shapes}
        repeat = layers // copies
        # The kernel limits, forced each way: the fused kernel for every batch, then dequantize + GEMM.
        limits = [(int4_planes, "CPU_KERNEL_MAX_TOKENS")]
        if args.device == "cuda":                      # Triton only where a GPU runs
            from ondo.layers.quantization import int4_gpu_kernels

            limits.append((int4_gpu_kernels, "FUSED_MAX_TOKENS"))
        saved = [getattr(module, name) for module, name in limits]
        for module, name in limits:
            setattr(module, name, 1 << 20)
        t_kernel = timed(lambda: [p(xs[p.in_features]) for p in packed], args.device, reps) * repeat
        for module, name in limits:
            setattr(module, name, 0)
        t_dequant = timed(lambda: [p(xs[p.in_features]) for p in packed], args.device, reps) * repeat
        for (module, name), value in zip(limits, saved):
            setattr(module, name, value)
        t_dense = timed(lambda: [d(xs[d.in_features]) for d in dense], args.device, reps) * repeat
        int4_bytes = sum(p.qweight.nbytes + p.scales_and_zeros.nbytes for p in packed) * repeat
        dense_bytes = sum(d.weight.nbytes for d in dense) * repeat
        rows.append({"M": m, "int4_kernel_ms": t_kernel * 1e3, "int4_dequant_gemm_ms": t_dequant * 1e3,
                     "bf16_ms": t_dense * 1e3, "int4_GBps": int4_bytes / t_kernel / 1e9,
                     "bf16_GBps": dense_bytes / t_dense / 1e9, "speedup_vs_bf16": t_dense / min(t_kernel, t_dequant)})
    print(f"{args.model} layer stack, {args.device}: int4 weights {int4_bytes / 1e9:.2f} GB, bf16 {dense_bytes / 1e9:.2f} GB")
    print(f"{'M':>5} {'int4 kernel ms':>15} {'dequant+GEMM ms':>16} {'bf16 ms':>9} {'int4 GB/s':>10} {'bf16 GB/s':>10} {'best/bf16':>9}")
    for r in rows:
        print(f"{r['M']:>5} {r['int4_kernel_ms']:>15.3f} {r['int4_dequant_gemm_ms']:>16.3f} {r['bf16_ms']:>9.3f} "
              f"{r['int4_GBps']:>10.0f} {r['bf16_GBps']:>10.0f} {r['speedup_vs_bf16']:>8.2f}x")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"model": args.model, "device": args.device, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
