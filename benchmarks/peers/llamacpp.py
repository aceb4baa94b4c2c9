"""llama.cpp (through llama-cpp-python) as the peer on the same GGUF file, its own quantized kernels, greedy.

Not a dependency of ondo. Its default wheel can crash at the first decode on CPUs with AMX (the AMX
matrix code); build it with AMX off:

    CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="$CFLAGS" \\
        pip wheel --no-cache-dir --no-deps -w /tmp/wheels llama-cpp-python==0.3.36
    pip install /tmp/wheels/llama_cpp_python-0.3.36-*.whl

A single request runs through `Llama.generate` after `reset()` (which otherwise reuses its prompt
cache); several requests run as parallel sequences of one context: every step is one `llama_decode`
with one token per sequence, the prompts prefilled together in batches of `n_batch` tokens.
"""
from __future__ import annotations

import time

import numpy as np

INSTALL_HINT = __doc__[__doc__.index("    CFLAGS"):__doc__.index("\nA single")].rstrip()


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("--peer llamacpp needs llama-cpp-python, which ondo does not depend on. Install it with\n"
                         + INSTALL_HINT) from None
    return llama_cpp


class LlamaCppRunner:
    name = "llama.cpp"

    def __init__(self, path, threads: int, per_sequence_ctx: int):
        llama_cpp = require_llama_cpp()
        self.lib, self.threads, self.per_sequence_ctx = llama_cpp, threads, per_sequence_ctx
        start = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads,
                                   n_ctx=per_sequence_ctx, verbose=False, seed=0)
        self.load_s = time.perf_counter() - start
        self.device = "cpu"
        self.details = {"llama_cpp": llama_cpp.__version__, "threads": threads}
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.llm._model.model))
        self._parallel_ctx, self._parallel_seqs, self._batch = None, 0, None

    def latency(self, prompt: list[int], output_len: int) -> dict:
        import common

        self.llm.reset()
        stamps = []
        start = time.perf_counter()
        for _ in self.llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):   # never stops by itself
            stamps.append((time.perf_counter(), len(stamps) + 1))
            if len(stamps) >= output_len:
                break
        return common.timing_summary(start, stamps, time.perf_counter())

    def generate(self, prompts: list[list[int]], output_len: int) -> dict:
        """All prompts as parallel sequences of one context, greedy, exactly `output_len` tokens each."""
        lib = self.lib
        ctx, batch, n_batch = self._context(len(prompts))
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        start = time.perf_counter()
        entries = [(token, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts) for pos, token in enumerate(p)]
        next_tokens = [0] * len(prompts)
        for first in range(0, len(entries), n_batch):      # the prefill, n_batch tokens at a time
            chunk = entries[first:first + n_batch]
            self._decode(ctx, batch, chunk)
            for index, (_, _, seq, wants) in enumerate(chunk):
                if wants:
                    next_tokens[seq] = self._argmax(ctx, index)
        positions = [len(p) for p in prompts]
        produced = len(prompts)
        for _ in range(output_len - 1):
            self._decode(ctx, batch, [(next_tokens[s], positions[s], s, True) for s in range(len(prompts))])
            next_tokens = [self._argmax(ctx, s) for s in range(len(prompts))]
            positions = [p + 1 for p in positions]
            produced += len(prompts)
        return {"elapsed_s": time.perf_counter() - start, "prompt_tokens": sum(len(p) for p in prompts),
                "output_tokens": produced}

    def _context(self, num_seqs: int):
        lib = self.lib
        if self._parallel_seqs != num_seqs:
            self.close()
            params = lib.llama_context_default_params()
            params.n_seq_max = num_seqs
            params.n_ctx = self.per_sequence_ctx * num_seqs      # split evenly between the sequences
            params.n_batch = params.n_ubatch = max(512, num_seqs)
            params.n_threads = params.n_threads_batch = self.threads
            self._parallel_ctx = lib.llama_init_from_model(self.llm._model.model, params)
            if not self._parallel_ctx:
                raise RuntimeError(f"llama.cpp could not create a context for {num_seqs} sequences")
            self._batch = lib.llama_batch_init(params.n_batch, 0, 1)
            self._parallel_seqs, self._n_batch = num_seqs, params.n_batch
        return self._parallel_ctx, self._batch, self._n_batch

    def _decode(self, ctx, batch, entries) -> None:
        for i, (token, pos, seq, wants_logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, 1 if wants_logits else 0
        batch.n_tokens = len(entries)
        code = self.lib.llama_decode(ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode failed with code {code}")

    def _argmax(self, ctx, index: int) -> int:
        logits = self.lib.llama_get_logits_ith(ctx, index)
        return int(np.ctypeslib.as_array(logits, shape=(self.vocab_size,)).argmax())

    def close(self) -> None:
        if self._parallel_ctx is not None:
            self.lib.llama_batch_free(self._batch)
            self.lib.llama_free(self._parallel_ctx)
            self._parallel_ctx, self._parallel_seqs = None, 0
