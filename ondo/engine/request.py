"""One sequence the engine generates: its tokens, how many have KV computed, and its blocks.

A user request with n/best_of > 1 becomes several `Request`s (siblings) grouped by the engine.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ondo.outputs import PositionLogprobs
from ondo.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str                       # unique per sequence: "<group id>" or "<group id>#<index>"
    group_id: str                         # the id the user gave
    index: int                            # position among the group's candidates
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int                       # resolved: never past max_model_len
    min_tokens: int                       # resolved: EOS and stops are ignored until reached
    eos_token_ids: frozenset[int]         # empty when ignore_eos
    stop_token_ids: frozenset[int]
    bad_words_token_ids: list[list[int]]
    generator: torch.Generator | None = None
    prefill_leader: Request | None = None  # a sibling whose prompt blocks this one waits to share
    arrival_s: float = 0.0

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0          # tokens whose K/V are in the cache (or queued on the device)
    # Tokens sampled on the device whose ids have not reached the host yet (async scheduling): the
    # scheduler counts them as known tokens, so the next step can be scheduled before they land.
    num_output_placeholders: int = 0
    num_cached_tokens: int = 0            # prompt tokens served by the prefix cache at first schedule
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks so far
    num_preemptions: int = 0

    cumulative_logprob: float | None = None   # None unless the sampler computed log-probs
    logprobs: list[PositionLogprobs] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    emitted_token_len: int = 0            # output_token_ids[:emitted_token_len] went out in deltas
    finish_reported: bool = False         # a delta carried finish_reason
    prompt_logprobs_reported: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None              # set when this request failed alone (e.g. its logits processor raised)
    error_is_input: bool = False          # ...because of its own options (a SamplingParamsError): bad input
    structured: object | None = None      # GrammarState (ondo/sample/structured.py) when the output is constrained
    lora_request: object | None = None    # LoRARequest (ondo/lora) this sequence runs with; None = base model
    lora_slot: int | None = None          # its adapter's device slot while admitted (LoRAManager.acquire)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the concatenation."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len:end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - prompt_len]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params.prompt_logprobs is not None
