"""Single-request latency: time to first token (TTFT) and decode speed of one request alone, greedy,
EOS ignored, random prompt token ids (fixed seed, fresh ones for every iteration).

    python benchmarks/latency.py --model smollm2-135m --load-format dummy --prompt-len 128 --output-len 128 \\
        --threads 2 --peer hf
    python benchmarks/latency.py --model qwen3-0.6b --load-format dummy --prompt-len 128 --output-len 256 \\
        --ttft-prompt-len 2048 --peer hf --output-json latency.json       # on a GPU

ondo runs through its Engine step loop: TTFT is the time from add_request to the step that hands back the
first token, decode tok/s counts the tokens after the first over the time after it. transformers runs one
`generate` call with a streamer that stamps every token (after a device sync); llama.cpp (--peer llamacpp,
GGUF only) runs `Llama.generate` after `reset()`. --ttft-prompt-len adds TTFT-only runs (one new token)
at longer prompts. Each engine runs in its own child process; the median of --num-iters is reported.
"""
from __future__ import annotations

import argparse

import common

COLUMNS = [("engine", "engine"), ("prompt_len", "prompt"), ("output_tokens", "new tokens"),
           ("ttft_ms", "TTFT ms"), ("decode_tok_s", "decode tok/s"), ("vs_ondo", "speed vs ondo"),
           ("e2e_s", "end-to-end s"), ("load_s", "load s"), ("peak_rss_mb", "peak RSS MB")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(parser)
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="ondo: split the model over N GPUs (one worker process each)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--ttft-prompt-len", type=int, action="append", default=[],
                        help="also measure TTFT alone (one new token) at this prompt length (repeatable)")
    parser.add_argument("--num-iters", type=int, default=3, help="timed iterations (the median is reported)")
    parser.add_argument("--peer", action="append", choices=["hf", "llamacpp"], default=[],
                        help="also run a peer on the same prompts (repeatable)")
    args = parser.parse_args(argv)
    common.check_positive(parser, args, "prompt-len", "output-len", "num-iters", "threads", "max-num-seqs",
                          "max-model-len", "tensor-parallel-size")
    for length in args.ttft_prompt_len:
        if length < 1:
            parser.error(f"--ttft-prompt-len must be >= 1, got {length}")
    return args


def run_engine(args: argparse.Namespace, engine: str) -> dict:
    spec = common.resolve_model(args.model, args.load_format)
    longest = max([args.prompt_len + args.output_len] + [n + 1 for n in args.ttft_prompt_len])
    runner = common.build_runner(engine, args, spec, max_model_len=args.max_model_len or common.round_up(longest),
                                 max_num_seqs=args.max_num_seqs or 1)
    rows = measure(runner, engine, args, runner.vocab_size)
    return {"engine": engine, "rows": common.finish_rows(rows, runner), "details": runner.details,
            "env": common.environment(runner.device)}


def measure(runner, engine: str, args: argparse.Namespace, vocab: int) -> list[dict]:
    """A short warm-up request, then --num-iters timed requests per prompt length."""
    runner.latency(common.random_prompts(1, args.prompt_len, vocab, args.seed + 10_000)[0], min(args.output_len, 8))
    rows = [_measure(runner, engine, args.prompt_len, args.output_len, vocab, args.seed, args.num_iters)]
    for length in args.ttft_prompt_len:
        rows.append(_measure(runner, engine, length, 1, vocab, args.seed + 1_000, args.num_iters))
    return rows


def _measure(runner, engine: str, prompt_len: int, output_len: int, vocab: int, seed: int, iterations: int) -> dict:
    runs = [runner.latency(common.random_prompts(1, prompt_len, vocab, seed + i)[0], output_len)
            for i in range(iterations)]
    decode = [r["decode_tok_s"] for r in runs if r["decode_tok_s"] is not None]
    return {"engine": engine, "prompt_len": prompt_len, "output_tokens": runs[0]["output_tokens"],
            "ttft_ms": common.median([r["ttft_ms"] for r in runs]),
            "decode_tok_s": common.median(decode) if decode else None,
            "e2e_s": common.median([r["e2e_s"] for r in runs]), "iterations": runs}


def main() -> None:
    args = parse_args()
    spec = common.resolve_model(args.model, args.load_format)
    engines = common.engines_for(args, spec)
    results = common.run_engines(args, engines, run_engine)
    rows = [row for result in results
            for row in result.get("rows", [{"engine": result["engine"], "error": result.get("error")}])]
    for prompt_len in sorted({r.get("prompt_len") for r in rows if r.get("prompt_len")}):
        same = [r for r in rows if r.get("prompt_len") == prompt_len]
        if same[0].get("decode_tok_s"):
            common.add_ratios(same, "decode_tok_s")
        else:
            common.add_ratios(same, "ttft_ms", lower_is_better=True)
    title = f"{spec.label}: one request, greedy, threads {args.threads or 'default'}"
    common.print_table(title, rows, COLUMNS)
    common.write_json(args.output_json, {"benchmark": "latency", "model": spec.label, "args": vars(args),
                                         "rows": rows,
                                         "engines": {r["engine"]: {k: r.get(k) for k in ("details", "env", "error")}
                                                     for r in results}})


if __name__ == "__main__":
    main()
