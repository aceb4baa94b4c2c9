"""The int4 (or int8) matrix kernels against bfloat16 on the Llama-3-8B layer shapes, per batch size.

    python benchmarks/int4_kernel.py --output-json int4.json           # GPU: Triton tiles vs cuBLAS bf16
    python benchmarks/int4_kernel.py --device cpu --threads 2           # CPU: torch's int4 kernel vs bf16
    python benchmarks/int4_kernel.py --method int8                      # GPU: the int8 kernels (+ 128x128 tiles)
    python benchmarks/int4_kernel.py --gemv-sweep                       # GPU: one-row int4 GEMVs, widths and K splits

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
    parser.add_argument("--method", default="int4", choices=["int4", "int8"])
    parser.add_argument("--gemv-sweep", action="store_true",
                        help="time the one-row int4 GEMVs (float and integer) of each shape (all layers) per width and K split, and stop")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from ondo.layers.linear import Linear, linear_method_scope
    from ondo.layers.quantization import int4_planes
    from ondo.layers.quantization.int4 import Int4Method
    from ondo.layers.quantization.int8 import Int8Method

    shapes, layers = SHAPES[args.model]
    torch.set_default_dtype(torch.bfloat16)
    copies = layers if args.device == "cuda" else 1     # the CPU times one layer's set, times the count
    method = Int4Method if args.method == "int4" else Int8Method
    with torch.device(args.device):
        dense = [Linear(k, n) for _ in range(copies) for n, k in shapes]
        with linear_method_scope(lambda layer: method()):
            packed = [Linear(k, n) for _ in range(copies) for n, k in shapes]
    for d, p in zip(dense, packed):
        d.weight.data.normal_(0, 0.02)
        p.load("weight", d.weight.data.float())
        p.finish_loading()
    if args.gemv_sweep:
        return gemv_sweep(packed, shapes, args)
    rows = []
    reps = 20 if args.device == "cuda" else 5
    for m in [int(v) for v in args.batch_sizes.split(",")]:
        xs = {k: torch.randn(m, k, device=args.device) for _, k in shapes}
        repeat = layers // copies
        # The kernel limits, forced each way: the fused kernel for every batch, then dequantize + GEMM.
        if args.method == "int4":
            limits = [(int4_planes, "CPU_KERNEL_MAX_TOKENS")]
            if args.device == "cuda":                      # Triton only where a GPU runs
                from ondo.layers.quantization import int4_gpu_kernels

                limits.append((int4_gpu_kernels, "FUSED_MAX_TOKENS"))
            kernel_limit, dequant_limit = 1 << 20, 0
        else:
            from ondo.layers.quantization import int8_triton

            limits, kernel_limit, dequant_limit = [(int8_triton, "KERNEL_MAX_TOKENS")], 1 << 20, 0
        saved = [getattr(module, name) for module, name in limits]
        for module, name in limits:
            setattr(module, name, kernel_limit)
        t_kernel = timed(lambda: [p(xs[p.in_features]) for p in packed], args.device, reps) * repeat
        row = {"M": m}
        if args.method == "int8" and m > 1 and args.device == "cuda":   # tensor-core kernel, 128 x 128 tiles, 8 warps
            import functools

            real_mm = int8_triton.int8_mm
            int8_triton.int8_mm = functools.partial(real_mm, config=(128, 128, 8, 3))
            row["int8_kernel_128x128_ms"] = timed(lambda: [p(xs[p.in_features]) for p in packed], args.device,
                                                  reps) * repeat * 1e3
            int8_triton.int8_mm = real_mm
        for module, name in limits:
            setattr(module, name, dequant_limit)
        t_dequant = timed(lambda: [p(xs[p.in_features]) for p in packed], args.device, reps) * repeat
        for (module, name), value in zip(limits, saved):
            setattr(module, name, value)
        t_dense = timed(lambda: [d(xs[d.in_features]) for d in dense], args.device, reps) * repeat
        quant_bytes = sum(b.nbytes for p in packed for b in p.buffers()) * repeat
        dense_bytes = sum(d.weight.nbytes for d in dense) * repeat
        name = args.method
        row.update({f"{name}_kernel_ms": t_kernel * 1e3, f"{name}_dequant_gemm_ms": t_dequant * 1e3,
                    "bf16_ms": t_dense * 1e3, f"{name}_GBps": quant_bytes / t_kernel / 1e9,
                    "bf16_GBps": dense_bytes / t_dense / 1e9, "speedup_vs_bf16": t_dense / min(t_kernel, t_dequant)})
        rows.append(row)
    name = args.method
    print(f"{args.model} layer stack, {args.device}: {name} weights {quant_bytes / 1e9:.2f} GB, bf16 {dense_bytes / 1e9:.2f} GB")
    print(f"{'M':>5} {name + ' kernel ms':>15} {'dequant+GEMM ms':>16} {'bf16 ms':>9} {name + ' GB/s':>10} {'bf16 GB/s':>10} "
          f"{'best/bf16':>9}" + (f" {'128x128 tiles ms':>17}" if name == "int8" and args.device == "cuda" else ""))
    for r in rows:
        print(f"{r['M']:>5} {r[name + '_kernel_ms']:>15.3f} {r[name + '_dequant_gemm_ms']:>16.3f} {r['bf16_ms']:>9.3f} "
              f"{r[name + '_GBps']:>10.0f} {r['bf16_GBps']:>10.0f} {r['speedup_vs_bf16']:>8.2f}x"
              + (f" {r['int8_kernel_128x128_ms']:>17.3f}" if "int8_kernel_128x128_ms" in r else ""))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"model": args.model, "device": args.device, "method": name, "rows": rows}, f, indent=2)


def gemv_sweep(packed, shapes, args) -> None:
    """µs per one-row product of each shape (every layer's matrix once, in one CUDA graph), per kernel
    (the float one, the integer one at several program widths) and K split (2, 4 or 8 blocks a program);
    the configuration `gemv_config` picks is marked, and each row's largest difference from the float
    kernel's output (relative to its largest value) is printed."""
    from ondo.layers.quantization import int4_gpu_kernels as kernels

    rows = []
    variants = [("float", 64, 1), ("integer", 64, 1), ("integer", 128, 1), ("integer", 256, 1), ("integer", 256, 2)]
    for n, k in shapes:
        layers = [p for p in packed if (p.out_features, p.in_features) == (n, k)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        blocks = layers[0].k_eff // 128
        for kernel, block_n, warps in variants:
            kernels.INTEGER_GEMV = kernel == "integer"
            chosen = kernels.gemv_config(n, layers[0].k_eff, kernel == "integer")
            reference = None
            for split in [s for s in range(1, blocks + 1) if blocks % s == 0 and blocks // s in (2, 4, 8)]:
                config = (block_n, split, warps)
                run = lambda: [kernels.int4_gemv(x, p.qweight, p.scales_and_zeros, p.group, p.planes, config)  # noqa: E731
                               for p in layers]
                kernels.INTEGER_GEMV = False
                reference = kernels.int4_gemv(x, layers[0].qweight, layers[0].scales_and_zeros, layers[0].group,
                                              layers[0].planes, (64, split, 1)).float()
                kernels.INTEGER_GEMV = kernel == "integer"
                got = run()[0].float()
                error = ((got - reference).abs().max() / reference.abs().max()).item()
                us = timed(run, "cuda", 20) / len(layers) * 1e6
                rows.append({"n": n, "k": k, "kernel": kernel, "block_n": block_n, "warps": warps, "split": split,
                             "blocks_per_program": blocks // split, "programs": -(-n // block_n) * split, "us": us,
                             "vs_float_kernel": error, "chosen": config == chosen})
                print(f"{n:>6} x {k:<6} {kernel:>7} {block_n:>3} cols {warps} warp(s) split {split:>3} "
                      f"({blocks // split} blocks a program, {rows[-1]['programs']:>5} programs) {us:8.2f} us  "
                      f"diff {error:.1e}{'  <- gemv_config' if rows[-1]['chosen'] else ''}", flush=True)
    kernels.INTEGER_GEMV = True
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"model": args.model, "device": "cuda", "gemv_sweep": rows}, f, indent=2)


if __name__ == "__main__":
    main()
