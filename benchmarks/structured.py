"""Structured output: what a JSON-schema grammar costs at decode time, and how long schemas take to compile.

    python benchmarks/structured.py                                   # the built-in GGUF, batch 64, on the CPU
    python benchmarks/structured.py --device cuda --batch-size 64 --output-len 128 --output-json out.json
    python benchmarks/structured.py --model qwen3-0.6b --load-format dummy --device cuda   # tokenizer: built-in's
    python benchmarks/structured.py --device cuda --no-async-scheduling   # every step synchronous, to compare

Throughput: --batch-size requests given at once, each yielding exactly --output-len tokens, in
--num-iters rounds (median reported; the workloads alternate within a round, so a machine whose load
changes skews them alike): unconstrained (EOS ignored) and under a structure-heavy JSON schema (an array of at least 1000
{"name", "age", "tags"} objects, so no request can finish early), with and without length bounds on
its strings and arrays; the gap is the grammar's cost (bitmask fill on the host, one copy, the mask on
the device, and the wait for the host's grammar work where the device has no forward queued: on a GPU
the next step's forward is launched before the tokens are read, engine/in_flight.py). Compile time: the p50 of
compiling --num-schemas distinct schemas against the vocabulary (fresh), then of asking for each again
(cached: an LRU hit). Random-weight models have no tokenizer: --tokenizer (default the built-in GGUF's)
gives one; a larger model vocabulary is masked beyond the tokenizer's.
"""
from __future__ import annotations

import argparse
import statistics
import time

import common

COLUMNS = [("workload", "workload"), ("requests", "requests"), ("output_tokens", "out tokens"),
           ("elapsed_s", "seconds"), ("output_tok_s", "out tok/s"), ("vs_unconstrained", "vs unconstrained")]
ITEM = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
        "required": ["name", "age", "tags"]}
LONG_SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "items": ITEM, "minItems": 1000}},
               "required": ["people"]}
# The same shape without length bounds: masks inside a bounded string cost the most.
FREE_ITEM = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                              "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}}},
             "required": ["name", "age", "tags"]}
FREE_SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "items": FREE_ITEM, "minItems": 1000}},
               "required": ["people"]}
WORKLOADS = {"unconstrained": None, "json schema": LONG_SCHEMA, "json schema, unbounded strings": FREE_SCHEMA}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(parser)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or .gguf (default: the model's; the "
                                                          "built-in GGUF's for random-weight configs)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-schemas", type=int, default=20, help="distinct schemas compiled for the p50")
    parser.add_argument("--num-iters", type=int, default=3,
                        help="timed rounds, the workloads alternating within each; the median is reported")
    parser.add_argument("--no-async-scheduling", action="store_true",
                        help="run every step synchronously (none launched ahead), for comparison")
    args = parser.parse_args(argv)
    common.check_positive(parser, args, "batch-size", "output-len", "num-schemas", "num-iters", "threads",
                          "max-model-len")
    return args


def load(args: argparse.Namespace):
    from ondo import LLM

    common.set_threads(args.threads)
    spec = common.resolve_model(args.model, args.load_format)
    tokenizer = args.tokenizer or (str(common.builtin_gguf_path()) if spec.kind == "dummy" else None)
    options = dict(device=args.device, dtype=args.dtype, load_format=spec.load_format,
                   max_num_seqs=args.batch_size, max_model_len=args.max_model_len or 512,
                   enforce_eager=args.enforce_eager, seed=args.seed)
    if args.no_async_scheduling:
        options["async_scheduling"] = False
    if tokenizer:
        options["tokenizer"] = tokenizer
    if args.max_num_batched_tokens:
        options["max_num_batched_tokens"] = args.max_num_batched_tokens
    start = time.perf_counter()
    llm = LLM(model=spec.ondo_model, **options)
    if llm.engine.tokenizer is None and tokenizer:   # random-weight configs load without one
        from ondo.tokenizer.tokenizer import load_tokenizer

        llm.engine.tokenizer = load_tokenizer(tokenizer)
    return llm, spec, time.perf_counter() - start


def throughput(llm, device: str, args: argparse.Namespace, workload: str, offset: int) -> dict:
    from ondo import SamplingParams
    from ondo.sampling_params import StructuredOutputsParams

    schema = WORKLOADS[workload]
    shape = StructuredOutputsParams(json=schema) if schema is not None else None
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True, structured_outputs=shape)
    # Distinct chat prompts per run, so the prefix cache serves nothing but the shared template.
    texts = [f"List people as JSON (#{offset + i})." for i in range(args.batch_size)]
    if llm.tokenizer.chat_template is not None:
        texts = [llm.tokenizer.render_chat([{"role": "user", "content": text}]) for text in texts]
    launched_ahead = llm.engine.num_steps_launched_ahead
    start = common.now(device)
    outputs = llm.generate(texts, params)
    elapsed = common.now(device) - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    cut = sum(o.outputs[0].finish_reason == "length" for o in outputs)
    return {"workload": workload, "requests": len(outputs),
            "output_tokens": tokens, "elapsed_s": elapsed, "output_tok_s": tokens / elapsed,
            "all_ran_to_output_len": cut == len(outputs),
            # steps launched before the previous step's tokens were read: about output_len with async scheduling
            "steps_launched_ahead": llm.engine.num_steps_launched_ahead - launched_ahead}


def compile_times(llm, count: int) -> dict:
    from ondo.sample.grammar_cache import GrammarCache
    from ondo.sampling_params import StructuredOutputsParams

    engine = llm.engine
    cache = GrammarCache(engine.tokenizer.hf, engine.vocab_size, list(engine.eos_token_ids))
    constraints = [StructuredOutputsParams(json={**LONG_SCHEMA, "required": [f"people_{i}"], "properties": {
        f"people_{i}": LONG_SCHEMA["properties"]["people"], "note": {"type": "string", "maxLength": i + 1}}})
        for i in range(count)]
    fresh, cached = [], []
    for constraint in constraints:
        start = time.perf_counter()
        cache.compile_now(constraint)
        fresh.append(time.perf_counter() - start)
    for constraint in constraints:
        start = time.perf_counter()
        cache.compile_now(constraint)
        cached.append(time.perf_counter() - start)
    cache.shutdown()
    return {"num_schemas": count, "compile_fresh_p50_ms": statistics.median(fresh) * 1e3,
            "compile_fresh_max_ms": max(fresh) * 1e3, "compile_cached_p50_ms": statistics.median(cached) * 1e3,
            "cache_hits": cache.hits, "cache_misses": cache.misses}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    llm, spec, load_s = load(args)
    # Warm-up: kernels, the grammar machinery and the schema's compile, outside the timed runs.
    warm = argparse.Namespace(**{**vars(args), "batch_size": min(4, args.batch_size), "output_len": 4})
    for index, workload in enumerate(WORKLOADS):
        throughput(llm, device, warm, workload, 10_000 * (index + 1))
    # Alternating rounds: a machine whose load changes during the run skews every workload alike.
    rounds = [[throughput(llm, device, args, workload, 1_000 * (10 * round_ + index))
               for index, workload in enumerate(WORKLOADS)] for round_ in range(args.num_iters)]
    rows = []
    for index in range(len(WORKLOADS)):
        runs = [r[index] for r in rounds]
        row = dict(runs[0], elapsed_s=statistics.median(run["elapsed_s"] for run in runs))
        row["output_tok_s"] = row["output_tokens"] / row["elapsed_s"]
        row["elapsed_s_all"] = [run["elapsed_s"] for run in runs]
        rows.append(row)
    for row in rows:
        row["vs_unconstrained"] = row["output_tok_s"] / rows[0]["output_tok_s"]
    compile_figures = compile_times(llm, args.num_schemas)
    common.print_table(f"Structured output on {spec.label} ({device}, batch {args.batch_size}, "
                       f"{args.output_len} tokens each)", rows, COLUMNS)
    for row in rows[1:]:
        print(f"\ngrammar overhead ({row['workload']}): {100 * (1 - row['vs_unconstrained']):.1f}% of "
              f"unconstrained output tok/s")
    print(f"schema compile p50: fresh {compile_figures['compile_fresh_p50_ms']:.1f} ms, "
          f"cached {compile_figures['compile_cached_p50_ms']:.3f} ms ({args.num_schemas} schemas)")
    print("steps launched ahead per run: " + ", ".join(
        f"{row['workload']} {row['steps_launched_ahead']}" for row in rows))
    from ondo.sample.grammar_cache import LANES
    from ondo.sample.structured import MASK_THREADS

    payload = {"benchmark": "structured", "model": spec.label, "load_s": load_s, "rows": rows,
               "async_scheduling": llm.engine.async_scheduling, "grammar_lanes": LANES, "mask_threads": MASK_THREADS,
               "grammar_overhead_pct": {row["workload"]: 100 * (1 - row["vs_unconstrained"]) for row in rows[1:]},
               **compile_figures,
               "args": {k: v for k, v in vars(args).items() if not k.startswith("child")},
               "environment": common.environment(device), **common.device_memory(device)}
    common.write_json(args.output_json, payload)
    return payload


if __name__ == "__main__":
    main()
