"""The engine: add requests, step, get outputs. Synchronous and single-threaded by design;
`AsyncEngine` drives it from one background thread for the server."""
from __future__ import annotations

import logging
import time
import weakref

import torch

from ondo.config import EngineConfig
from ondo.engine.block_manager import BlockManager
from ondo.engine.in_flight import LaunchedStep, SampledStep, gather_rows, sample_on_device
from ondo.engine.model_runner import KVCacheSpec, ModelRunner
from ondo.engine.output_processor import SequenceDelta, append_token, check_stop, take_delta
from ondo.engine.request import Request
from ondo.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from ondo.engine.text_output import OutputProcessor
from ondo.loader import load_model
from ondo.lora.manager import build_lora_manager, resolve_lora_request
from ondo.outputs import Logprob, RequestOutput
from ondo.sample.sampler import Sampler, SamplerOutput, prompt_logprobs
from ondo.sample.structured import prefetch_bitmask
from ondo.sampling_params import SamplingParams, SamplingParamsError

logger = logging.getLogger("ondo")

CPU_KV_CACHE_BYTES = 2 << 30      # default KV budget on the CPU
# Prompt chunks beside decodes (config.prefill_tokens_while_decoding): on the CPU a fixed 256 tokens;
# on a GPU, "auto", as many as this share of a step prefills, so a running stream's inter-token latency
# stays about a decode step plus this while prompts arrive (8192 tokens at once cost an 8B model ~200 ms
# on an H200). It costs throughput when many prompts arrive at once (256 prompts of 256 tokens, an 8B
# shape on an H200: 12.9k against 14.5k output tok/s), so only the server asks for it by default.
CPU_PREFILL_TOKENS_WHILE_DECODING = 256
PREFILL_CHUNK_TARGET_S = 0.03
MIN_PREFILL_CHUNK = 256


class RequestError(ValueError):
    """A request cannot run (empty or too-long prompt, token id outside the vocabulary...)."""


class Engine:
    def __init__(self, config: EngineConfig):
        # With tensor_parallel_size > 1 the other ranks' workers start first: a model built after this
        # holds only this rank's shard (ondo/distributed).
        self.executor = _start_tensor_parallel(config)
        try:
            self._start(config)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, config: EngineConfig) -> None:
        self.config = config
        self.device = _resolve_device(config.device)
        if config.seed is not None:
            torch.manual_seed(config.seed)
        start_s = time.perf_counter()
        loaded, self.dtype = load_model(config, self.device)
        self.model, self.hf_config, self.tokenizer = loaded.model, loaded.hf_config, loaded.tokenizer
        self.model_name = loaded.name
        self.load_time_s = time.perf_counter() - start_s
        self.vocab_size = self.hf_config.vocab_size
        self.eos_token_ids = self._eos_ids(loaded.generation_config)
        self.max_model_len = self._max_model_len()
        if self.executor is not None:
            self.executor.model_loaded(self.dtype)

        spec = kv_cache_spec(self.hf_config, resolve_kv_cache_dtype(config, self.dtype, self.device, self.model),
                             config.tensor_parallel_size)
        self.num_blocks = self._num_kv_blocks(spec)
        # LoRA layers wrap the model before the runner captures its CUDA graphs (ondo/lora).
        self.lora_manager = build_lora_manager(config, self.model, self.dtype, self.device, self.max_model_len)
        self.runner = ModelRunner(self.model, spec, self.num_blocks, config.block_size, self.device,
                                  enforce_eager=config.enforce_eager, max_num_seqs=config.max_num_seqs,
                                  max_model_len=self.max_model_len, lora_manager=self.lora_manager)
        self.runner.step_sender = self.executor   # None at tensor_parallel_size 1
        if self.executor is not None:
            self.executor.before_leaving.append(weakref.WeakMethod(self.runner.release_cuda_graphs))
        self.block_manager = BlockManager(self.num_blocks, config.block_size, config.enable_prefix_caching,
                                          grow_lazily=self.device.type == "cpu",
                                          contiguous=self.device.type == "cpu")
        # A GPU needs big steps to be busy; the CPU keeps steps short so decodes are not starved.
        budget = config.max_num_batched_tokens or (8192 if self.device.type == "cuda" else 2048)
        if not config.enable_chunked_prefill:   # a whole prompt must then fit in one step's budget
            budget = max(budget, self.max_model_len)
        cap = config.prefill_tokens_while_decoding   # "auto" on a GPU: set by _warm_up, which times a prefill
        if cap in (None, "auto"):
            cap = CPU_PREFILL_TOKENS_WHILE_DECODING if self.device.type == "cpu" else None
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, budget, config.enable_chunked_prefill,
                                   prefill_tokens_while_decoding=cap or None)
        self.scheduler.lora_slots = self.lora_manager
        self.sampler = Sampler()
        self.grammars = None   # GrammarCache, built at the first request with structured output
        self.groups: dict[str, list[Request]] = {}   # a user request's id -> its sequences (n / best_of)
        # Text for Engine.step(); the engine-core process leaves it to the API server (core_step()).
        self.text = OutputProcessor(self.tokenizer, self.max_model_len)
        self.num_prompt_tokens_total = 0
        self.num_generated_tokens_total = 0
        # Async scheduling (ondo/engine/in_flight.py): by default where CUDA graphs run, i.e. where the
        # device runs apart from the host. With tensor parallelism rank 0 broadcasts the placeholders' ids.
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.runner.cuda_graphs is not None)
        self.launched: LaunchedStep | None = None   # a step whose forward is queued, not sampled yet
        self.num_steps_launched_ahead = 0   # launched before the previous step's tokens were read
        self.num_rows_taken_back = 0        # launched on a placeholder the sampler left to its full sort
        self.num_rows_not_sampled = 0       # launched, then not sampled: their request finished, or taken back
        if self.device.type == "cuda":
            self._warm_up()
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.0f MiB, %s); max_model_len %d",
                    self.num_blocks, config.block_size, self.num_blocks * config.block_size,
                    self.num_blocks * config.block_size * spec.bytes_per_token() / 2**20,
                    str(spec.dtype).removeprefix("torch."), self.max_model_len)

    # ---- start-up ------------------------------------------------------------------------------

    def _warm_up(self) -> None:
        """One full-budget prefill and one short one, so the first user request does not pay for
        compiling kernels and choosing GEMM algorithms for those shapes. A second full prefill, timed,
        sizes the prompt chunks run beside decodes (config.prefill_tokens_while_decoding="auto")."""
        longest = min(self.scheduler.max_num_batched_tokens, self.max_model_len - 1, self.num_blocks * self.config.block_size)
        self._prefill_dummy(longest)
        self._prefill_dummy(8)
        torch.cuda.synchronize(self.device)
        if self.config.prefill_tokens_while_decoding == "auto" and self.config.enable_chunked_prefill:
            start = time.perf_counter()
            if self._prefill_dummy(longest):
                torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - start
                cap = prefill_chunk_for(longest, elapsed, self.config.block_size)
                self.scheduler.prefill_tokens_while_decoding = cap
                logger.info("prompt chunks beside decodes: %s (a %d-token prefill took %.0f ms)",
                            f"{cap} tokens" if cap else "not capped", longest, elapsed * 1e3)

    def _prefill_dummy(self, num_tokens: int) -> bool:
        """Run one prompt of num_tokens zeros through the model (its KV blocks freed after); False when
        the blocks are not there."""
        request = Request("warm-up", "warm-up", 0, [0] * num_tokens, SamplingParams(), 1, 0,
                          frozenset(), frozenset(), [])
        if not self.block_manager.allocate(request, num_tokens):
            return False
        self.runner.execute(SchedulerOutput([ScheduledRequest(request, num_tokens)], num_tokens, []))
        self.block_manager.free(request)
        return True

    def _eos_ids(self, generation_config: dict) -> frozenset[int]:
        ids: set[int] = set()
        eos = generation_config.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None:
            ids.update(self.tokenizer.end_of_turn_token_ids)
        elif getattr(self.hf_config, "eos_token_id", None) is not None:
            eos = self.hf_config.eos_token_id
            ids.update(eos if isinstance(eos, list) else [eos])
        return frozenset(i for i in ids if i is not None)

    def _max_model_len(self) -> int:
        model_len = next((getattr(self.hf_config, k) for k in ("max_position_embeddings", "n_positions")
                          if getattr(self.hf_config, k, None)), 2048)
        if self.config.max_model_len is None:
            return model_len if self.device.type == "cuda" else min(model_len, 8192)
        if self.config.max_model_len > model_len:
            raise RequestError(f"max_model_len must be <= the model's context length ({model_len}), "
                               f"got {self.config.max_model_len}")
        return self.config.max_model_len

    def _num_kv_blocks(self, spec: KVCacheSpec) -> int:
        block_bytes = spec.bytes_per_token() * self.config.block_size
        budget = kv_budget_bytes(self.config, self.device, spec, self.max_model_len)
        num_blocks = budget // block_bytes
        if self.executor is not None:   # every rank allocates what the fullest one can hold
            num_blocks = self.executor.agree_num_blocks(num_blocks, self.max_model_len)
        min_blocks = -(-self.max_model_len // self.config.block_size)
        if num_blocks < min_blocks:
            raise RequestError(
                f"the KV cache budget ({budget / 2**20:.1f} MiB) holds {num_blocks * self.config.block_size} tokens, "
                f"fewer than max_model_len ({self.max_model_len}): raise kv_cache_memory_bytes "
                f"(or gpu_memory_utilization) or lower max_model_len")
        return int(num_blocks)

    # ---- requests ------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    lora_request=None) -> None:
        params = params or SamplingParams()
        prompt_text, prompt_ids = self.add_core_request(request_id, prompt, params, lora_request)
        self.text.add(request_id, prompt_text, prompt_ids, params)

    def add_core_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                         lora_request=None) -> tuple[str | None, list[int]]:
        """Check and queue a request's sequences; its text is the caller's (`core_step` reports tokens).
        Returns the prompt's text (None for token ids) and its token ids."""
        if request_id in self.groups:
            raise RequestError(f"request id {request_id!r} is already in use")
        lora_request = resolve_lora_request(self.lora_manager, lora_request)   # LoRAError if unusable
        prompt_text, prompt_ids = self._tokenize(prompt)
        params.check_token_ids(self.vocab_size)
        max_tokens = params.resolve_max_tokens(len(prompt_ids), self.max_model_len)
        if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise RequestError(f"the prompt ({_tokens(len(prompt_ids))}) plus max_tokens ({params.max_tokens}) "
                               f"is longer than the context ({self.max_model_len} tokens)")
        needed_blocks = -(-(len(prompt_ids) + max_tokens) // self.config.block_size)
        if needed_blocks > self.num_blocks:
            raise RequestError(f"the request needs {needed_blocks} KV blocks but the cache has only {self.num_blocks}")
        best_of = params.best_of or params.n
        bad_words = params.bad_words_token_ids(self.tokenizer) if self.tokenizer is not None else \
            [list(w) for w in params.bad_words_ids]
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        grammars = self._grammar_cache() if params.structured_outputs is not None else None
        if grammars is not None:
            grammars.check(params.structured_outputs)   # compiled (or cached) and able to start
        group: list[Request] = []
        now = time.monotonic()
        for index in range(best_of):
            child = Request(
                request_id=request_id if best_of == 1 else f"{request_id}#{index}", group_id=request_id,
                index=index, prompt_token_ids=prompt_ids, sampling_params=params, max_tokens=max_tokens,
                min_tokens=min(params.resolve_min_tokens(len(prompt_ids)), max_tokens), eos_token_ids=eos,
                stop_token_ids=frozenset(params.stop_token_ids), bad_words_token_ids=bad_words,
                generator=self._generator(params.seed, index), arrival_s=now,
                prefill_leader=group[0] if index else None, lora_request=lora_request)
            if grammars is not None:   # each sibling follows the grammar on its own
                child.structured = grammars.new_state(params.structured_outputs)
            if params.logprobs is not None:
                child.logprobs = []
            if params.prompt_logprobs is not None:
                child.prompt_logprobs = [None]
            group.append(child)
            self.scheduler.add(child)
        self.groups[request_id] = group
        self.num_prompt_tokens_total += len(prompt_ids)
        return prompt_text, prompt_ids

    def _grammar_cache(self):
        if self.tokenizer is None:
            raise RequestError("structured output needs the model's tokenizer, and this model has none")
        if self.grammars is None:
            from ondo.sample.grammar_cache import GrammarCache

            if self.tokenizer.vocab_size > self.vocab_size:   # llguidance's masks cover every token it can write
                raise RequestError(f"structured output is not available for this model: its tokenizer has "
                                   f"{self.tokenizer.vocab_size} tokens but the model scores only {self.vocab_size} "
                                   "(vocab_size in its config)")
            self.grammars = GrammarCache(self.tokenizer.hf, self.vocab_size, list(self.eos_token_ids))
        return self.grammars

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: give prompts as token id lists")
            ids = self.tokenizer.encode(prompt)
            text = prompt
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids, text = list(prompt), None
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[0]}")
        else:
            raise RequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise RequestError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, "
                               f"which leaves no room to generate")
        return text, ids

    def _generator(self, seed: int | None, index: int) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed((seed + index) % 2**64)

    def abort_request(self, request_id: str) -> None:
        self.text.forget(request_id)
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        for child in group:
            if not child.is_finished:
                child.finish_reason = "abort"
                self.scheduler.finish(child)

    def stop_sequences(self, sequences: list[tuple[str, int]]) -> None:
        """End sequences (request id, index) that a stop string ended where their text is made."""
        for request_id, index in sequences:
            group = self.groups.get(request_id)
            if group is None or not 0 <= index < len(group):
                continue   # finished or aborted meanwhile
            child = group[index]
            if not child.is_finished:
                child.finish_reason, child.finish_reported = "stop", True
                self.scheduler.finish(child)
            if all(c.is_finished for c in group):
                del self.groups[request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    # ---- the step --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One step: the core's step, then its tokens as text (stop strings end sequences here)."""
        outputs, stopped = self.text.process(self.core_step())
        if stopped:
            self.stop_sequences(stopped)
        return outputs

    def core_step(self) -> list[SequenceDelta]:
        """One step of scheduler -> model runner -> sampler: each touched sequence's new tokens. With
        async scheduling (ondo/engine/in_flight.py) the next step's forward is queued before this
        step's tokens are read, and is left running on the device."""
        if self.executor is not None:
            self.executor.check_alive()   # a dead worker: a clear error now, never a hang in a collective
        touched: dict[str, list[Request]] = {}
        launched, self.launched = self.launched, None
        if launched is None or not launched.has_running_rows():   # nothing useful queued: launch one now
            launched = self._schedule_and_launch(None, touched)
        sampled = self._sample_launched(launched, touched) if launched is not None else None
        if self.async_scheduling:
            self.launched = self._schedule_and_launch(sampled, touched)
        if sampled is not None:
            self._land(sampled, touched)
        if self.launched is not None:
            self._prefetch_masks(self.launched)
        return self.emit(touched)

    def _schedule_and_launch(self, sampled: SampledStep | None,
                             touched: dict[str, list[Request]]) -> LaunchedStep | None:
        """Schedule a step and queue its forward; its placeholders read `sampled`'s tokens on the device."""
        schedule = self.scheduler.schedule()
        if schedule.is_empty:
            return None
        try:
            result = self.runner.execute(schedule, sampled.in_flight() if sampled is not None else None)
        except Exception as error:  # a failed forward fails the requests in it, never the engine
            logger.exception("model forward failed")
            touched.update(self._fail([s.request for s in schedule.scheduled], f"model forward failed: {error}"))
            return None
        self.scheduler.update_after_step(schedule)
        self.num_steps_launched_ahead += sampled is not None
        return LaunchedStep(schedule, result)

    def _sample_launched(self, launched: LaunchedStep, touched: dict[str, list[Request]]) -> SampledStep | None:
        """A launched step's prompt log-probs, finished score-only requests and samples. With async
        scheduling the tokens stay on the device (returned); otherwise, or when sampling there fails
        (a grammar with no way forward, a failing processor), they are sampled on the host and applied now."""
        result, scheduled = launched.result, launched.schedule.scheduled
        for index, logits in result.prompt_logits.items():
            if not scheduled[index].request.is_finished:
                self._add_prompt_logprobs(scheduled[index], logits)
        touched.update(self._finish_scored(launched.schedule))
        rows = launched.rows_to_sample()
        self.num_rows_not_sampled += len(result.sample_indices) - len(rows)
        if not rows:
            return None
        sampled_requests = launched.sampled_requests()
        requests = [sampled_requests[row] for row in rows]
        logits = gather_rows(result.sample_logits, rows)
        if self.async_scheduling:
            try:
                return sample_on_device(self.sampler, requests, logits)
            except Exception:   # a grammar with no way forward, a failing processor: found request by request below
                pass
        touched.update(self._sample(requests, logits))
        return None

    def _land(self, sampled: SampledStep, touched: dict[str, list[Request]]) -> None:
        """Read `sampled`'s tokens (the device is running the next step meanwhile), check their stops."""
        out = sampled.read()
        if min(out.token_ids) < 0:   # rows the sampler's candidates left open: the full sort decides them
            left_open = {request for request, token in zip(sampled.requests, out.token_ids) if token < 0}
            out = self.sampler.redo(sampled.sample, sampled.requests, out)
            if self.launched is not None:   # its rows for them ran on a placeholder: computed again next step
                for item in self.launched.schedule.scheduled:
                    if item.request in left_open:
                        self.scheduler.unschedule_placeholder(item.request)
                        self.launched.taken_back.add(item.request)
                        self.num_rows_taken_back += 1
        touched.update(self.apply_sampled(sampled.requests, out))

    def _prefetch_masks(self, launched: LaunchedStep) -> None:
        """Start filling the grammar masks that sampling `launched` will ask for (the rows
        `_sample_launched` will sample, in its order), while this step is emitted; on a GPU into pinned
        memory the sampler copies as it is."""
        requests, logits = launched.sampled_requests(), launched.result.sample_logits
        states = [requests[row].structured for row in launched.rows_to_sample()
                  if requests[row].structured is not None]
        if states:
            prefetch_bitmask(states, logits.shape[1], pinned=logits.is_cuda)

    def _finish_scored(self, schedule: SchedulerOutput) -> dict[str, list[Request]]:
        """Score-only requests (max_tokens=0) end once their whole prompt is computed: their
        prompt log-probs are the result and nothing is sampled."""
        touched = {}
        for item in schedule.scheduled:
            request = item.request
            if (request.max_tokens == 0 and not request.is_finished
                    and request.num_computed_tokens >= request.num_prompt_tokens):
                request.finish_reason = "length"
                self.scheduler.finish(request)
                touched[request.group_id] = self.groups[request.group_id]
        return touched

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> dict[str, list[Request]]:
        touched = {}
        try:
            outputs = [(requests, self.sampler(logits, requests))]
        except Exception:  # find the request whose options failed (e.g. a custom logits processor, a grammar)
            outputs = []
            for i, request in enumerate(requests):
                try:
                    outputs.append(([request], self.sampler(logits[i:i + 1], [request])))
                except Exception as error:
                    request.error, request.finish_reason = f"sampling failed: {error}", "error"
                    request.error_is_input = isinstance(error, SamplingParamsError)
                    self.scheduler.finish(request)
                    touched[request.group_id] = self.groups[request.group_id]   # emitted with the others
        for batch, out in outputs:
            touched.update(self.apply_sampled(batch, out))
        return touched

    def apply_sampled(self, batch: list[Request], out: SamplerOutput) -> dict[str, list[Request]]:
        """Append each request's new token, check its stops (finishing it); returns the groups touched."""
        touched = {}
        for i, request in enumerate(batch):
            if request.is_finished:
                continue
            if request.num_output_placeholders:   # counted since its step was launched
                request.num_output_placeholders -= 1
            token = out.token_ids[i]
            append_token(request, token, out.logprobs[i] if out.logprobs else None,
                         out.top_logprobs[i] if out.top_logprobs else None)
            self.num_generated_tokens_total += 1
            if check_stop(request, token, self.max_model_len):
                self.scheduler.finish(request)
            touched[request.group_id] = self.groups[request.group_id]
        return touched

    def emit(self, touched: dict[str, list[Request]]) -> list[SequenceDelta]:
        """The touched sequences' deltas; a group whose sequences all finished is done."""
        deltas = []
        for request_id, group in touched.items():
            finished = True
            for child in group:
                if (delta := take_delta(child)) is not None:
                    deltas.append(delta)
                finished = finished and child.is_finished
            if finished:
                self.groups.pop(request_id, None)
        return deltas

    def _fail(self, requests: list[Request], message: str) -> dict[str, list[Request]]:
        touched = {}
        for request in requests:
            request.error, request.finish_reason = message, "error"
            self.scheduler.finish(request)
            if request.group_id in self.groups:
                touched[request.group_id] = self.groups[request.group_id]
        return touched

    def _add_prompt_logprobs(self, item, logits: torch.Tensor) -> None:
        request = item.request
        first = request.num_computed_tokens - item.num_new_tokens   # already advanced by update_after_step
        # Logits at position p predict token p + 1; only prompt tokens are scored here.
        targets = request.prompt_token_ids[first + 1:min(first + item.num_new_tokens + 1, request.num_prompt_tokens)]
        if not targets:
            return
        k = request.sampling_params.prompt_logprobs
        scored = prompt_logprobs(logits[:len(targets)], torch.tensor(targets, device=logits.device), k)
        for target, position in zip(targets, scored):
            ranked = sorted(position.items(), key=lambda item: item[1], reverse=True)[:k]
            entry = {tid: Logprob(lp, rank) for rank, (tid, lp) in enumerate(ranked, 1)}
            entry.setdefault(target, Logprob(position[target], None))
            request.prompt_logprobs.append(entry)

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers (also done when the engine is collected or at exit)."""
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown()

    def stats(self) -> dict:
        blocks = self.block_manager
        return {
            "num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
            "num_requests": len(self.groups),
            "kv_cache_usage": blocks.usage, "num_free_blocks": blocks.num_free_blocks,
            "num_total_blocks": blocks.num_blocks,
            "prefix_cache_queries": blocks.prefix_queries, "prefix_cache_hits": blocks.prefix_hits,
            "prefix_cache_hit_rate": blocks.prefix_hits / blocks.prefix_queries if blocks.prefix_queries else 0.0,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens_total": self.num_prompt_tokens_total,
            "generation_tokens_total": self.num_generated_tokens_total,
        }


def prefill_chunk_for(num_tokens: int, seconds: float, block_size: int) -> int | None:
    """Prompt tokens per step beside decodes: what PREFILL_CHUNK_TARGET_S of prefill computes at the
    rate of a timed `num_tokens` prefill, in whole blocks, at least MIN_PREFILL_CHUNK; None (no cap)
    when the whole budget fits in that time anyway."""
    tokens = int(num_tokens * PREFILL_CHUNK_TARGET_S / max(seconds, 1e-9))
    if tokens >= num_tokens:
        return None
    return max(MIN_PREFILL_CHUNK, tokens // block_size * block_size)


def _tokens(count: int) -> str:
    return f"{count} token" if count == 1 else f"{count} tokens"


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RequestError(f"device {name!r} was asked for but no CUDA GPU is available")
    return device


def resolve_kv_cache_dtype(config: EngineConfig, dtype: torch.dtype, device: torch.device, model) -> torch.dtype:
    """The KV cache's element type for activations of `dtype` (docs/architecture.md, "KV cache dtype")."""
    from ondo.config import ConfigError
    from ondo.layers import cpu_kernels
    from ondo.layers.linear import linear_layers

    if config.kv_cache_dtype != "auto":
        chosen = getattr(torch, config.kv_cache_dtype)
        if device.type != "cpu" and chosen != dtype:
            raise ConfigError(f"kv_cache_dtype {config.kv_cache_dtype!r} needs the CPU: on {device.type} the cache "
                              f"is in the activations' dtype ({str(dtype).removeprefix('torch.')}); use 'auto'")
        return chosen
    quantized = any(layer.method.name != "dense" for _, layer in linear_layers(model))
    if device.type == "cpu" and dtype == torch.float32 and quantized and cpu_kernels.library() is not None:
        return torch.float16
    return dtype


def kv_cache_spec(hf_config, dtype: torch.dtype, tp_size: int = 1) -> KVCacheSpec:
    """One rank's KV cache shape: its share of the kv heads (all of them at tensor_parallel_size 1)."""
    from ondo.distributed.parallel_state import kv_heads_per_rank
    from ondo.distributed.sharding import attention_heads

    num_heads, num_kv_heads = attention_heads(hf_config)
    hidden = getattr(hf_config, "hidden_size", None) or hf_config.n_embd
    head_dim = getattr(hf_config, "head_dim", None) or hidden // num_heads
    num_layers = getattr(hf_config, "num_hidden_layers", None) or hf_config.n_layer
    return KVCacheSpec(num_layers, kv_heads_per_rank(num_kv_heads, tp_size)[0], head_dim, dtype)


def kv_budget_bytes(config: EngineConfig, device: torch.device, spec: KVCacheSpec, max_model_len: int) -> int:
    """Bytes this process may give its KV cache (see docs/architecture.md, "KV cache size")."""
    if config.kv_cache_memory_bytes is not None:
        return config.kv_cache_memory_bytes
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free - total * (1 - config.gpu_memory_utilization))
    # Enough for max_num_seqs full-length requests, within the CPU default budget.
    return min(CPU_KV_CACHE_BYTES, config.max_num_seqs * max_model_len * spec.bytes_per_token())


def _start_tensor_parallel(config: EngineConfig):
    if config.tensor_parallel_size == 1:
        return None
    from ondo.distributed.executor import TensorParallelExecutor

    return TensorParallelExecutor(config, _resolve_device(config.device))
