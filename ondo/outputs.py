"""What the engine hands back: RequestOutput with one CompletionOutput per returned sequence."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float                 # raw log-softmax of the model's logits (before any processor)
    rank: int | None = None        # 1 = most likely token
    decoded_token: str | None = None


# One dict per generated (or prompt) position: token id -> Logprob; the chosen token is always present.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None        # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None    # the stop string or stop token id that matched
    text_delta: str = ""                    # text new since the previous RequestOutput (streaming)
    token_ids_delta: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0              # prompt tokens served from the prefix cache
    error: str | None = None                # why the request failed alone (finish_reason "error")
    error_is_input: bool = False            # its own options failed it (a grammar this vocabulary cannot follow)
