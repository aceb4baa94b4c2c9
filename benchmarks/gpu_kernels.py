"""Kernel benchmarks on a CUDA GPU: paged decode / prefill attention, KV write and the fused ops, each next
to what plain PyTorch offers on the same shapes (SDPA on contiguous K/V, varlen_attn, the layer modules).

    PYTHONPATH=. python benchmarks/gpu_kernels.py --output-json kernels.json [--quick]

Llama-3-8B attention heads (32 query, 8 KV, head_dim 128), bf16, block_size 16, block tables scattered
over the pool. Times are medians of triton.testing.do_bench (L2 flushed before each call). Decode is
also timed as a CUDA graph of 16 calls over distinct caches (launch gaps removed), the way the engine
replays it; "eager" decode rows can be host-bound (see the host_launch rows: host time per call).
Bandwidth counts the fewest bytes the op must move: K/V read once, outputs written once.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys

import torch
import torch.nn.functional as F

from ondo.layers import fused
from ondo.layers.activation import GatedActivation
from ondo.layers.attention import AttentionMetadata
from ondo.layers.attention.torch_backend import TorchAttentionBackend, gather_kv, write_kv
from ondo.layers.attention.triton_backend import TritonAttentionBackend, choose_decode_splits, num_sms
from ondo.layers.attention.triton_cache import write_kv_cache
from ondo.layers.attention.triton_decode import paged_decode
from ondo.layers.attention.triton_prefill import paged_prefill
from ondo.layers.norm import RMSNorm
from ondo.layers.rotary import apply_rotary

H, KVH, D, BS, DT = 32, 8, 128, 16, torch.bfloat16
SCALE = D ** -0.5
GRAPH_CALLS = 16
rows: list[dict] = []


def bench_ms(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def record(group, name, ms, *, nbytes=None, flops=None, **extra):
    row = dict(group=group, name=name, us=round(ms * 1e3, 2), **extra)
    if nbytes:
        row["TBps"] = round(nbytes / ms / 1e9, 3)
    if flops:
        row["TFLOPs"] = round(flops / ms / 1e9, 1)
    rows.append(row)
    print(json.dumps(row), flush=True)


def paged_problem(num_seqs, seq_len, query_len, copies=1, seed=0):
    """A scattered paged cache holding `copies` disjoint sets of sequences, and one metadata per set."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks = -(-seq_len // BS)
    num_blocks = num_seqs * blocks * copies
    kv_cache = torch.randn(2, num_blocks, BS, KVH, D, device="cuda", dtype=DT, generator=gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).int().view(copies, num_seqs, blocks)
    qsl = torch.arange(num_seqs + 1, device="cuda", dtype=torch.int32) * query_len
    pos = torch.arange(seq_len - query_len, seq_len, device="cuda")
    metas = []
    for c in range(copies):
        bt = perm[c]
        slots = (bt[:, pos // BS].long() * BS + pos % BS).reshape(-1)
        metas.append(AttentionMetadata(
            slot_mapping=slots, query_start_loc=qsl,
            seq_lens=torch.full((num_seqs,), seq_len, device="cuda", dtype=torch.int32), block_tables=bt,
            max_query_len=query_len, max_seq_len=seq_len, query_lens_cpu=[query_len] * num_seqs,
            seq_lens_cpu=[seq_len] * num_seqs, is_decode=query_len == 1))
    q = torch.randn(num_seqs * query_len, H, D, device="cuda", dtype=DT, generator=gen)
    return q, kv_cache, metas


def graph_ms(call, metas) -> float:
    """Per-call time of GRAPH_CALLS calls captured in one CUDA graph, cycling over the metadata sets."""
    for m in metas:
        call(m)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(GRAPH_CALLS):
            call(metas[i % len(metas)])
    return bench_ms(graph.replay) / GRAPH_CALLS


def bench_decode(num_seqs, seq_len, sweep):
    kv_bytes = 2 * num_seqs * seq_len * KVH * D * 2
    copies = max(1, min(GRAPH_CALLS, -(-(256 << 20) // kv_bytes)))   # distinct caches: more than L2 in total
    q, kv_cache, metas = paged_problem(num_seqs, seq_len, 1, copies)
    nbytes = kv_bytes + 2 * q.numel() * 2
    tag = f"{num_seqs}x{seq_len}"
    splits = choose_decode_splits(num_seqs, KVH, seq_len, num_sms(q.device))
    kw = dict(scale=SCALE, sliding_window=None, logit_softcap=None)

    def call(m, s=splits, cfg=None):
        return paged_decode(q, kv_cache, m.block_tables, m.seq_lens, num_splits=s, tile_config=cfg, **kw)

    record("decode", f"triton paged {tag} eager", bench_ms(lambda: call(metas[0])), nbytes=nbytes, splits=splits)
    record("decode", f"triton paged {tag} graph", graph_ms(call, metas), nbytes=nbytes, splits=splits)
    for s in sweep:
        record("decode-sweep", f"{tag} splits={s}", graph_ms(lambda m: call(m, s), metas), nbytes=nbytes)
    if num_seqs * seq_len <= 64 * 2048:
        for cfg in [(32, 4, 2), (128, 4, 2), (64, 4, 3), (64, 8, 2), (128, 8, 3)]:
            record("decode-sweep", f"{tag} splits={splits} tile={cfg}",
                   graph_ms(lambda m: call(m, splits, cfg), metas), nbytes=nbytes)
    qc = q.view(num_seqs, H, 1, D)
    k = torch.randn(num_seqs, KVH, seq_len, D, device="cuda", dtype=DT)
    v = torch.randn_like(k)
    for name, backend in [("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION")]:
        try:
            with torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, backend)):
                ms = bench_ms(lambda: F.scaled_dot_product_attention(qc, k, v, enable_gqa=True))
            record("decode", f"sdpa {name} contiguous {tag}", ms, nbytes=nbytes)
        except RuntimeError as e:
            record("decode", f"sdpa {name} contiguous {tag}", float("nan"), error=str(e)[:120])
    if tag == "64x2048":   # the whole backend step (KV write + attention) against the portable reference
        k_new, v_new = torch.randn(2, num_seqs, KVH, D, device="cuda", dtype=DT)
        ref, fast = TorchAttentionBackend(), TritonAttentionBackend()
        record("decode", f"torch_backend paged {tag}",
               bench_ms(lambda: ref.forward(q, k_new, v_new, kv_cache, metas[0], **kw)), nbytes=nbytes)
        want = ref.forward(q, k_new, v_new, kv_cache, metas[0], **kw).float()
        got = fast.forward(q, k_new, v_new, kv_cache, metas[0], **kw).float()
        record("check", f"decode {tag} rel err vs torch_backend", 0.0,
               rel_err=float((got - want).norm() / want.norm()))


def causal_varlen(cu_q, cu_k, max_q, max_k):
    """fn(q [T, H, D], k/v [Tk, KVH, D]) -> causal varlen_attn, with whatever options this torch has."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kw = {"scale": SCALE} if "scale" in params else {}
    kw.update({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
    gqa = "enable_gqa" in params
    if gqa:
        kw["enable_gqa"] = True

    def run(q, k, v):
        if not gqa:
            k, v = k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1)
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
    return run


def bench_prefill(num_seqs, prefix, query_len, sweep):
    seq_len = prefix + query_len
    q, kv_cache, (meta,) = paged_problem(num_seqs, seq_len, query_len)
    tag = f"{num_seqs}x{query_len}+{prefix}"
    pairs = num_seqs * sum(prefix + i + 1 for i in range(query_len))          # visible (query, key) pairs
    flops = 4 * H * D * pairs

    def call(cfg=None):
        return paged_prefill(q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, query_len,
                             scale=SCALE, sliding_window=None, logit_softcap=None, tile_config=cfg)

    record("prefill", f"triton paged {tag}", bench_ms(call), flops=flops)
    for cfg in sweep:
        record("prefill-sweep", f"{tag} tile={cfg}", bench_ms(lambda: call(cfg)), flops=flops)
    keys, values = gather_kv(kv_cache, meta.block_tables, seq_len)            # [S, L, KVH, D]
    k_flat, v_flat = keys.reshape(-1, KVH, D), values.reshape(-1, KVH, D)
    cu_q = meta.query_start_loc
    cu_k = torch.arange(num_seqs + 1, device="cuda", dtype=torch.int32) * seq_len
    try:
        varlen = causal_varlen(cu_q, cu_k, query_len, seq_len)
        record("prefill", f"varlen_attn contiguous {tag}", bench_ms(lambda: varlen(q, k_flat, v_flat)), flops=flops)

        def gathered():
            kk, vv = gather_kv(kv_cache, meta.block_tables, seq_len)
            return varlen(q, kk.reshape(-1, KVH, D), vv.reshape(-1, KVH, D))

        record("prefill", f"gather + varlen_attn {tag}", bench_ms(gathered), flops=flops)
        got, want = varlen(q, k_flat, v_flat).float(), call().float()
        record("check", f"varlen_attn {tag} rel diff vs triton", 0.0,
               rel_err=float((got - want).norm() / want.norm()))
    except Exception as e:  # noqa: BLE001 - report what this torch offers, whatever it raises
        record("prefill", f"varlen_attn {tag}", float("nan"), error=repr(e)[:160])
    if prefix == 0:
        qs = q.view(num_seqs, query_len, H, D).transpose(1, 2)
        ks, vs = keys.transpose(1, 2), values.transpose(1, 2)
        record("prefill", f"sdpa causal contiguous {tag}",
               bench_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)),
               flops=flops)


def bench_kv_write(num_tokens):
    q, kv_cache, (meta,) = paged_problem(num_tokens // 512, 4096, 512)
    k = torch.randn(num_tokens, KVH, D, device="cuda", dtype=DT)
    v = torch.randn_like(k)
    nbytes = 4 * k.numel() * 2
    record("kv_write", f"triton {num_tokens} tokens", bench_ms(lambda: write_kv_cache(kv_cache, k, v, meta.slot_mapping)),
           nbytes=nbytes)
    record("kv_write", f"index_copy_ {num_tokens} tokens", bench_ms(lambda: write_kv(kv_cache, k, v, meta.slot_mapping)),
           nbytes=nbytes)


def bench_fused(tokens, hidden, inter):
    x = torch.randn(tokens, hidden, device="cuda", dtype=DT)
    res = torch.randn_like(x)
    norm = RMSNorm(hidden).to("cuda", DT)
    nbytes = 4 * x.numel() * 2
    record("fused", f"rms_norm+residual triton [{tokens},{hidden}]",
           bench_ms(lambda: fused.rms_norm(x, norm.weight, 1e-6, res)), nbytes=nbytes)
    record("fused", f"rms_norm+residual torch [{tokens},{hidden}]", bench_ms(lambda: norm(x, res)), nbytes=nbytes)
    qkv = torch.randn(tokens, (H + 2 * KVH) * D, device="cuda", dtype=DT)
    q, k, _ = qkv.split([H * D, KVH * D, KVH * D], -1)
    cos, sin = torch.randn(tokens, D, device="cuda", dtype=DT), torch.randn(tokens, D, device="cuda", dtype=DT)
    nbytes = 2 * (H + KVH) * D * tokens * 2
    record("fused", f"rotary in place triton [{tokens},{H}+{KVH},{D}]",
           bench_ms(lambda: fused.apply_rotary_(q, k, cos, sin, D)), nbytes=nbytes)
    record("fused", f"rotary torch [{tokens},{H}+{KVH},{D}]",
           bench_ms(lambda: (apply_rotary(q, cos, sin, D), apply_rotary(k, cos, sin, D))), nbytes=nbytes)
    gate_up = torch.randn(tokens, 2 * inter, device="cuda", dtype=DT)
    nbytes = 3 * tokens * inter * 2
    for act, op in [("silu", fused.silu_and_mul), ("gelu_pytorch_tanh", fused.gelu_tanh_and_mul)]:
        module = GatedActivation(act)
        record("fused", f"{act}_and_mul triton [{tokens},{inter}]", bench_ms(lambda: op(gate_up)), nbytes=nbytes)
        record("fused", f"{act}_and_mul torch [{tokens},{inter}]", bench_ms(lambda: module(gate_up)), nbytes=nbytes)


def host_us(fn, calls=300) -> float:
    """Host time per call, GPU work left queued: what an eager (non-graph) step pays to launch it."""
    import time

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def bench_launch_cost():
    """Small decode-sized calls, where launching costs more than running: the case for CUDA graphs."""
    backend = TritonAttentionBackend()
    kw = dict(scale=SCALE, sliding_window=None, logit_softcap=None)
    q, kv_cache, (meta,) = paged_problem(1, 2048, 1)
    k, v = torch.randn(2, 1, KVH, D, device="cuda", dtype=DT)
    cases = [("backend.forward decode 1x2048 (write + 2 kernels)", lambda: backend.forward(q, k, v, kv_cache, meta, **kw))]
    q, kv_cache, (meta,) = paged_problem(1, 2048, 64)
    k, v = torch.randn(2, 64, KVH, D, device="cuda", dtype=DT)
    cases.append(("backend.forward prefill 64 tokens (write + 1 kernel)",
                  lambda: backend.forward(q, k, v, kv_cache, meta, **kw)))
    x, res = torch.randn(2, 64, 4096, device="cuda", dtype=DT)
    weight = torch.ones(4096, device="cuda", dtype=DT)
    qkv = torch.randn(64, (H + 2 * KVH) * D, device="cuda", dtype=DT)
    qv, kv, _ = qkv.split([H * D, KVH * D, KVH * D], -1)
    cos, sin = torch.randn(2, 64, D, device="cuda", dtype=DT)
    gate_up = torch.randn(64, 2 * 14336, device="cuda", dtype=DT)
    cases += [("fused.rms_norm + residual [64, 4096]", lambda: fused.rms_norm(x, weight, 1e-6, res)),
              ("fused.apply_rotary_ [64 tokens]", lambda: fused.apply_rotary_(qv, kv, cos, sin, D)),
              ("fused.silu_and_mul [64, 14336]", lambda: fused.silu_and_mul(gate_up)),
              ("torch add_ (one tiny eager op)", lambda: x.add_(0))]
    for name, fn in cases:
        record("host_launch", name, host_us(fn) / 1e3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-json", help="write every measurement here")
    parser.add_argument("--quick", action="store_true", help="skip the tile and split sweeps")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    props = torch.cuda.get_device_properties(0)
    src = torch.empty(1 << 29, device="cuda", dtype=torch.int16)   # 1 GiB
    dst = torch.empty_like(src)
    copy_tbps = 2 * src.numel() * 2 / bench_ms(lambda: dst.copy_(src)) / 1e9
    del src, dst
    env = dict(gpu=props.name, sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
               copy_TBps=round(copy_tbps, 3))
    print(json.dumps(env), flush=True)
    quick = args.quick
    bench_decode(64, 2048, [] if quick else [1, 2, 4])
    bench_decode(1, 2048, [] if quick else [1, 4, 8, 16])
    bench_decode(1, 8192, [] if quick else [8, 16, 32, 64])
    bench_decode(1, 32768, [])
    bench_decode(16, 8192, [])
    prefill_sweep = [] if quick else [(128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2), (64, 32, 4, 3),
                                      (128, 32, 8, 2), (64, 64, 8, 2), (128, 64, 4, 2)]
    bench_prefill(8, 0, 1024, prefill_sweep)
    bench_prefill(8, 1536, 512, [])
    bench_kv_write(8192)
    bench_fused(4096, 4096, 14336)
    bench_launch_cost()
    print(f"\n{'group':<14}{'name':<52}{'us':>10}{'TB/s':>8}{'TFLOP/s':>9}  (copy {copy_tbps:.2f} TB/s, {props.name})")
    for r in rows:
        print(f"{r['group']:<14}{r['name']:<52}{r['us']:>10}{r.get('TBps', ''):>8}{r.get('TFLOPs', ''):>9}"
              + (f"  rel_err={r['rel_err']:.2e}" if "rel_err" in r else "") + (f"  {r['error']}" if "error" in r else ""))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
