"""The host's share of a constrained decode step: filling the token masks of a batch and advancing
its matchers, with ondo's grammar library (llguidance) and, side by side, xgrammar when installed.

    python benchmarks/grammar_masks.py --rows 64 --steps 64 --output-json out.json
    python benchmarks/grammar_masks.py --threads 1,4,8 --lanes 1,8,16 --peer none   # ondo's fill threads x lanes

Every row follows benchmarks/structured.py's JSON schemas over the built-in model's vocabulary and is
stepped with a token its mask allows, drawn at random with one seed for both libraries (a random
walk keeps the rows in the costly states a random-weight model reaches; a real model's output is
often cheaper). No model runs: this is the cost that the GPU's forward must hide at every step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import common
from structured import WORKLOADS

COLUMNS = [("workload", "workload"), ("library", "library"), ("threads", "threads"), ("lanes", "lanes"),
           ("fill_ms", "fill ms/step"), ("accept_ms", "accept ms/step"), ("vs_ondo", "fill vs ondo")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="sequences in the batch")
    parser.add_argument("--steps", type=int, default=64, help="tokens each row advances")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer", choices=["xgrammar", "none"], default="xgrammar",
                        help="also measure xgrammar (skipped with a note when it is not installed)")
    parser.add_argument("--threads", default=None,
                        help="comma-separated fill thread counts to measure ondo at (default: its own choice)")
    parser.add_argument("--lanes", default=None,
                        help="comma-separated grammar lane counts to measure ondo at (default: its own choice; "
                             "1 = every row copies one compiled matcher and shares its lexer's lock)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    if args.rows < 1 or args.steps < 1:
        parser.error("--rows and --steps must be >= 1")
    return args


def walk(fill, accept, vocab: int, steps: int, seed: int) -> tuple[float, float]:
    """Mean ms per step of `fill() -> bitmask` (allocation included) and of `accept(tokens)` over a
    random walk of allowed tokens: the mean, since a few costly steps (inside bounded strings) weigh
    on a run's time as much as many cheap ones."""
    rng = np.random.default_rng(seed)
    fills, accepts = [], []
    for _ in range(steps):
        start = time.perf_counter()
        bitmask = fill()
        fills.append(time.perf_counter() - start)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        tokens = [int(rng.choice(np.flatnonzero(row))) for row in bits]
        start = time.perf_counter()
        accept(tokens)
        accepts.append(time.perf_counter() - start)
    return statistics.fmean(fills) * 1e3, statistics.fmean(accepts) * 1e3


def ondo_rows(hf, vocab: int, eos: list[int], schema: dict, args) -> list[dict]:
    """ondo at its own thread and lane counts, or at each of --threads x --lanes."""
    from ondo.sample import grammar_cache, structured

    threads = [int(t) for t in args.threads.split(",")] if args.threads else [structured.MASK_THREADS]
    lanes = [int(n) for n in args.lanes.split(",")] if args.lanes else [grammar_cache.LANES]
    saved = structured.MASK_THREADS, grammar_cache.LANES
    rows = []
    try:
        for thread_count in threads:
            for lane_count in lanes:
                structured.MASK_THREADS, grammar_cache.LANES = thread_count, lane_count
                structured._executor = None   # rebuilt with thread_count threads
                rows.append(ondo_row(hf, vocab, eos, schema, args))
    finally:
        structured.MASK_THREADS, grammar_cache.LANES = saved
        structured._executor = None
    return rows


def ondo_row(hf, vocab: int, eos: list[int], schema: dict, args) -> dict:
    from ondo.sample import grammar_cache
    from ondo.sample.grammar_cache import GrammarCache
    from ondo.sample.structured import MASK_THREADS, StructuredOutputsParams, fill_bitmask

    cache = GrammarCache(hf, vocab, eos)
    constraint = StructuredOutputsParams(json=schema)
    cache.compile_now(constraint)
    states = [cache.new_state(constraint) for _ in range(args.rows)]
    for state in states:
        state.lane.result()   # every lane compiled before the walk (a lane still compiling would give way)

    def accept(tokens):
        for state, token in zip(states, tokens):
            state.accept(token)

    fill_ms, accept_ms = walk(lambda: fill_bitmask(states, vocab), accept, vocab, args.steps, args.seed)
    cache.shutdown()
    from importlib.metadata import version

    return {"library": f"ondo (llguidance {version('llguidance')})", "threads": MASK_THREADS,
            "lanes": grammar_cache.LANES, "fill_ms": fill_ms, "accept_ms": accept_ms}


def xgrammar_row(hf, vocab: int, eos: list[int], schema: dict, args) -> dict:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=eos)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(schema, any_whitespace=False)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(args.rows)]
    from ondo.sample.structured import MASK_THREADS

    batch = xgr.BatchGrammarMatcher(max_threads=MASK_THREADS)   # the same threads as ondo's

    def fill():
        bitmask = torch.zeros(args.rows, (vocab + 31) // 32, dtype=torch.int32)
        batch.batch_fill_next_token_bitmask(matchers, bitmask)
        return bitmask

    def accept(tokens):
        for matcher, token in zip(matchers, tokens):
            matcher.accept_token(token)

    fill_ms, accept_ms = walk(fill, accept, vocab, args.steps, args.seed)
    from importlib.metadata import version

    return {"library": f"xgrammar {version('xgrammar')}", "threads": MASK_THREADS, "fill_ms": fill_ms, "accept_ms": accept_ms}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    gguf = common.builtin_gguf_path()
    hf = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    vocab, eos = len(hf), [hf.eos_token_id]
    peers = []
    if args.peer == "xgrammar":
        try:
            import xgrammar  # noqa: F401
            peers.append(xgrammar_row)
        except ImportError:
            print("xgrammar is not installed: measuring ondo alone (pip install xgrammar for the comparison)")
    rows = []
    for workload, schema in WORKLOADS.items():
        if schema is None:
            continue
        measured = [dict(workload=workload, **row) for row in ondo_rows(hf, vocab, eos, schema, args)]
        measured += [dict(workload=workload, **peer(hf, vocab, eos, schema, args)) for peer in peers]
        for row in measured:
            row["vs_ondo"] = row["fill_ms"] / measured[0]["fill_ms"]
        rows.extend(measured)
    common.print_table(f"Token masks: {args.rows} rows, {args.steps} steps each, vocabulary {vocab}", rows, COLUMNS)
    payload = {"benchmark": "grammar_masks", "rows": rows, "args": vars(args),
               "environment": common.environment("cpu")}
    common.write_json(args.output_json, payload)
    return payload


if __name__ == "__main__":
    main()
