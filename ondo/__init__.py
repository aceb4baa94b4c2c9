"""ondo: a fast, self-hosted LLM inference engine and server.

The public names are imported on first use (PEP 562), so `ondo --help` and `import ondo.cli` do not
pay for importing torch.
"""
from ondo.logging_setup import configure as _configure_logging

_configure_logging()

_EXPORTS = {
    "LLM": "ondo.llm",
    "LoRARequest": "ondo.lora.request",
    "SamplingParams": "ondo.sampling_params",
    "SamplingParamsError": "ondo.sampling_params",
    "RequestOutput": "ondo.outputs",
    "CompletionOutput": "ondo.outputs",
    "Logprob": "ondo.outputs",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ondo' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value   # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
