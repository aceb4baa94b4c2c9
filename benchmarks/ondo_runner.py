"""ondo under the benchmarks: batch generation through `LLM.generate`, single-request latency through the
Engine's step loop (the time of the step that first hands back a token is the time to first token)."""
from __future__ import annotations

import itertools
import time

import common


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer (packed weights, scales, norms; shared tensors once)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class OndoRunner:
    name = "ondo"

    def __init__(self, args, spec: common.ModelSpec, *, max_model_len: int, max_num_seqs: int):
        from ondo import LLM

        options = dict(load_format=spec.load_format, dtype=args.dtype, device=args.device,
                       max_model_len=max_model_len, max_num_seqs=max_num_seqs, seed=args.seed,
                       enforce_eager=args.enforce_eager, quantization=getattr(args, "quantization", None))
        if args.max_num_batched_tokens:
            options["max_num_batched_tokens"] = args.max_num_batched_tokens
        if getattr(args, "tensor_parallel_size", 1) > 1:
            options["tensor_parallel_size"] = args.tensor_parallel_size
        start = time.perf_counter()
        self.llm = LLM(model=spec.ondo_model, **options)
        self.load_s = time.perf_counter() - start   # weights, KV cache and (on a GPU) graph capture
        engine = self.llm.engine
        self.device, self.vocab_size = str(engine.device), engine.vocab_size
        self.details = {"dtype": str(engine.dtype).removeprefix("torch."), "kv_blocks": engine.num_blocks,
                        "max_model_len": engine.max_model_len, "max_num_seqs": max_num_seqs,
                        "max_num_batched_tokens": engine.scheduler.max_num_batched_tokens,
                        "weights_load_s": round(engine.load_time_s, 3),
                        "cuda_graphs": engine.runner.cuda_graphs is not None,
                        "quantization": getattr(args, "quantization", None),
                        "weight_bytes": weight_bytes(engine.model)}
        self._ids = itertools.count()

    def generate(self, prompts: list[list[int]], params) -> dict:
        """All prompts at once (continuous batching); `params` one SamplingParams or one per prompt."""
        start = common.now(self.device)
        outputs = self.llm.generate(prompts, params)
        elapsed = common.now(self.device) - start
        return {"elapsed_s": elapsed, "prompt_tokens": sum(len(p) for p in prompts),
                "output_tokens": sum(len(c.token_ids) for o in outputs for c in o.outputs)}

    def latency(self, prompt: list[int], output_len: int) -> dict:
        """One request alone. No device sync per step: a step hands back host token ids, so its return is
        when the token exists (a sync there would also stall the step launched ahead, async scheduling)."""
        engine = self.llm.engine
        request_id = f"latency-{next(self._ids)}"
        stamps: list[tuple[float, int]] = []   # (time, tokens so far) at every step that added tokens
        start = common.now(self.device)
        engine.add_request(request_id, prompt, common.greedy_params(output_len))
        while engine.has_unfinished_requests():
            for output in engine.step():
                count = len(output.outputs[0].token_ids)
                if output.request_id == request_id and (not stamps or count > stamps[-1][1]):
                    stamps.append((time.perf_counter(), count))
        end = common.now(self.device)
        return common.timing_summary(start, stamps, end)

