"""Where a decode step's time goes on a GPU: the kernels of one request's decode steps (CUDA graphs
replayed as in serving), grouped by kernel name, with their share of the step.

    PYTHONPATH=. python benchmarks/step_profile.py --model llama3-8b --load-format dummy --quantization int4 \\
        --output-json profile.json

One request of --prompt-len tokens decodes --output-len tokens; its decode steps (after the first
token) run under torch.profiler (CUDA activity). The table lists, per kernel name, launches and
microseconds per step; "gaps" is the GPU's span over those steps (first kernel start to last kernel
end) less the kernels' own time, per step: launch latency, waits between dependent kernels inside a
graph, and the host's turn between steps where it shows. With programmatic dependent launch (the
default on sm_90 and newer) a kernel's programs start while the kernel before it runs and wait for
it, so each kernel's time includes that wait and "gaps" turns negative: run with ONDO_PDL=0 for each
kernel's own time.
"""
from __future__ import annotations

import argparse
import collections
import time

import common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(parser)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--top", type=int, default=25, help="kernel names listed (the rest summed)")
    args = parser.parse_args(argv)
    common.check_positive(parser, args, "prompt-len", "output-len", "top")
    return args


def profile(args: argparse.Namespace) -> dict:
    import torch
    from torch.profiler import ProfilerActivity

    spec = common.resolve_model(args.model, args.load_format)
    runner = common.build_runner("ondo", args, spec, max_model_len=common.round_up(args.prompt_len + args.output_len),
                                 max_num_seqs=1)
    prompt = common.random_prompts(1, args.prompt_len, runner.vocab_size, args.seed)[0]
    runner.latency(prompt, 8)                                        # warm-up (graphs captured at load)
    engine = runner.llm.engine
    engine.add_request("profiled", prompt, common.greedy_params(args.output_len))
    while not any(o.outputs[0].token_ids for o in engine.step()):   # the prefill, not profiled
        pass
    torch.cuda.synchronize()
    tokens = 0
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            for output in engine.step():
                tokens = len(output.outputs[0].token_ids)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    steps = tokens - 1                                               # decode steps after the first token
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    span = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
    per_name = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        per_name[e.name][0] += 1
        per_name[e.name][1] += e.time_range.end - e.time_range.start
    busy = sum(total for _, total in per_name.values())
    rows = [{"kernel": name[:90], "launches": count / steps, "us_per_step": total / steps}
            for name, (count, total) in sorted(per_name.items(), key=lambda kv: -kv[1][1])]
    shown, rest = rows[:args.top], rows[args.top:]
    if rest:
        shown.append({"kernel": f"({len(rest)} other kernels)", "launches": sum(r["launches"] for r in rest),
                      "us_per_step": sum(r["us_per_step"] for r in rest)})
    shown.append({"kernel": "gaps between kernels", "launches": None, "us_per_step": (span - busy) / steps})
    shown.append({"kernel": "decode step on the GPU", "launches": sum(r["launches"] for r in rows),
                  "us_per_step": span / steps})
    for row in shown:
        row["share"] = row["us_per_step"] * steps / span
    return {"rows": shown, "decode_steps": steps, "profiled_tok_s": steps / elapsed, "details": runner.details,
            "env": common.environment(runner.device)}


def main() -> None:
    args = parse_args()
    result = profile(args)
    common.print_table(f"decode step of {args.model} ({result['decode_steps']} steps, "
                       f"{result['profiled_tok_s']:.1f} tok/s while profiled)", result["rows"],
                       [("kernel", "kernel"), ("launches", "launches/step"), ("us_per_step", "us/step"),
                        ("share", "share")])
    common.write_json(args.output_json, {"benchmark": "step_profile", "model": args.model, "args": vars(args),
                                         **result})


if __name__ == "__main__":
    main()
