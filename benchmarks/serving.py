"""Serving benchmark: streaming clients against an OpenAI-compatible server, and the same workload through
the offline engine in the same run, for the ratio server / offline output tokens per second.

    # recommended: the script starts `ondo serve` itself, runs the clients, stops it, then runs the same
    # requests through LLM.generate with the same engine options (goal: server >= 90% of offline)
    python benchmarks/serving.py --launch-server --offline --concurrency 32 --num-requests 64 \\
        --prompt-len 64 --max-tokens 64 --output-json serving.json
    python benchmarks/serving.py --launch-server --offline --model llama3-8b --load-format dummy \\
        --max-num-seqs 256 --concurrency 256 --num-requests 1024 --dataset sharegpt-like
    # a server that is already running (ondo, vLLM, llama.cpp's server...)
    python benchmarks/serving.py --url http://127.0.0.1:8000 --concurrency 8 --request-rate 4

Every request is a streamed /v1/completions call with `ignore_eos` and `max_tokens`, so it generates exactly
the output length the dataset gives it (checked against the usage the server reports). Prompts are random
token ids (no tokenizer needed; ids in [100, --max-token-id)) or random words (`--prompt-format words`),
from a fixed --seed. `--dataset fixed` uses --prompt-len / --max-tokens; `random` draws input and output
lengths uniformly from --input-range / --output-range (default 16-1024 and 16-512 tokens); `sharegpt-like`
draws them log-uniformly from the same ranges (mostly short requests, a long tail, as in chat logs).
Requests arrive as a Poisson process of --request-rate per second (inf = all at once), with at most
--concurrency in flight. --warmup requests (other prompts) run first and are not counted.

Reported: requests/s and output tokens/s, time to first token (TTFT), inter-token latency (ITL: the gap
between consecutive streamed chunks, one sample per gap) and end-to-end latency as p50/p90/p99; with
--goodput, the requests/s and tokens/s of the requests that met every target (a request's ITL there is its
mean gap after the first token, vLLM's TPOT). The offline row is the same requests given to `LLM.generate`
all at once (the engine's ceiling). Requests ask for vLLM's `return_token_ids`, so every chunk says which
tokens it carries and a token without text of its own still counts when it arrives: a random-weight model
over a smaller tokenizer (the dummy shapes here) draws most of its tokens beyond the tokenizer's
vocabulary, whose text is empty, and counting text alone would show their steps as gaps. A server without
that field: --no-token-ids (then --logprobs 0 makes a chunk per token, the offline run asking the same).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import httpx

import common

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case "
         "point government company number group problem fact river mountain music garden window story").split()

# Engine options given to `ondo serve` and to LLM(...) alike: (flag, EngineConfig field, type, help).
ENGINE_OPTIONS = [
    ("--dtype", "dtype", str, "auto | float32 | bfloat16 | float16"),
    ("--device", "device", str, "auto | cpu | cuda[:N]"),
    ("--quantization", "quantization", str, "int8 | int4 | nf4 | none (dequantize a GGUF)"),
    ("--max-num-seqs", "max_num_seqs", int, "requests in one step at most"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, "token budget of one step"),
    ("--prefill-tokens-while-decoding", "prefill_tokens_while_decoding", lambda v: v if v == "auto" else int(v),
     "N | auto: prompt tokens per step beside decodes (default: ondo serve's, auto; 0 = no cap)"),
    ("--max-model-len", "max_model_len", int, "context length"),
    ("--block-size", "block_size", int, "tokens per KV block"),
    ("--kv-cache-memory-bytes", "kv_cache_memory_bytes", int, "KV cache budget in bytes"),
    ("--gpu-memory-utilization", "gpu_memory_utilization", float, "share of GPU memory, in (0, 1]"),
    ("--tokenizer", "tokenizer", str, "tokenizer folder or .gguf (a dummy model of a config name has none)"),
]


# ---- the workload ----------------------------------------------------------------------------------

@dataclass
class WorkItem:
    prompt: str | list[int]
    prompt_len: int          # tokens (token-ids) or words (words)
    output_len: int          # tokens the request must generate


def draw_lengths(args: argparse.Namespace, count: int, rng: random.Random) -> list[tuple[int, int]]:
    if args.dataset == "fixed":
        return [(args.prompt_len, args.max_tokens)] * count

    def draw(low: int, high: int) -> int:
        if args.dataset == "random":
            return rng.randint(low, high)
        return min(high, int(math.exp(rng.uniform(math.log(low), math.log(high + 1)))))   # log-uniform

    return [(draw(*args.input_range), draw(*args.output_range)) for _ in range(count)]


def build_workload(args: argparse.Namespace, count: int, seed: int) -> list[WorkItem]:
    rng = random.Random(seed)
    items = []
    for prompt_len, output_len in draw_lengths(args, count, rng):
        if args.prompt_format == "words":
            prompt: str | list[int] = " ".join(rng.choice(WORDS) for _ in range(prompt_len))
        else:
            prompt = [rng.randrange(100, args.max_token_id) for _ in range(prompt_len)]
        items.append(WorkItem(prompt, prompt_len, output_len))
    return items


def arrival_times(count: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: a Poisson process (exponential gaps)."""
    if math.isinf(rate):
        return [0.0] * count
    rng, now, times = random.Random(seed + 7_000), 0.0, []
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate)
    return times


# ---- the HTTP clients ------------------------------------------------------------------------------

@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    expected_output_tokens: int
    prompt_tokens: int = 0
    output_tokens: int = 0
    chunks: int = 0          # streamed events that carried tokens
    streamed_token_ids: int = 0   # token ids the chunks listed (return_token_ids; 0 from a server without it)
    ttft_s: float = 0.0
    last_token_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def complete(self) -> bool:
        return self.ok and self.output_tokens == self.expected_output_tokens

    @property
    def mean_itl_s(self) -> float:
        return (self.last_token_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def carries_tokens(choice: dict, seen_any: bool) -> bool:
    if choice.get("token_ids") or choice.get("text") or (choice.get("logprobs") or {}).get("tokens"):
        return True
    # A model without a tokenizer sends its one chunk, empty, when the request ends.
    return not seen_any and choice.get("finish_reason") in ("length", "stop")


async def one_request(client: httpx.AsyncClient, url: str, model: str, item: WorkItem, extra: dict) -> RequestResult:
    body = {"model": model, "prompt": item.prompt, "max_tokens": item.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    body.update(extra)   # logprobs, return_token_ids
    result = RequestResult(ok=False, prompt_len=item.prompt_len, expected_output_tokens=item.output_len)
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = str(event["error"].get("message", "error"))
                    return result
                if event.get("usage"):
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                    result.output_tokens = event["usage"]["completion_tokens"]
                result.streamed_token_ids += sum(len(c.get("token_ids") or ()) for c in event.get("choices", []))
                if any(carries_tokens(choice, last is not None) for choice in event.get("choices", [])):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    result.chunks += 1
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e_s = time.perf_counter() - start
    result.last_token_s = (last - start) if last is not None else 0.0
    result.ok = last is not None
    if result.ok and result.output_tokens != item.output_len:
        result.error = f"asked for {item.output_len} tokens, the server reported {result.output_tokens}"
    return result


async def run_clients(url: str, model: str, items: list[WorkItem], arrivals: list[float], concurrency: int | None,
                      extra: dict, start_wall: float) -> tuple[list[RequestResult], float]:
    """Every request sent at its arrival time (seconds after `start_wall`, a time.time()) once a slot is
    free; (results in the order of `items`, the time.time() the last one ended)."""
    limit = asyncio.Semaphore(concurrency or len(items) or 1)
    limits = httpx.Limits(max_connections=(concurrency or len(items)) + 4, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600), limits=limits) as client:

        async def send(item: WorkItem, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start_wall + at - time.time()))
            async with limit:
                return await one_request(client, url, model, item, extra)

        results = await asyncio.gather(*(send(item, at) for item, at in zip(items, arrivals)))
        return list(results), time.time()


def _client_process(url, model, items, arrivals, concurrency, extra, start_wall):
    return asyncio.run(run_clients(url, model, items, arrivals, concurrency, extra, start_wall))


def run_all_clients(url: str, model: str, items: list[WorkItem], concurrency: int | None, rate: float, seed: int,
                    extra: dict, processes: int = 1) -> tuple[list[RequestResult], float]:
    """The workload from `processes` client processes (each with its share of the requests and of the
    concurrency), so that one Python client's SSE parsing does not cap what a fast server shows;
    (results in workload order, seconds from the common start to the last request's end)."""
    arrivals = arrival_times(len(items), rate, seed)
    processes = max(1, min(processes, len(items), concurrency or len(items)))   # each keeps >= 1 in flight
    if processes == 1:
        start_wall = time.time()
        results, end = asyncio.run(run_clients(url, model, items, arrivals, concurrency, extra, start_wall))
        return results, end - start_wall
    import multiprocessing

    shards = [list(range(i, len(items), processes)) for i in range(processes)]
    share = -(-concurrency // processes) if concurrency else None
    start_wall = time.time() + 1.0   # every process starts its clock together
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        parts = pool.starmap(_client_process, [(url, model, [items[j] for j in shard], [arrivals[j] for j in shard],
                                                share, extra, start_wall) for shard in shards])
    results: list = [None] * len(items)
    for shard, (shard_results, _) in zip(shards, parts):
        for j, result in zip(shard, shard_results):
            results[j] = result
    return results, max(end for _, end in parts) - start_wall


# ---- figures ---------------------------------------------------------------------------------------

def percentiles(values: list[float]) -> dict[str, float | None]:
    """Nearest-rank p50/p90/p99 in milliseconds."""
    if not values:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]  # noqa: E731
    return {f"p{int(q * 100)}_ms": round(pick(q) * 1000, 2) for q in (0.5, 0.9, 0.99)}


def parse_goodput(parser: argparse.ArgumentParser, specs: list[str] | None) -> dict[str, float]:
    targets = {}
    for spec in specs or []:
        name, _, value = spec.partition(":")
        if name not in ("ttft", "itl", "e2e"):
            parser.error(f"--goodput takes ttft:MS, itl:MS and/or e2e:MS, got {spec!r}")
        try:
            targets[name] = float(value)
        except ValueError:
            parser.error(f"--goodput {name} needs a number of milliseconds, got {spec!r}")
        if targets[name] <= 0:
            parser.error(f"--goodput {name} must be > 0 ms, got {value}")
    return targets


def meets(result: RequestResult, targets: dict[str, float]) -> bool:
    measured = {"ttft": result.ttft_s, "itl": result.mean_itl_s, "e2e": result.e2e_s}
    return result.complete and all(measured[name] * 1000 <= limit for name, limit in targets.items())


def summarize_server(results: list[RequestResult], elapsed_s: float, targets: dict[str, float]) -> dict:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    summary = {
        "requests": len(results), "completed": len(done), "failed": len(results) - len(done),
        "complete_length": sum(r.complete for r in results), "elapsed_s": round(elapsed_s, 3),
        "requests_per_s": round(len(done) / elapsed_s, 3), "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens, "output_tokens_per_s": round(output_tokens / elapsed_s, 2),
        "total_tokens_per_s": round((prompt_tokens + output_tokens) / elapsed_s, 2),
        "mean_chunks_per_request": round(sum(r.chunks for r in done) / len(done), 2) if done else 0,
        "ttft": percentiles([r.ttft_s for r in done]),
        "itl": percentiles([gap for r in done for gap in r.itl_s]),
        "e2e": percentiles([r.e2e_s for r in done]),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    if targets:
        good = [r for r in results if meets(r, targets)]
        summary["goodput"] = {"targets_ms": targets, "requests": len(good),
                              "requests_per_s": round(len(good) / elapsed_s, 3),
                              "output_tokens_per_s": round(sum(r.output_tokens for r in good) / elapsed_s, 2)}
    return summary


def body_extra(args: argparse.Namespace) -> dict:
    """Fields every request adds to its body."""
    extra = {} if args.no_token_ids else {"return_token_ids": True}
    if args.logprobs is not None:
        extra["logprobs"] = args.logprobs
    return extra


def print_latencies(summary: dict) -> None:
    print(f"\n{'server latency (ms)':<22}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name, label in (("ttft", "time to first token"), ("itl", "inter-token"), ("e2e", "end to end")):
        row = summary[name]
        print(f"{label:<22}" + "".join(f"{row[k] if row[k] is not None else '-':>10}" for k in ("p50_ms", "p90_ms", "p99_ms")))
    if summary["completed"] and summary["mean_chunks_per_request"] <= 1:
        print("note: one streamed chunk per request (a model without a tokenizer sends its text at the end): "
              "TTFT and ITL are not per token; --logprobs 0 makes the server stream every token")
    if "goodput" in summary:
        good = summary["goodput"]
        targets = ", ".join(f"{name} <= {limit:g} ms" for name, limit in good["targets_ms"].items())
        print(f"goodput ({targets}): {good['requests']}/{summary['requests']} requests, "
              f"{good['requests_per_s']} req/s, {good['output_tokens_per_s']} output tok/s")
    for error in summary["errors"]:
        print("error:", error)


# ---- the engine: a launched server and the offline run ---------------------------------------------

def engine_options(args: argparse.Namespace) -> dict:
    """The EngineConfig fields given on the command line (the others keep ondo's defaults on both sides)."""
    options = {fld: getattr(args, fld) for _, fld, _, _ in ENGINE_OPTIONS if getattr(args, fld) is not None}
    if args.enforce_eager:
        options["enforce_eager"] = True
    if args.no_prefix_caching:
        options["enable_prefix_caching"] = False
    return options


def serve_command(spec: common.ModelSpec, options: dict, port: int, engine_process: bool = False,
                  api_server_count: int = 1) -> list[str]:
    command = [sys.executable, "-m", "ondo", "serve", *([spec.ondo_model] if spec.ondo_model else []),
               "--host", "127.0.0.1", "--port", str(port), "--load-format", spec.load_format]
    if engine_process:
        command.append("--engine-process")
    if api_server_count > 1:
        command += ["--api-server-count", str(api_server_count)]
    flags = {fld: flag for flag, fld, _, _ in ENGINE_OPTIONS}
    for name, value in options.items():
        if name == "enforce_eager":
            command.append("--enforce-eager")
        elif name == "enable_prefix_caching":
            command.append("--no-prefix-caching")
        else:
            command += [flags[name], str(value)]
    return command


def _stop_with_parent() -> None:
    """In the server's process before it starts: SIGTERM when the benchmark dies, even killed (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # 1 = PR_SET_PDEATHSIG


class LaunchedServer:
    """`ondo serve` in a child process, on a free local port, its log in a temporary file."""

    def __init__(self, command_for_port, startup_timeout_s: float):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.command = command_for_port(port)
        self.log = tempfile.NamedTemporaryFile("w+", prefix="ondo-serve-", suffix=".log", delete=False)
        print("starting:", " ".join(self.command), f"(log: {self.log.name})", flush=True)
        started = time.perf_counter()
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT,
                                        preexec_fn=_stop_with_parent)
        try:
            self._wait_until_ready(started, startup_timeout_s)
        except BaseException:          # a failed start or Ctrl-C: leave no server behind
            self.stop()
            raise
        self.startup_s = time.perf_counter() - started

    def _wait_until_ready(self, started: float, startup_timeout_s: float) -> None:
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"ondo serve exited with status {self.process.returncode}:\n{self.log_tail()}")
            if time.perf_counter() - started > startup_timeout_s:
                raise SystemExit(f"ondo serve was not ready after {startup_timeout_s:g} s "
                                 f"(--server-timeout):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def log_tail(self, lines: int = 30) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return "".join(f.readlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def run_offline(spec: common.ModelSpec, options: dict, items: list[WorkItem], warmup: list[WorkItem],
                logprobs: int | None) -> dict:
    """The same requests through LLM.generate, all at once, after a warm-up on other prompts."""
    from ondo import LLM, SamplingParams

    def params(batch: list[WorkItem]) -> list:
        return [SamplingParams(temperature=0, max_tokens=i.output_len, ignore_eos=True, logprobs=logprobs)
                for i in batch]

    started = time.perf_counter()
    options = {"prefill_tokens_while_decoding": "auto", **options}   # as `ondo serve` defaults: like for like
    llm = LLM(model=spec.ondo_model, load_format=spec.load_format, **options)
    load_s = time.perf_counter() - started
    device = str(llm.engine.device)
    if warmup:
        llm.generate([i.prompt for i in warmup], params(warmup))
    start = common.now(device)
    outputs = llm.generate([i.prompt for i in items], params(items))
    elapsed = common.now(device) - start
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {"requests": len(items), "elapsed_s": round(elapsed, 3), "load_s": round(load_s, 2),
            "complete_length": sum(len(o.outputs[0].token_ids) == i.output_len for o, i in zip(outputs, items)),
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "requests_per_s": round(len(items) / elapsed, 3),
            "output_tokens_per_s": round(output_tokens / elapsed, 2),
            "total_tokens_per_s": round((prompt_tokens + output_tokens) / elapsed, 2),
            "env": common.environment(device)}


# ---- the command line ------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_argument_group("the server")
    where.add_argument("--launch-server", action="store_true",
                       help="start `ondo serve` with the model and engine options below, stop it when done")
    where.add_argument("--url", default=None, help="a running server's base URL, no /v1 (default http://127.0.0.1:8000)")
    where.add_argument("--served-model-name", default=None, help="model name sent (default: the server's first model)")
    where.add_argument("--server-timeout", type=float, default=900, help="seconds the launched server may take to load")
    where.add_argument("--engine-process", action="store_true",
                       help="--launch-server: run the server's engine in a process of its own (ondo serve --engine-process)")
    where.add_argument("--api-server-count", type=int, default=1,
                       help="--launch-server: API server processes over one engine process (ondo serve --api-server-count)")
    where.add_argument("--offline", action="store_true",
                       help="also run the same requests through LLM.generate (after the server part) and print "
                            "the ratio server / offline output tok/s; with --url the server keeps its memory meanwhile")
    model = parser.add_argument_group("model and engine (--launch-server and --offline)")
    model.add_argument("--model", default=None,
                       help="a config name with --load-format dummy (tiny-llama, qwen3-0.6b, llama3-8b, smollm2-135m), "
                            "an HF folder or a .gguf file; omitted = the built-in SmolLM2-135M-Instruct GGUF")
    model.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    for flag, fld, kind, text in ENGINE_OPTIONS:
        model.add_argument(flag, dest=fld, type=kind, default=None, help=text)
    model.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs or fused kernels")
    model.add_argument("--no-prefix-caching", action="store_true")
    work = parser.add_argument_group("the workload")
    work.add_argument("--dataset", choices=["fixed", "random", "sharegpt-like"], default="fixed")
    work.add_argument("--prompt-format", choices=["token-ids", "words"], default="token-ids",
                      help="token ids need no tokenizer and give exact lengths")
    work.add_argument("--prompt-len", type=int, default=64, help="fixed: prompt tokens (words with --prompt-format words)")
    work.add_argument("--max-tokens", type=int, default=128, help="fixed: tokens generated per request")
    work.add_argument("--input-range", type=int, nargs=2, default=[16, 1024], metavar=("MIN", "MAX"))
    work.add_argument("--output-range", type=int, nargs=2, default=[16, 512], metavar=("MIN", "MAX"))
    work.add_argument("--max-token-id", type=int, default=1000, help="prompt ids are drawn from [100, this)")
    work.add_argument("--num-requests", type=int, default=64)
    work.add_argument("--warmup", type=int, default=None,
                      help="requests sent first (other prompts, at most 16 new tokens each) and not counted; "
                           "default: as many as --concurrency allows in flight, at most 256, so that every batch "
                           "size the run meets has run once")
    work.add_argument("--concurrency", type=int, default=8, help="requests in flight at most; 0 = no cap")
    work.add_argument("--request-rate", type=float, default=math.inf,
                      help="Poisson arrivals, requests per second (default inf: all at once)")
    work.add_argument("--logprobs", type=int, default=None, help="sent with every request (and offline)")
    work.add_argument("--no-token-ids", action="store_true",
                      help="do not ask for return_token_ids (a server without vLLM's field)")
    work.add_argument("--goodput", nargs="+", metavar="NAME:MS",
                      help="targets a request must meet to count: ttft:MS itl:MS e2e:MS")
    work.add_argument("--client-processes", type=int, default=1,
                      help="client processes sharing the requests and the concurrency, so that one Python "
                           "client's SSE parsing does not cap the figure")
    work.add_argument("--seed", type=int, default=0, help="seeds the prompts, lengths and arrivals")
    parser.add_argument("--output-json", default=None, help="write every figure and the options here")
    args = parser.parse_args(argv)
    common.check_positive(parser, args, "num-requests", "prompt-len", "max-tokens")
    if args.warmup is None:
        args.warmup = min(args.concurrency or args.num_requests, args.num_requests, 256)
    for name in ("concurrency", "warmup"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not args.request_rate > 0:
        parser.error(f"--request-rate must be > 0 (inf = all at once), got {args.request_rate}")
    for name in ("input_range", "output_range"):
        low, high = getattr(args, name)
        if not 1 <= low <= high:
            parser.error(f"--{name.replace('_', '-')} must be 1 <= MIN <= MAX, got {low} {high}")
    if args.max_token_id <= 100:
        parser.error(f"--max-token-id must be > 100, got {args.max_token_id}")
    if args.launch_server and args.url:
        parser.error("give --launch-server or --url, not both")
    args.goodput_targets = parse_goodput(parser, args.goodput)
    return args


def main() -> None:
    args = parse_args()
    spec = common.resolve_model(args.model, args.load_format) if (args.launch_server or args.offline) else None
    options = engine_options(args)
    items = build_workload(args, args.num_requests, args.seed)
    warmup = [WorkItem(i.prompt, i.prompt_len, min(i.output_len, 16))
              for i in build_workload(args, args.warmup, args.seed + 10_000)]
    server = LaunchedServer(lambda port: serve_command(spec, options, port, args.engine_process, args.api_server_count), args.server_timeout) \
        if args.launch_server else None
    try:
        url = server.url if server else (args.url or "http://127.0.0.1:8000").rstrip("/")
        try:
            card = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
        except httpx.HTTPError as exc:
            raise SystemExit(f"no server answers at {url} ({type(exc).__name__}): start one, or pass --launch-server")
        name = args.served_model_name or card["id"]
        longest = max(i.prompt_len + i.output_len for i in items + warmup)
        if card.get("max_model_len") and longest > card["max_model_len"] and args.prompt_format == "token-ids":
            raise SystemExit(f"the workload needs up to {longest} tokens per request but the server's context "
                             f"holds {card['max_model_len']}: raise --max-model-len or lower the lengths")
        cap = args.concurrency or None
        print(f"server ready{f' after {server.startup_s:.1f} s' if server else ''}; warm-up: {len(warmup)} requests",
              flush=True)
        if warmup:
            run_all_clients(url, name, warmup, min(cap or len(warmup), len(warmup)), math.inf,
                            args.seed, body_extra(args), args.client_processes)
        print(f"timed run: {len(items)} requests", flush=True)
        results, elapsed = run_all_clients(url, name, items, cap, args.request_rate, args.seed, body_extra(args),
                                           args.client_processes)
    finally:
        if server:
            server.stop()
    summary = summarize_server(results, elapsed, args.goodput_targets)
    print(f"server: {summary['output_tokens_per_s']} output tok/s" + ("; offline run next" if args.offline else ""),
          flush=True)
    offline = run_offline(spec, options, items, warmup, args.logprobs) if args.offline else None

    clients = f"{args.concurrency or 'all'} in flight, rate {args.request_rate:g}/s"
    rows = [{"run": f"server ({clients})", **summary}]
    if offline:
        rows.append({"run": "offline LLM.generate (all at once)", **offline, "completed": offline["requests"]})
    common.print_table(f"{card['id']}: {args.num_requests} requests, dataset {args.dataset}, prompts as {args.prompt_format}",
                       rows, [("run", "run"), ("completed", "done"), ("complete_length", "full length"),
                              ("output_tokens", "out tokens"), ("elapsed_s", "seconds"),
                              ("requests_per_s", "req/s"), ("output_tokens_per_s", "out tok/s"),
                              ("total_tokens_per_s", "total tok/s")])
    print_latencies(summary)
    ratio = None
    if offline and offline["output_tokens_per_s"]:
        ratio = round(summary["output_tokens_per_s"] / offline["output_tokens_per_s"], 3)
        print(f"\nserver / offline output tok/s: {summary['output_tokens_per_s']} / {offline['output_tokens_per_s']} "
              f"= {ratio:.1%} (goal: >= 90%)")
    settings = {k: v for k, v in vars(args).items() if k not in ("output_json", "goodput_targets")}
    common.write_json(args.output_json, {
        "benchmark": "serving", "settings": settings | {"request_rate": str(args.request_rate)},
        "model": card["id"], "url": url, "host": platform.node(), "engine_options": options,
        "server_command": server.command if server else None,
        "server_startup_s": round(server.startup_s, 2) if server else None,
        "server": summary, "offline": offline, "server_over_offline_output_tok_s": ratio,
        "per_request": [asdict(r) | {"itl_s": None, "mean_itl_s": r.mean_itl_s, "complete": r.complete}
                        for r in results]})
    if summary["failed"] or summary["complete_length"] < summary["requests"]:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("ONDO_NO_PROGRESS", "1")
    main()
