"""What the completion and chat endpoints share: the server state, starting the engine requests
of one API call, following their outputs (metrics, disconnects), SSE framing and log-probs."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request

from ondo.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestStream
from ondo.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from ondo.sampling_params import SamplingParams
from ondo.server.errors import APIError, bad_request, error_body
from ondo.server.guard import shown
from ondo.server.metrics import RequestTracker, ServerMetrics
from ondo.server.protocol import TokenLogprob, TopLogprob, UsageInfo

T = TypeVar("T")


class ServerState:
    """The engine, its metrics and the serving options; shared by every route."""

    def __init__(self, engine: AsyncEngine, served_model_name: str | None, api_key: str | None,
                 tool_call_parser: str | None = None, reasoning_parser: str | None = None) -> None:
        self.engine = engine
        self.api_key = api_key
        # Chat answers: None / "auto" = chosen from the chat template, "none" = off (see serving_chat.py).
        self.tool_call_parser = tool_call_parser
        self.reasoning_parser = reasoning_parser
        self._served_model_name = served_model_name
        self.metrics = ServerMetrics(engine.stats)
        self.draining = False   # set on SIGTERM: every new request is answered 503
        self._sampling_defaults: dict[str, Any] | None = None

    @property
    def model_name(self) -> str:
        """--served-model-name, else the model as the user named it (vLLM's habit), else the
        built-in model's file name without its folder."""
        if self._served_model_name:
            return self._served_model_name
        if not self.engine.is_ready:
            return "loading"
        engine = self.engine.engine
        return engine.config.model or Path(engine.model_name).stem

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The model's generation_config.json sampling options (temperature, top_p, top_k, min_p,
        repetition_penalty): defaults for what a request leaves unset, as vLLM applies them."""
        if self._sampling_defaults is None:
            from ondo.server.params import model_sampling_defaults

            self._sampling_defaults = model_sampling_defaults(_generation_config(self.engine.engine))
        return self._sampling_defaults

    @property
    def tokenizer(self) -> Any:
        tokenizer = self.engine.engine.tokenizer
        if tokenizer is None:
            raise bad_request("this model has no tokenizer: send prompts as token id lists", "prompt")
        return tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    def check_ready(self) -> None:
        if not self.engine.is_ready:
            if self.engine.dead_error is not None:
                message = "the engine failed and the server is restarting; retry shortly"
            elif self.engine.load_error is not None:
                message = f"the model failed to load: {self.engine.load_error}"
            elif self.draining:
                message = "the server is shutting down; retry on another instance"
            else:
                message = "the model is still loading; retry shortly"
            raise APIError(503, message)

    def check_model(self, model: str | None) -> None:
        self.check_ready()
        from ondo.server.serving_lora import is_lora_model

        if model is not None and model != self.model_name and not is_lora_model(self, model):
            raise APIError(404, f"the model '{shown(model)}' does not exist; this server serves "
                                f"'{self.model_name}'", param="model", code="model_not_found")


def _generation_config(engine: Any) -> dict[str, Any]:
    """The served model folder's generation_config.json ({} for a GGUF file or a config name)."""
    from ondo.loader.hf import load_generation_config

    model = getattr(engine.config, "model", None)
    if not model:
        return {}
    path = Path(model).expanduser()
    folder = path.parent if path.is_file() and path.name.endswith(".json") else path
    return load_generation_config(folder) if folder.is_dir() else {}


@dataclass
class Job:
    """The engine requests started for one API call: one per prompt, sharing one output queue."""
    response_id: str
    model: str
    prompts: list[tuple[str | None, list[int]]]
    params: SamplingParams
    streams: list[RequestStream] = field(default_factory=list)
    trackers: dict[str, RequestTracker] = field(default_factory=dict)
    prompt_index: dict[str, int] = field(default_factory=dict)   # engine request id -> prompt index

    def usage(self, finals: dict[str, RequestOutput]) -> UsageInfo:
        prompt_tokens = sum(len(ids) for _, ids in self.prompts)
        completion_tokens = sum(len(c.token_ids) for out in finals.values() for c in out.outputs)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn` (tokenizing, a chat template, request checks) in a worker thread: the event loop
    must stay free for /health and the other streams while a huge prompt is being tokenized.
    The request id context goes along, so the worker's log lines name the request."""
    return await asyncio.to_thread(fn, *args)


class _ResolvedBadWordsParams(SamplingParams):
    """SamplingParams whose `bad_words` were turned into token sequences (`bad_words_ids`, without
    duplicates) in a worker thread: the engine thread asks for them again and gets them as they are."""

    def bad_words_token_ids(self, tokenizer: Any) -> list[list[int]]:
        return [list(ids) for ids in self.bad_words_ids]


def _resolve_bad_words(params: SamplingParams, tokenizer: Any) -> SamplingParams:
    """`bad_words` as token sequences, so that the engine thread (which every stream waits on)
    neither tokenizes nor deduplicates thousands of words: the engine gets the same bans."""
    resolved = params.bad_words_token_ids(tokenizer)
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.init}
    return _ResolvedBadWordsParams(**{**fields, "bad_words": [], "bad_words_ids": resolved})


async def start_job(state: ServerState, response_id: str, prompts: list[tuple[str | None, list[int]]],
                    params: SamplingParams, lora_request=None) -> Job:
    """Add every prompt to the engine (through the LoRA adapter `lora_request`, when given); on a
    refusal, take back the ones already added."""
    tokenizer = state.engine.engine.tokenizer
    if params.bad_words and tokenizer is not None:
        params = await off_loop(_resolve_bad_words, params, tokenizer)
    job = Job(response_id, lora_request.lora_name if lora_request else state.model_name, prompts, params)
    queue: asyncio.Queue = asyncio.Queue()
    try:
        for i, (_, ids) in enumerate(prompts):
            request_id = f"{response_id}-{i}"
            job.trackers[request_id] = state.metrics.track()
            job.prompt_index[request_id] = i
            options = {} if lora_request is None else {"lora_request": lora_request}   # stand-ins take none
            job.streams.append(await state.engine.add_request(request_id, ids, params, queue, **options))
    except BaseException as exc:
        for stream in job.streams:
            state.engine.abort(stream.request_id)
        if isinstance(exc, QueueFullError):
            raise APIError(429, str(exc), code="queue_full") from None
        if isinstance(exc, EngineDeadError):
            raise APIError(503, str(exc)) from None
        if isinstance(exc, ValueError):  # the engine's RequestError, SamplingParamsError
            raise bad_request(str(exc)) from None
        raise
    return job


class GenerationFailed(RuntimeError):
    """The engine failed a request (a model or sampler error): a server error, not bad input."""


async def job_outputs(state: ServerState, job: Job) -> AsyncIterator[RequestOutput]:
    """The job's outputs as they come, recorded in the metrics."""
    try:
        async for output in state.engine.stream_outputs(job.streams):
            job.trackers[output.request_id].observe(output)
            if output.error and output.error_is_input:   # e.g. a regex the vocabulary cannot finish
                raise APIError(400, output.error)
            if output.error:
                raise GenerationFailed(output.error)
            yield output
    except EngineDeadError as exc:   # the engine failed or stopped: retry elsewhere or later
        raise APIError(503, str(exc)) from None
    finally:
        for tracker in job.trackers.values():
            tracker.close_unfinished()


async def collect_finals(state: ServerState, job: Job) -> dict[str, RequestOutput]:
    """The last output of each of the job's requests (for non-streaming responses)."""
    finals: dict[str, RequestOutput] = {}
    async for output in job_outputs(state, job):
        finals[output.request_id] = output
    return finals


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it (which aborts its engine requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let the work run its cleanup (the engine aborts)
    if task.cancelled():
        raise APIError(499, "the client closed the connection")
    try:
        return task.result()
    except GenerationFailed as exc:
        raise APIError(500, f"generation failed: {exc}") from None


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def finish_reason_of(completion: CompletionOutput | None) -> str:
    return (completion.finish_reason if completion is not None else None) or "abort"


# ---- SSE ---------------------------------------------------------------------------------------


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(exc: BaseException) -> str:
    if isinstance(exc, APIError):
        return sse(exc.body())
    return sse(error_body(500, f"generation failed: {exc}"))


# ---- log-probs -----------------------------------------------------------------------------------


def finite(value: float) -> float | None:
    """JSON has no NaN or infinities; such log-probs are sent as null."""
    return value if math.isfinite(value) else None


def _chat_logprob(value: float) -> float:
    # The chat format requires a number; OpenAI itself sends -9999.0 for "practically impossible".
    return value if math.isfinite(value) else -9999.0


def positions(completion: CompletionOutput, start: int, end: int) -> list[tuple[int, PositionLogprobs]]:
    """(chosen token id, its position's log-probs) for output tokens [start, end).
    The engine's logprobs list grows in place, so it is sliced by the output's own token count."""
    return list(zip(completion.token_ids[start:end], (completion.logprobs or [])[start:end]))


def top_entries(position: PositionLogprobs, k: int) -> list[tuple[int, Any]]:
    ranked = [(tid, lp) for tid, lp in position.items() if lp.rank is not None and lp.rank <= k]
    return sorted(ranked, key=lambda item: item[1].rank)


def token_text(token_id: int, entry: Any, tokenizer: Any) -> str:
    if entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer is not None else str(token_id)


def chat_logprob_entries(items: list[tuple[int, PositionLogprobs]], k: int, tokenizer: Any) -> list[TokenLogprob]:
    entries = []
    for token_id, position in items:
        chosen = position[token_id]
        text = token_text(token_id, chosen, tokenizer)
        top = [TopLogprob(token=(t := token_text(tid, lp, tokenizer)), logprob=_chat_logprob(lp.logprob),
                          bytes=list(t.encode("utf-8"))) for tid, lp in top_entries(position, k)]
        entries.append(TokenLogprob(token=text, logprob=_chat_logprob(chosen.logprob),
                                    bytes=list(text.encode("utf-8")), top_logprobs=top))
    return entries
