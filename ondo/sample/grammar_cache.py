"""Compiling constraints against the model's vocabulary, once per constraint.

Compiling a JSON schema for a 50k-token vocabulary takes ~0.1-0.3 s (xgrammar precomputes which
tokens each grammar position allows). The engine waits for it when the request is added (`check`),
so that a constraint the vocabulary cannot write is refused then; compiles run on a small thread
pool, so a compile that never ends fails its request after COMPILE_TIMEOUT_S instead of holding the
engine. Compiled grammars are kept in an LRU keyed by (kind, constraint text): a repeated schema
costs a dictionary lookup. A compile that failed is not kept.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ondo.sample.structured import JSON_ANY_WHITESPACE, GrammarState, StructuredOutputsParams, fill_bitmask

DEFAULT_CACHE_SIZE = 256


class GrammarCache:
    """`submit(constraint) -> Future[CompiledGrammar]` for one tokenizer and vocabulary size."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
                 capacity: int = DEFAULT_CACHE_SIZE, max_workers: int = 2) -> None:
        import xgrammar as xgr

        self.stop_token_ids = sorted(stop_token_ids)
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=self.stop_token_ids or None)
        # xgrammar's own cache is off: this LRU is the one cache, so its counters tell the truth.
        self._compiler = xgr.GrammarCompiler(info, max_threads=max_workers, cache_enabled=False)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ondo-grammar")
        self._entries: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()
        self.capacity = capacity
        self.hits = 0
        self.misses = 0

    def submit(self, constraint: StructuredOutputsParams) -> Future:
        key = constraint.key
        with self._lock:
            future = self._entries.get(key)
            if future is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return future
            self.misses += 1
            future = self._pool.submit(self._compile, constraint)
            self._entries[key] = future
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        future.add_done_callback(lambda done: self._forget_if_failed(key, done))
        return future

    def compile_now(self, constraint: StructuredOutputsParams):
        """The compiled grammar, waiting for it (benchmarks, tests)."""
        return self.submit(constraint).result()

    def check(self, constraint: StructuredOutputsParams) -> None:
        """Wait for the constraint's grammar and make sure it can start with this vocabulary: a
        regex or choice of characters the tokenizer cannot write fails here, at add time, instead
        of at its first step. StructuredOutputError otherwise."""
        fill_bitmask([self.new_state(constraint)], self.vocab_size)

    def new_state(self, constraint: StructuredOutputsParams) -> GrammarState:
        """A fresh matcher state for one sequence (each n/best_of sibling gets its own)."""
        return GrammarState(self.submit(constraint), self.stop_token_ids)

    def _compile(self, constraint: StructuredOutputsParams):
        kind, source = constraint.key
        if kind in ("json", "json_object"):
            return self._compiler.compile_json_schema(source, any_whitespace=JSON_ANY_WHITESPACE)
        if kind == "regex":
            return self._compiler.compile_regex(source)
        return self._compiler.compile_grammar(source)

    def _forget_if_failed(self, key: tuple[str, str], future: Future) -> None:
        if future.cancelled() or future.exception() is not None:
            with self._lock:
                if self._entries.get(key) is future:
                    del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
