"""ondo: a fast, self-hosted LLM inference engine and server."""
from ondo.llm import LLM
from ondo.outputs import CompletionOutput, Logprob, RequestOutput
from ondo.sampling_params import SamplingParams, SamplingParamsError

__all__ = ["LLM", "SamplingParams", "SamplingParamsError", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
