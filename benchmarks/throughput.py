"""Offline throughput: N requests of random token ids (fixed seed, EOS ignored, every request yields exactly
--output-len tokens), all given to the engine at once; output and total tokens per second.

    python benchmarks/throughput.py --model smollm2-135m --load-format dummy --num-prompts 32 \\
        --prompt-len 128 --output-len 128 --threads 2 --peer hf
    python benchmarks/throughput.py --num-prompts 8 --peer llamacpp --peer hf       # the built-in GGUF
    python benchmarks/throughput.py --workload mixed --num-prompts 32                 # greedy vs mixed options

--peer hf runs transformers `generate` on the same prompts (padded batches of --hf-batch-size, greedy);
--peer llamacpp runs llama.cpp on the same GGUF (all prompts as parallel sequences). --workload mixed
times ondo twice, greedy and with different decoding options per request (penalties, top-k/top-p/min-p,
seeds, logprobs, stop strings), and reports the gap. Each engine runs in its own child process (load time
and peak RSS are its own); a warm-up of a few other prompts runs before the timed iterations, and every
iteration uses fresh prompts, so no engine is served from a prefix cache.
"""
from __future__ import annotations

import argparse

import common

COLUMNS = [("engine", "engine"), ("workload", "workload"), ("requests", "requests"),
           ("output_tokens", "out tokens"), ("elapsed_s", "seconds"), ("output_tok_s", "out tok/s"),
           ("total_tok_s", "total tok/s"), ("vs_ondo", "speed vs ondo"), ("load_s", "load s"),
           ("peak_rss_mb", "peak RSS MB")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(parser)
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="ondo: split the model over N GPUs (one worker process each)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-iters", type=int, default=1, help="timed iterations (the median is reported)")
    parser.add_argument("--workload", choices=["greedy", "mixed"], default="greedy",
                        help="mixed: also time ondo with different decoding options per request")
    parser.add_argument("--peer", action="append", choices=["hf", "llamacpp"], default=[],
                        help="also run a peer on the same workload (repeatable)")
    parser.add_argument("--hf-batch-size", type=int, default=None,
                        help="transformers: requests per padded generate call (default: all, at most 64)")
    parser.add_argument("--llamacpp-threads", type=int, default=None, help="default: --threads, else 2")
    args = parser.parse_args(argv)
    common.check_positive(parser, args, "num-prompts", "prompt-len", "output-len", "num-iters", "hf-batch-size",
                          "threads", "max-num-seqs", "max-model-len", "llamacpp-threads", "tensor-parallel-size")
    return args


def run_engine(args: argparse.Namespace, engine: str) -> dict:
    spec = common.resolve_model(args.model, args.load_format)
    runner = common.build_runner(engine, args, spec,
                                 max_model_len=args.max_model_len or common.round_up(args.prompt_len + args.output_len),
                                 max_num_seqs=args.max_num_seqs or min(args.num_prompts, 256))
    rows = measure(runner, engine, args, runner.vocab_size)
    if engine == "llama.cpp":
        runner.close()
    return {"engine": engine, "rows": common.finish_rows(rows, runner), "details": runner.details,
            "env": common.environment(runner.device)}


def measure(runner, engine: str, args: argparse.Namespace, vocab: int) -> list[dict]:
    """A warm-up on other prompts, then --num-iters timed runs (and the mixed ones for ondo)."""
    sets = common.prompt_sets(args.num_prompts, args.prompt_len, vocab, args.seed, args.num_iters)
    warmup_len = min(args.output_len, 4)
    if engine == "ondo":
        runner.generate(sets["warmup"], common.greedy_params(warmup_len))
        if args.workload != "mixed":
            greedy = [runner.generate(p, common.greedy_params(args.output_len)) for p in sets["timed"]]
            return [_row("ondo", "greedy", greedy, args.num_prompts)]
        runner.generate(sets["warmup"], common.mixed_params(len(sets["warmup"]), warmup_len, args.seed))
        # Greedy and mixed iterations alternate, so that a busy spell on a shared machine hits both alike.
        mixed_sets = common.prompt_sets(args.num_prompts, args.prompt_len, vocab, args.seed + 500, args.num_iters)["timed"]
        greedy, mixed = [], []
        for i, (greedy_prompts, mixed_prompts) in enumerate(zip(sets["timed"], mixed_sets)):
            greedy.append(runner.generate(greedy_prompts, common.greedy_params(args.output_len)))
            mixed.append(runner.generate(mixed_prompts, common.mixed_params(len(mixed_prompts), args.output_len,
                                                                            args.seed + i)))
        return [_row("ondo", "greedy", greedy, args.num_prompts), _row("ondo", "mixed", mixed, args.num_prompts)]
    if engine == "transformers":
        batch_size = args.hf_batch_size or min(args.num_prompts, 64)
        runner.generate(sets["warmup"][:batch_size], warmup_len, batch_size)
        timed = [runner.generate(p, args.output_len, batch_size) for p in sets["timed"]]
        return [_row("transformers", f"greedy, batches of {batch_size}", timed, args.num_prompts)]
    runner.generate(sets["warmup"][:2], warmup_len)
    timed = [runner.generate(p, args.output_len) for p in sets["timed"]]
    return [_row("llama.cpp", f"greedy, {args.num_prompts} parallel sequences", timed, args.num_prompts)]


def _row(engine: str, workload: str, runs: list[dict], requests: int) -> dict:
    elapsed = common.median([r["elapsed_s"] for r in runs])
    output_tokens, prompt_tokens = runs[0]["output_tokens"], runs[0]["prompt_tokens"]
    return {"engine": engine, "workload": workload, "requests": requests, "output_tokens": output_tokens,
            "elapsed_s": elapsed, "output_tok_s": output_tokens / elapsed,
            "total_tok_s": (output_tokens + prompt_tokens) / elapsed,
            "iterations_s": [r["elapsed_s"] for r in runs]}


def main() -> None:
    args = parse_args()
    spec = common.resolve_model(args.model, args.load_format)
    engines = common.engines_for(args, spec)
    results = common.run_engines(args, engines, run_engine)
    rows = [row for result in results
            for row in result.get("rows", [{"engine": result["engine"], "workload": result.get("error")}])]
    common.add_ratios(rows, "output_tok_s")
    title = (f"{spec.label}: {args.num_prompts} requests x ({args.prompt_len} prompt + {args.output_len} new tokens), "
             f"threads {args.threads or 'default'}")
    common.print_table(title, rows, COLUMNS)
    greedy = next((r for r in rows if r["engine"] == "ondo" and r["workload"] == "greedy"), None)
    mixed = next((r for r in rows if r["engine"] == "ondo" and r["workload"] == "mixed"), None)
    summary = {}
    if greedy and mixed:
        gap = summary["mixed_gap"] = 1 - mixed["output_tok_s"] / greedy["output_tok_s"]
        print(f"\nondo, mixed decoding options: {mixed['output_tok_s']:.1f} out tok/s against {greedy['output_tok_s']:.1f} "
              f"greedy: {abs(gap):.1%} {'slower' if gap > 0 else 'faster'} (goal: less than 15% slower)")
    common.write_json(args.output_json, {"benchmark": "throughput", "model": spec.label, "args": vars(args),
                                         "rows": rows, "summary": summary,
                                         "engines": {r["engine"]: {k: r.get(k) for k in ("details", "env", "error")}
                                                     for r in results}})


if __name__ == "__main__":
    main()
