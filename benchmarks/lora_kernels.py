"""What the LoRA delta adds to the linear layers of one decode step, on a GPU: Llama-3-8B's 32 layers x
(q/k/v, o, gate/up, down), each a bf16 matmul, captured as one CUDA graph, timed three ways: the base
matmuls alone, + the grouped kernels in line (`add_lora`), + the path the engine takes
(`LoRALinear.begin` / `finish`: beside the base product on a side stream up to 64 tokens). Every
timed graph's outputs are first checked against the per-token reference.

    python benchmarks/lora_kernels.py --output-json results/lora-kernels.json
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import common

SHAPES = [(4096, [4096, 1024, 1024]), (4096, [4096]), (4096, [14336, 14336]), (14336, [4096])]   # (in, out sizes)
CASES = [("1 token, one adapter", [0]), ("64 tokens over 8 adapters", [i % 8 for i in range(64)]),
         ("256 tokens over 8 adapters", [i % 8 for i in range(256)])]
COLUMNS = [("case", "case"), ("base_ms", "base matmuls ms"), ("inline_ms", "+ kernels in line"),
           ("engine_ms", "+ engine path"), ("inline_cost_ms", "in line cost"), ("engine_cost_ms", "engine path cost")]


def build_layers(num_layers: int, max_loras: int, rank: int):
    import torch

    from ondo.lora.layers import LoRALinear, LoRAStepState

    device = torch.device("cuda")
    state = LoRAStepState(max_loras, 8192, device)
    layers = []
    for _ in range(num_layers):
        for k, sizes in SHAPES:
            offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            shape = SimpleNamespace(out_sizes=sizes, offsets=offsets, in_features=k, out_features=sum(sizes))
            lora = LoRALinear(shape, state, max_loras, rank, torch.bfloat16, device)
            lora.lora_a.normal_(std=0.01)
            lora.lora_b.normal_(std=0.01)
            layers.append((k, torch.randn(sum(sizes), k, device=device, dtype=torch.bfloat16) * 0.01, lora))
    return state, layers


def time_graph(state, layers, slots: list[int], mode: str, iterations: int) -> float:
    """ms per replay of one graph over all layers; outputs checked against the reference first."""
    import torch

    from ondo.lora.layers import add_lora_reference
    from ondo.lora.triton_ops import add_lora

    tokens = len(slots)
    inputs = {k: torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16) for k in {k for k, _, _ in layers}}
    outputs = []

    def forward():
        outputs.clear()
        for k, weight, lora in layers:
            x = inputs[k]
            if mode == "engine":
                started = lora.begin(x)
                out = lora.finish(x, x @ weight.t(), started)
            else:
                out = x @ weight.t()
                if mode == "inline":
                    add_lora(x, lora.lora_a, lora.lora_b, state.token_groups, out)
            outputs.append(out)

    with state.graph_variant(True):
        graph = common.capture_cuda_graph(forward)
    if mode != "base":
        for index in range(len(layers)):
            k, weight, lora = layers[index]
            expected = add_lora_reference(inputs[k], lora.lora_a, lora.lora_b, slots, inputs[k] @ weight.t())
            error = (outputs[index].float() - expected).abs().max().item()
            if error > 3e-2:
                raise SystemExit(f"{mode}: layer {index} differs from the reference by {error:.3g}")
    return common.replay_seconds(graph, iterations, warmup=5) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    common.check_positive(parser, args, "layers", "rank", "iterations")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("lora_kernels.py times CUDA graphs: it needs a CUDA GPU")
    from ondo.lora.layers import token_spans

    torch.manual_seed(0)
    state, layers = build_layers(args.layers, 8, args.rank)
    rows = []
    for case, slots in CASES:
        spans = token_spans(slots, [1] * len(slots))
        state.set_spans(spans)
        state.token_groups.write(spans)
        row = {"case": case, **{f"{mode}_ms": time_graph(state, layers, slots, mode, args.iterations)
                                for mode in ("base", "inline", "engine")}}
        row["inline_cost_ms"] = row["inline_ms"] - row["base_ms"]
        row["engine_cost_ms"] = row["engine_ms"] - row["base_ms"]
        rows.append(row)
    common.print_table(f"LoRA delta over {len(layers)} bf16 linears of the Llama-3-8B shape, rank {args.rank}, "
                       "one CUDA graph", rows, COLUMNS)
    common.write_json(args.output_json, {"benchmark": "lora_kernels", "args": vars(args), "rows": rows,
                                         "env": common.environment("cuda")})


if __name__ == "__main__":
    main()
