"""Serving benchmark: many streaming clients against a running OpenAI-compatible server.

    ondo serve --port 8000 &
    python benchmarks/serving.py --url http://127.0.0.1:8000 --concurrency 8 --num-requests 64 \
        --output-json serving.json

Each client sends a streamed /v1/completions request (fixed-seed synthetic prompts, `ignore_eos` so
every request generates exactly --max-tokens), waits for it to finish, and sends the next, until
--num-requests are done; --warmup requests run first and are not counted. Reported: requests/s and
output tokens/s over the whole run, time to first token (TTFT), inter-token latency (ITL: the gap
between consecutive streamed tokens, one sample per gap) and end-to-end latency, as p50/p90/p99.
Works against any server that speaks the API (ondo, vLLM, llama.cpp's server with --url and --model).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import time
from dataclasses import asdict, dataclass, field

import httpx

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case "
         "point government company number group problem fact river mountain music garden window story").split()


@dataclass
class RequestResult:
    ok: bool
    prompt_words: int
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""


def make_prompts(count: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(count)]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    result = RequestResult(ok=False, prompt_words=len(prompt.split()))
    start = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = event["error"].get("message", "error")
                    return result
                if event.get("usage"):
                    result.output_tokens = event["usage"]["completion_tokens"]
                if any(choice.get("text") for choice in event.get("choices", [])):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    chunks += 1
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e_s = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = last is not None
    return result


async def run_clients(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> list[RequestResult]:
    queue: asyncio.Queue = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                results.append(await one_request(client, url, model, queue.get_nowait(), max_tokens))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def percentiles(values: list[float]) -> dict[str, float | None]:
    """Nearest-rank p50/p90/p99 in milliseconds."""
    if not values:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]  # noqa: E731
    return {f"p{int(q * 100)}_ms": round(pick(q) * 1000, 2) for q in (0.5, 0.9, 0.99)}


def summarize(results: list[RequestResult], elapsed_s: float) -> dict:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "requests": len(results), "completed": len(done), "failed": len(results) - len(done),
        "elapsed_s": round(elapsed_s, 3),
        "requests_per_s": round(len(done) / elapsed_s, 3),
        "output_tokens": output_tokens,
        "output_tokens_per_s": round(output_tokens / elapsed_s, 2),
        "ttft": percentiles([r.ttft_s for r in done]),
        "itl": percentiles([gap for r in done for gap in r.itl_s]),
        "e2e": percentiles([r.e2e_s for r in done]),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def print_table(summary: dict) -> None:
    print(f"\nrequests {summary['completed']}/{summary['requests']} in {summary['elapsed_s']} s  "
          f"->  {summary['requests_per_s']} req/s, {summary['output_tokens_per_s']} output tok/s")
    print(f"{'latency (ms)':<16}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name, label in (("ttft", "time to first"), ("itl", "inter-token"), ("e2e", "end to end")):
        row = summary[name]
        print(f"{label:<16}" + "".join(f"{row[k] if row[k] is not None else '-':>10}" for k in ("p50_ms", "p90_ms", "p99_ms")))
    for error in summary["errors"]:
        print("error:", error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL (no /v1)")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending at the same time")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2, help="requests sent first and not counted")
    parser.add_argument("--prompt-words", type=int, default=64, help="words per synthetic prompt")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    parser.add_argument("--output-json", default=None, help="write the summary and settings here")
    args = parser.parse_args()
    if args.concurrency < 1 or args.num_requests < 1:
        parser.error("--concurrency and --num-requests must be >= 1")

    url = args.url.rstrip("/")
    model = args.model or httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    prompts = make_prompts(args.warmup + args.num_requests, args.prompt_words, args.seed)
    if args.warmup:
        asyncio.run(run_clients(url, model, prompts[:args.warmup], min(args.concurrency, args.warmup), args.max_tokens))
    start = time.perf_counter()
    results = asyncio.run(run_clients(url, model, prompts[args.warmup:], args.concurrency, args.max_tokens))
    summary = summarize(results, time.perf_counter() - start)
    print_table(summary)
    if args.output_json:
        settings = {k: v for k, v in vars(args).items() if k != "output_json"} | {"model": model, "url": url}
        record = {"benchmark": "serving", "settings": settings, "host": platform.node(), **summary,
                  "per_request": [asdict(r) | {"itl_s": None} for r in results]}
        with open(args.output_json, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main()
