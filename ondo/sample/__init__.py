"""Decoding controls: logits processors and the batched sampler (see sampler.py for the order)."""

from ondo.sample.sampler import Sampler, SamplerOutput, draw, prompt_logprobs, warp
from ondo.sample.validation import SamplingParamsError

__all__ = ["Sampler", "SamplerOutput", "SamplingParamsError", "draw", "prompt_logprobs", "warp"]
