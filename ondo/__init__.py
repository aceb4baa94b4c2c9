"""ondo: a fast, self-hosted LLM inference engine and server."""
from ondo.logging_setup import configure as _configure_logging

_configure_logging()

from ondo.llm import LLM  # noqa: E402
from ondo.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from ondo.sampling_params import SamplingParams, SamplingParamsError  # noqa: E402

__all__ = ["LLM", "SamplingParams", "SamplingParamsError", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
