"""Prometheus metrics for GET /metrics.

Engine state (running and waiting requests, KV-cache use, prefix-cache hit rate, free blocks) is
read at scrape time from the engine thread's latest stats snapshot; request counters and latency
histograms are updated as outputs stream by. Each app owns its registry, so several servers can
live in one process (tests).

With several API server processes (`ondo serve --api-server-count N`) each process counts the
requests it serves, so the counters and histograms use Prometheus' multiprocess mode
(`share_between_processes`): every process writes them to files in one folder and a scrape,
whichever process answers it, sums them all. The engine gauges come from the one core and are the
same in every process.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from ondo.outputs import RequestOutput

_TTFT_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS_S = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)

# Engine.stats() key -> (metric name, help).
_ENGINE_GAUGES = {
    "num_running": ("ondo_num_requests_running", "Requests being generated (in the running batch)."),
    "num_waiting": ("ondo_num_requests_waiting", "Requests waiting to be scheduled."),
    "kv_cache_usage": ("ondo_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1)."),
    "prefix_cache_hit_rate": ("ondo_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache (0..1)."),
    "num_free_blocks": ("ondo_kv_cache_free_blocks", "KV-cache blocks free (cached prefix blocks count as free)."),
    "num_total_blocks": ("ondo_kv_cache_total_blocks", "KV-cache blocks in all."),
}


class _EngineStatsCollector(Collector):
    def __init__(self, read_stats: Callable[[], dict]) -> None:
        self._read_stats = read_stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._read_stats()
        for key, (name, help_text) in _ENGINE_GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(name, help_text, value=float(stats[key]))


def share_between_processes(folder: str) -> None:
    """Count in Prometheus' multiprocess mode, in `folder` (empty, shared by the API server processes).
    prometheus_client chooses its value class from PROMETHEUS_MULTIPROC_DIR when it is imported: the
    processes started after this inherit the variable, and this process switches now, before it
    creates any metric."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    values.ValueClass = values.MultiProcessValue()


class ServerMetrics:
    def __init__(self, read_stats: Callable[[], dict]) -> None:
        self._engine_stats = _EngineStatsCollector(read_stats)
        self.registry = CollectorRegistry()
        self.registry.register(self._engine_stats)
        self._shared_folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.prompt_tokens = Counter("ondo_prompt_tokens", "Prompt tokens processed.",
                                     registry=self.registry)
        self.generation_tokens = Counter("ondo_generation_tokens", "Tokens generated.",
                                         registry=self.registry)
        # One count per request (one prompt of an API call), like the latency histograms; a request
        # with n > 1 choices also counts each choice in ondo_choices_finished.
        self.requests_finished = Counter(
            "ondo_requests_finished", "Requests finished, by finish reason (abort: the client left or the server "
            "stopped; with several choices: error if any failed, else abort if any was cut, else the first "
            "choice's reason).", ["finish_reason"], registry=self.registry)
        self.choices_finished = Counter(
            "ondo_choices_finished", "Choices (sequences returned) finished, by finish reason.",
            ["finish_reason"], registry=self.registry)
        self.ttft = Histogram("ondo_time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=_TTFT_BUCKETS_S, registry=self.registry)
        self.time_per_token = Histogram("ondo_time_per_output_token_seconds",
                                        "Time between output tokens after the first.",
                                        buckets=_TOKEN_BUCKETS_S, registry=self.registry)
        self.e2e_latency = Histogram("ondo_e2e_request_latency_seconds", "Time from arrival to the last token.",
                                     buckets=_E2E_BUCKETS_S, registry=self.registry)

    def render(self) -> bytes:
        if self._shared_folder is None:
            return generate_latest(self.registry)
        every_process = CollectorRegistry()   # the counters and histograms of all API server processes
        MultiProcessCollector(every_process, self._shared_folder)
        every_process.register(self._engine_stats)
        return generate_latest(every_process)

    def track(self) -> "RequestTracker":
        return RequestTracker(self)


class RequestTracker:
    """Follows the outputs of one engine request and records its counters and latencies."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._arrival_s = time.perf_counter()
        self._last_token_s: float | None = None
        self._prompt_counted = False
        self._done = False

    def observe(self, output: RequestOutput) -> None:
        now = time.perf_counter()
        m = self._metrics
        if not self._prompt_counted:
            m.prompt_tokens.inc(len(output.prompt_token_ids))
            self._prompt_counted = True
        new_tokens = sum(len(c.token_ids_delta) for c in output.outputs)
        if new_tokens:
            m.generation_tokens.inc(new_tokens)
            if self._last_token_s is None:
                m.ttft.observe(now - self._arrival_s)
            else:
                # The sequences of one request advance side by side: each new token of a
                # sequence took its share of the time since the previous output.
                interval_s = now - self._last_token_s
                for completion in output.outputs:
                    for _ in completion.token_ids_delta:
                        m.time_per_token.observe(interval_s / len(completion.token_ids_delta))
            self._last_token_s = now
        if output.finished and not self._done:
            self._done = True
            m.e2e_latency.observe(now - self._arrival_s)
            reasons = [completion.finish_reason or "abort" for completion in output.outputs] or ["abort"]
            for reason in reasons:
                m.choices_finished.labels(reason).inc()
            m.requests_finished.labels(_request_reason(reasons)).inc()

    def close_unfinished(self) -> None:
        """The request ended without a finished output (client gone, shutdown): count an abort."""
        if not self._done:
            self._done = True
            self._metrics.requests_finished.labels("abort").inc()
            self._metrics.choices_finished.labels("abort").inc()


def _request_reason(reasons: list[str]) -> str:
    for worst in ("error", "abort"):
        if worst in reasons:
            return worst
    return reasons[0]
