"""Compiling constraints against the model's vocabulary, once per constraint.

Building an llguidance matcher for a JSON schema takes about a millisecond or two (its lexer is
built lazily as masks are asked for); a grammar can take far longer. The engine waits for it when
the request is added (`check`), so that a constraint the vocabulary cannot start is refused then;
builds run on a small thread pool, so one that never ends fails its request after
COMPILE_TIMEOUT_S instead of holding the engine. Compiled matchers are kept in an LRU keyed by
(kind, constraint text); each sequence starts from a copy (`GrammarState`), so a repeated schema
costs a dictionary lookup. A compile that failed is not kept.

Lanes: a copy of an llguidance matcher (`deep_copy`) shares the original's lexer, its lazily built
DFA, behind one mutex, and a mask is computed holding it. So 64 rows copied from one compiled
schema fill their masks one at a time however many threads fill them (3.4 ms a step on the H200
machine's CPU at 1 to 12 threads). A constraint is therefore compiled into up to LANES matchers,
the first when it is asked for and the others as more sequences follow it, and its sequences take
the lanes in turn (one whose lane is still compiling takes the first: a slow grammar never holds a
step up); the fill groups rows by lane (structured.py). LANES = 2 x the fill threads was
the fastest there: with 4 threads 1.4 ms on 8 lanes, 1.8 on 4, 1.5 on 16 (each lane builds its
DFA again). Llama-3-8B at batch 64 under that schema went from 0.68 to 0.93 of its unconstrained
output tok/s (benchmarks/structured.py).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ondo.sample.structured import (MASK_THREADS, GrammarState, StructuredOutputError, StructuredOutputsParams,
                                    clean_error, fill_bitmask)

DEFAULT_CACHE_SIZE = 256
LANES = 2 * MASK_THREADS


class _Entry:
    """One constraint's compiled lanes (Futures of LLMatchers; lane 0 is compiled first) and the
    lane its next sequence takes."""

    def __init__(self, first: Future) -> None:
        self.lanes: list[Future | None] = [first] + [None] * (LANES - 1)
        self.next_lane = 0


class GrammarCache:
    """`submit(constraint) -> Future[LLMatcher]` for one tokenizer and vocabulary size."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
                 capacity: int = DEFAULT_CACHE_SIZE, max_workers: int = 2) -> None:
        import llguidance.hf

        self.stop_token_ids = sorted(stop_token_ids)
        self.vocab_size = vocab_size
        # The stop tokens are the grammar's end: allowed only where it may end.
        self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size,
                                                       eos_token=self.stop_token_ids or None)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ondo-grammar")
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.capacity = capacity
        self.hits = 0
        self.misses = 0

    def submit(self, constraint: StructuredOutputsParams) -> Future:
        """The constraint's first lane: a Future of its compiled LLMatcher."""
        return self._entry(constraint).lanes[0]

    def _entry(self, constraint: StructuredOutputsParams) -> _Entry:
        key = constraint.key
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
            self.misses += 1
            entry = self._entries[key] = _Entry(self._pool.submit(self._compile, constraint))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        entry.lanes[0].add_done_callback(lambda done: self._forget_if_failed(key, done))
        return entry

    def compile_now(self, constraint: StructuredOutputsParams):
        """The compiled matcher, waiting for it (benchmarks, tests)."""
        return self.submit(constraint).result()

    def check(self, constraint: StructuredOutputsParams) -> None:
        """Wait for the constraint's grammar and make sure it can start with this vocabulary: a
        regex or choice of characters the tokenizer cannot write fails here, at add time, instead
        of at its first step. StructuredOutputError otherwise. (On the first lane: the check takes
        no lane from the sequences.)"""
        fill_bitmask([GrammarState(self.submit(constraint), self.stop_token_ids)], self.vocab_size)

    def new_state(self, constraint: StructuredOutputsParams) -> GrammarState:
        """A fresh matcher state for one sequence (each n/best_of sibling gets its own), on the
        constraint's next lane (compiled now if it is new)."""
        entry = self._entry(constraint)
        with self._lock:
            lane = entry.next_lane
            entry.next_lane = (lane + 1) % LANES
            if entry.lanes[lane] is None:
                entry.lanes[lane] = self._pool.submit(self._compile, constraint)
            compiled = entry.lanes[lane]
        return GrammarState(compiled, self.stop_token_ids, first_lane=entry.lanes[0])

    def _compile(self, constraint: StructuredOutputsParams):
        import llguidance as llg

        # Short errors: the verbose ones quote the parser's state and the whole grammar.
        matcher = llg.LLMatcher(self._tokenizer, constraint.grammar_text(), log_level=0,
                                limits=llg.LLParserLimits(verbose_errors=False))
        if matcher.is_error():
            raise StructuredOutputError(f"structured_outputs.{constraint.kind} cannot be used with this vocabulary: "
                                        f"{clean_error(matcher.get_error())}", constraint.kind)
        return matcher

    def _forget_if_failed(self, key: tuple[str, str], future: Future) -> None:
        if future.cancelled() or future.exception() is not None:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry.lanes[0] is future:
                    del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
