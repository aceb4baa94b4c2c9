"""Engine configuration: one frozen dataclass, checked when built.

What is discovered at start-up (number of KV blocks, EOS ids) lives on the engine, never in here.
"""
from __future__ import annotations

from dataclasses import dataclass

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_LOAD_FORMATS = ("auto", "dummy")
_QUANTIZATIONS = (None, "int8", "int4", "nf4", "none")
_KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """An engine option is out of range; the message names the option, what is allowed and the value."""


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None                 # HF folder, .gguf file, or a config.json (dummy); None = built-in model
    tokenizer: str | None = None             # defaults to the model folder / GGUF metadata
    checkpoint: str | None = None            # fine-tuned state dict (.ckpt/.pt/.bin/.safetensors) over `model`
    chat_template: str | None = None         # a template string or a file path; overrides the model's
    dtype: str = "auto"
    device: str = "auto"                     # "auto" = cuda when available, else cpu
    seed: int | None = None                 # seeds the shared RNG of unseeded requests; None = random
    max_model_len: int | None = None         # default: the model's context length, capped at 8192 on the CPU
    max_num_seqs: int = 64                   # requests in one step at most
    max_num_batched_tokens: int | None = None  # token budget of one step; None = 8192 on a GPU, 2048 on the CPU
    # Prompt tokens per step while any request decodes (decodes go first), so a long prompt arriving
    # does not stall the streams already running. "auto" (`ondo serve`'s default): 256 on the CPU, on a
    # GPU as many as a ~30 ms share of a step prefills (timed at start-up); None (LLM's default): 256 on
    # the CPU, no cap on a GPU (throughput first); 0 = no cap; N = N tokens.
    prefill_tokens_while_decoding: int | str | None = None
    block_size: int = 16                     # tokens per KV block
    kv_cache_memory_bytes: int | None = None # default: derived from gpu_memory_utilization or CPU RAM
    # The cache's element type. "auto": the activations' dtype, except float16 for quantized weights with
    # float32 activations on the CPU (half the memory, and half the bytes a decode step's attention reads).
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False              # turns the fast paths (CUDA graphs, fused kernels) off
    # Each step scheduled and launched before the previous step's tokens reach the host
    # (ondo/engine/in_flight.py); None = where CUDA graphs run (on the CPU the device is the host).
    async_scheduling: bool | None = None
    load_format: str = "auto"                # "dummy" = random weights from a config (benchmarks)
    max_waiting: int | None = None           # waiting-queue bound (server); None = unbounded
    # None = as the checkpoint holds it (GGUF blocks stay packed; a folder's quantization_config is read);
    # "int8" | "int4" | "nf4" quantize a dense folder while loading; "none" dequantizes a GGUF file.
    quantization: str | None = None
    # Ranks (one worker process per device) that split every layer; the devices are cuda:0..N-1 on a GPU,
    # N gloo processes on the CPU. Several nodes: see docs/distributed.md.
    tensor_parallel_size: int = 1
    # LoRA adapters (ondo/lora): slots on the device, the largest rank they hold, adapters named at
    # start-up (name, PEFT folder), and the one applied to requests that name none (CLI --lora).
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    lora_modules: tuple[tuple[str, str], ...] = ()
    default_lora: str | None = None

    def __post_init__(self) -> None:
        _check(self.dtype in _DTYPES, f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        _check(self.load_format in _LOAD_FORMATS, f"load_format must be one of {_LOAD_FORMATS}, got {self.load_format!r}")
        _check(_is_int(self.max_num_seqs) and self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs!r}")
        _check(_is_int(self.block_size) and self.block_size in (8, 16, 32, 64, 128),
               f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size!r}")
        _check(self.max_num_batched_tokens is None or
               (_is_int(self.max_num_batched_tokens) and self.max_num_batched_tokens >= self.block_size),
               f"max_num_batched_tokens must be >= block_size ({self.block_size}), got {self.max_num_batched_tokens!r}")
        _check(self.prefill_tokens_while_decoding in (None, "auto") or
               (_is_int(self.prefill_tokens_while_decoding) and self.prefill_tokens_while_decoding >= 0),
               f"prefill_tokens_while_decoding must be an integer >= 0 (0 = no cap), 'auto' or None, "
               f"got {self.prefill_tokens_while_decoding!r}")
        _check(self.max_model_len is None or (_is_int(self.max_model_len) and self.max_model_len >= 1),
               f"max_model_len must be >= 1, got {self.max_model_len!r}")
        _check(0 < self.gpu_memory_utilization <= 1,
               f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        _check(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
               f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes!r}")
        _check(self.kv_cache_dtype in _KV_CACHE_DTYPES,
               f"kv_cache_dtype must be one of {_KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        _check(self.max_waiting is None or (_is_int(self.max_waiting) and self.max_waiting >= 1),
               f"max_waiting must be >= 1, got {self.max_waiting!r}")
        _check(self.quantization in _QUANTIZATIONS,
               f"quantization must be one of {list(_QUANTIZATIONS[1:])} or None, got {self.quantization!r}")
        _check(_is_int(self.tensor_parallel_size) and self.tensor_parallel_size >= 1,
               f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size!r}")
        _check(self.tensor_parallel_size == 1 or self.device in ("auto", "cpu", "cuda"),
               f"device must be 'auto', 'cpu' or 'cuda' with tensor_parallel_size > 1 (rank i runs on cuda:i), "
               f"got {self.device!r}")
        _check(self.async_scheduling in (None, True, False),
               f"async_scheduling must be True, False or None (where CUDA graphs run), got {self.async_scheduling!r}")
        _check(_is_int(self.max_loras) and self.max_loras >= 1, f"max_loras must be >= 1, got {self.max_loras!r}")
        _check(_is_int(self.max_lora_rank) and 1 <= self.max_lora_rank <= 512,
               f"max_lora_rank must be in [1, 512], got {self.max_lora_rank!r}")
        _check(self.enable_lora or not (self.lora_modules or self.default_lora),
               "lora_modules and default_lora need enable_lora=True")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
