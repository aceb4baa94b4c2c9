"""Sampling against greedy: the sampler alone on random logits, and end to end through `LLM.generate`.

    python benchmarks/sampling.py --device cuda                                    # sampler alone
    python benchmarks/sampling.py --device cuda --mode e2e --model qwen3-0.6b --load-format dummy
    python benchmarks/sampling.py --device cpu --batch-sizes 1,8 --vocab-sizes 8192 --mode both \\
        --model tiny-llama --num-prompts 8 --prompt-len 32 --output-len 16          # a quick check on a CPU

"sampled" is temperature 0.8, top-p 0.95, top-k 50, repetition penalty 1.1 (--sampled-options changes it).
micro: one `Sampler` call per step on random bf16-rounded logits (ties as a bf16 model makes them) for a
batch whose requests have --prompt-len prompt tokens and gain their sampled token every step, as in the
engine; time per step (including the host copy of the tokens) and sampled / greedy. --reference also times
the full-vocabulary sort that the sampler falls back to. e2e: --num-prompts x (--prompt-len + --output-len)
and one stream (1 x (--prompt-len + --single-output-len)), greedy and sampled alternating --num-iters times,
output tokens per second (median).
"""
from __future__ import annotations

import argparse
import json
import time

import common

MICRO_COLUMNS = [("vocab", "vocab"), ("batch", "batch"), ("mode", "sampler"), ("ms_per_step", "ms/step"),
                 ("vs_greedy", "time vs greedy"), ("redone_rows", "rows redone")]
E2E_COLUMNS = [("workload", "workload"), ("mode", "decoding"), ("output_tokens", "out tokens"),
               ("elapsed_s", "seconds"), ("output_tok_s", "out tok/s"), ("vs_greedy", "speed vs greedy")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(parser)
    parser.add_argument("--mode", choices=["micro", "e2e", "both"], default="micro")
    parser.add_argument("--batch-sizes", default="1,256", help="micro: comma-separated batch sizes")
    parser.add_argument("--vocab-sizes", default="151936,128256", help="micro: comma-separated vocabularies")
    parser.add_argument("--steps", type=int, default=50, help="micro: timed steps per case")
    parser.add_argument("--reference", action="store_true", help="micro: also time the full-sort path")
    parser.add_argument("--sampled-options", default='{"temperature": 0.8, "top_p": 0.95, "top_k": 50, '
                        '"repetition_penalty": 1.1}', help="JSON SamplingParams keywords of the sampled runs")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--single-output-len", type=int, default=256, help="e2e: tokens of the one stream")
    parser.add_argument("--num-iters", type=int, default=3,
                        help="e2e: greedy and sampled runs, alternating; the median is reported")
    args = parser.parse_args(argv)
    args.device = common.resolve_device(args.device)
    args.sampled = json.loads(args.sampled_options)
    common.check_positive(parser, args, "steps", "num-prompts", "prompt-len", "output-len", "single-output-len",
                          "num-iters")
    return args


# ---- the sampler alone ------------------------------------------------------------------------------

def micro(args: argparse.Namespace) -> list[dict]:
    import torch

    from ondo.sample import Sampler
    from ondo.sample import candidates
    from ondo.sampling_params import SamplingParams

    torch.manual_seed(args.seed)
    modes = {"greedy": dict(temperature=0.0), "sampled": args.sampled}
    if args.reference:
        modes["sampled, full sort"] = args.sampled
    rows = []
    for vocab in [int(v) for v in args.vocab_sizes.split(",")]:
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            # bf16-rounded: the ties a bf16 model's logits have. [steps, batch, vocab] would not fit: a few
            # distinct step logits are cycled.
            logits = [(torch.randn(batch, vocab, device=args.device) * 3).bfloat16().float() for _ in range(4)]
            greedy_ms = None
            for mode, options in modes.items():
                saved = candidates.MAX_BUDGET_FRACTION
                if mode == "sampled, full sort":
                    candidates.MAX_BUDGET_FRACTION = 0.0  # every row takes the reference path
                try:
                    ms, redone = _time_sampler(Sampler(), logits, batch, vocab, SamplingParams(**options), args)
                finally:
                    candidates.MAX_BUDGET_FRACTION = saved
                greedy_ms = ms if mode == "greedy" else greedy_ms
                rows.append({"vocab": vocab, "batch": batch, "mode": mode, "ms_per_step": ms,
                             "vs_greedy": round(ms / greedy_ms, 2) if greedy_ms else None,
                             "redone_rows": redone if mode != "greedy" else None})
                print(f"  vocab {vocab} batch {batch} {mode}: {ms:.3f} ms/step", flush=True)
    return rows


class _Request:
    """What the sampler reads of a request (see docs/architecture.md, "Sampler")."""

    def __init__(self, prompt: list[int], params) -> None:
        self.prompt_token_ids, self.output_token_ids, self.sampling_params = prompt, [], params
        self.generator, self.structured, self.min_tokens = None, None, 0
        self.eos_token_ids = self.stop_token_ids = frozenset()
        self.bad_words_token_ids: list[list[int]] = []

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)


def _time_sampler(sampler, logits: list, batch: int, vocab: int, params, args) -> tuple[float, int]:
    """Milliseconds per step over --steps steps after a warm-up; every request gains its token each step."""
    prompts = common.random_prompts(batch, args.prompt_len, vocab, args.seed)
    requests = [_Request(p, params) for p in prompts]
    warmup = 5
    redone = 0
    start = None
    for step in range(warmup + args.steps):
        if step == warmup:
            start = common.now(args.device)
        out = sampler(logits[step % len(logits)], requests)
        for request, token in zip(requests, out.token_ids):
            request.output_token_ids.append(token)
        if step >= warmup:
            redone += getattr(sampler, "num_redone_rows", 0)
        sampler.num_redone_rows = 0
    elapsed = common.now(args.device) - start
    return elapsed / args.steps * 1000, redone


# ---- end to end ---------------------------------------------------------------------------------------

def e2e(args: argparse.Namespace) -> list[dict]:
    from ondo import SamplingParams

    spec = common.resolve_model(args.model, args.load_format)
    longest = args.prompt_len + max(args.output_len, args.single_output_len)
    runner = common.build_runner("ondo", args, spec, max_model_len=args.max_model_len or common.round_up(longest),
                                 max_num_seqs=args.max_num_seqs or min(args.num_prompts, 256))
    print(f"  loaded {spec.label} on {runner.device} in {runner.load_s:.1f} s", flush=True)
    vocab = runner.vocab_size

    def params(mode: str, output_len: int):
        options = {"temperature": 0.0} if mode == "greedy" else args.sampled
        return SamplingParams(**options, max_tokens=output_len, ignore_eos=True)

    warmup = common.random_prompts(min(args.num_prompts, 8), args.prompt_len, vocab, args.seed + 10_000)
    for mode in ("greedy", "sampled"):
        runner.generate(warmup, params(mode, 4))
    workloads = [(f"{args.num_prompts} x ({args.prompt_len} + {args.output_len})", args.num_prompts,
                  args.output_len), (f"1 x ({args.prompt_len} + {args.single_output_len})", 1,
                                     args.single_output_len)]
    rows = []
    for index, (name, count, output_len) in enumerate(workloads):
        runs: dict[str, list[dict]] = {"greedy": [], "sampled": []}
        for iteration in range(args.num_iters):   # alternating, so that a busy spell hits both alike
            for mode in runs:   # fresh prompts per run: nothing is served from the prefix cache
                seed = args.seed + 1000 * index + 10 * iteration + len(runs[mode]) + (mode == "sampled")
                prompts = common.random_prompts(count, args.prompt_len, vocab, seed)
                runs[mode].append(runner.generate(prompts, params(mode, output_len)))
        greedy_rate = None
        for mode, results in runs.items():
            rate = common.median([r["output_tokens"] / r["elapsed_s"] for r in results])
            greedy_rate = rate if mode == "greedy" else greedy_rate
            rows.append({"workload": name, "mode": mode, "output_tokens": results[0]["output_tokens"],
                         "elapsed_s": common.median([r["elapsed_s"] for r in results]), "output_tok_s": rate,
                         "vs_greedy": round(rate / greedy_rate, 3)})
            print(f"  {name} {mode}: {rate:,.0f} out tok/s (median of {len(results)})", flush=True)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    payload = {"args": {k: v for k, v in vars(args).items() if not k.startswith("child")},
               "env": common.environment(args.device), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.mode in ("micro", "both"):
        payload["micro"] = micro(args)
        common.print_table(f"Sampler alone ({args.device}; sampled = {args.sampled})", payload["micro"], MICRO_COLUMNS)
    if args.mode in ("e2e", "both"):
        payload["e2e"] = e2e(args)
        common.print_table(f"LLM.generate ({args.model}; sampled = {args.sampled})", payload["e2e"], E2E_COLUMNS)
    common.write_json(args.output_json, payload)


if __name__ == "__main__":
    main()
