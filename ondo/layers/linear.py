"""The linear seam: every matrix product of a model goes through `Linear`.

A `Linear` owns its shape (and, for merged projections, the row ranges of each HF projection); its
*method* owns storage and kernel: dense, GGUF blocks, int8, int4, NF4 (`ondo/layers/quantization/`).
Models name only the layer; the loader picks the method (`linear_method_scope`), so the same model
file runs dense, quantized or sharded over ranks, with LoRA deltas added at this one place.

`MergedLinear` stores several projections that read the same input (q/k/v, gate/up) as one matrix,
so they run as one product; checkpoints still load from their HF names through `load(..., shard)`.
`VocabEmbedding` is a `Linear` whose rows are also looked up by token id, so a tied LM head and the
embedding share one (possibly packed) matrix.

Tensor parallelism: a model names each layer's *parallel kind* (`parallel=`), never the method.
- "replicated" (default): every rank holds the whole matrix.
- "column": each rank holds a slice of the output rows; a merged layer slices every projection
  separately (rank r holds its own heads' q, k and v rows); `out_replicas` lets a projection with
  fewer parts than ranks (KV heads) be held whole by several ranks. The output stays sharded.
- "row": each rank holds a slice of the input columns and multiplies the matching slice of x; the
  partial products are summed over the ranks (all-reduce) and the bias is added once, after the sum.
`load` always receives the full HF tensor and cuts this rank's part (`take`) before the method sees
it, so dense, GGUF blocks, int8/int4/NF4 quantize-on-load and GPTQ/AWQ payloads all shard.
`VocabEmbedding` / `LMHead` split the vocabulary (padded to divide) and hand back full logits.
At tensor_parallel_size 1 nothing is cut and no collective runs.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ondo.distributed.parallel_state import all_gather, all_reduce, divide, kv_heads_per_rank, tp_rank, tp_size
from ondo.engine.forward_context import fused_ops_enabled

PARALLEL_KINDS = ("replicated", "column", "row")


class LinearMethod:
    """How one `Linear` stores its weight and multiplies by it. The dense method is the reference."""

    name = "dense"

    def create_weights(self, layer: "Linear", dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features, dtype=dtype),
                                    requires_grad=False)

    def load_weight(self, layer: "Linear", tensor: torch.Tensor, rows: slice) -> None:
        """Copy an HF-layout weight [rows, in_features] into output rows `rows` of the layer.

        A packed payload (anything with `.dequantize()`, e.g. GGUF blocks) is dequantized first."""
        if not isinstance(tensor, torch.Tensor):
            tensor = tensor.dequantize()
        target = layer.weight.data[rows]
        _check_shape(layer, tensor, target.shape)
        target.copy_(tensor)

    def finish_loading(self, layer: "Linear") -> None:
        """Called once every shard is loaded (repacking, quantizing, dropping staging buffers)."""

    def apply(self, layer: "Linear", x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] == 1 and _one_row_gemv(x, layer.weight):   # single-stream decode on a GPU
            from ondo.layers.dense_gemv import gemv

            return gemv(x, layer.weight, bias)                               # [1, out]
        return F.linear(x, layer.weight, bias)                               # [T, out]

    def apply_gated(self, layer: "Linear", x: torch.Tensor, bias: torch.Tensor | None,
                    activation: str) -> torch.Tensor | None:
        """act(gate) * up [T, out / 2] of a [gate | up] layer in one kernel ("silu" or "gelu_tanh"), where
        the method has such a kernel for this input (one-row decode on a GPU); None otherwise. Here the
        dense one, for matrices up to GATED_GEMV_MAX_BYTES; a method with its own `apply` fuses only where
        it overrides this."""
        if (type(self).apply is LinearMethod.apply and x.shape[0] == 1 and _one_row_gemv(x, layer.weight)
                and layer.weight.nbytes <= GATED_GEMV_MAX_BYTES):
            from ondo.layers.dense_gemv import gemv

            return gemv(x, layer.weight, bias, gated=activation)             # [1, out / 2]
        return None

    def embed(self, layer: "Linear", token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, layer.weight)                          # [T, in]

    def dense_weight(self, layer: "Linear") -> torch.Tensor:
        """The weight as a dense [out, in] matrix in the layer's dtype (for tests and merging)."""
        return layer.weight.data


# The dense one-row product applies the MLP's activation itself only for [gate | up] matrices up to this
# size. On the H200 (benchmarks/latency.py, one stream): Qwen3-0.6B's 12.6 MB gate_up decodes 1-4 % faster
# with the act kernel's launch saved; Llama-3-8B's 235 MB one 2 % slower (measured end to end: the pairing
# of gate row c with up row c + I costs the large product more than the launch it saves). The line lies between.
GATED_GEMV_MAX_BYTES = 64 << 20


def _one_row_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a one-row product goes to the Triton GEMV (dense_gemv.py): half precision on a GPU, in a
    forward that runs the fused kernels (not under enforce_eager, which keeps F.linear as the reference)."""
    return (x.is_cuda and x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and x.is_contiguous() and weight.stride(1) == 1 and fused_ops_enabled())


DENSE = LinearMethod()
_method_factory: Callable[["Linear"], LinearMethod] = lambda layer: DENSE


@contextlib.contextmanager
def linear_method_scope(factory: Callable[["Linear"], LinearMethod]) -> Iterator[None]:
    """Layers built inside this scope get their method from `factory(layer)` (the loader's choice)."""
    global _method_factory
    previous, _method_factory = _method_factory, factory
    try:
        yield
    finally:
        _method_factory = previous


class Linear(nn.Module):
    """y = x W^T (+ b), W: [out_features, in_features] in HF layout, stored as the method decides.

    `in_features`, `out_features` and `out_sizes` are this rank's; `full_shape` is the checkpoint's."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 out_sizes: list[int] | None = None, parallel: str = "replicated",
                 out_replicas: list[int] | None = None):
        super().__init__()
        if parallel not in PARALLEL_KINDS:
            raise ValueError(f"parallel must be one of {list(PARALLEL_KINDS)}, got {parallel!r}")
        self.parallel = parallel
        self.sharded = parallel != "replicated" and tp_size() > 1
        self.full_in_features = in_features
        self.full_out_sizes = list(out_sizes or [out_features])
        self.full_offsets = _offsets(self.full_out_sizes)
        replicas = out_replicas or [1] * len(self.full_out_sizes)
        # The rows of each HF projection and the input columns this rank holds.
        if self.sharded and parallel == "column":
            self.source_rows = [_rank_part(size, r, "output rows") for size, r in zip(self.full_out_sizes, replicas)]
        else:
            self.source_rows = [slice(0, size) for size in self.full_out_sizes]
        self.source_cols = (_rank_part(in_features, 1, "input columns") if self.sharded and parallel == "row"
                            else slice(0, in_features))
        self.in_features = self.source_cols.stop - self.source_cols.start
        self.out_sizes = [rows.stop - rows.start for rows in self.source_rows]
        self.out_features = sum(self.out_sizes)
        self.offsets = _offsets(self.out_sizes)
        dtype = torch.get_default_dtype()
        self.method = _method_factory(self)
        self.method.create_weights(self, dtype)
        # A row-parallel bias is whole on every rank: it is added once, after the all-reduce.
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype), requires_grad=False) if bias else None
        self.lora: nn.Module | None = None   # set by ondo.lora when adapters are enabled: adds their delta

    @property
    def full_shape(self) -> tuple[int, int]:
        """The checkpoint's [out, in] for this layer (what `load(..., shard=None)` expects)."""
        return sum(self.full_out_sizes), self.full_in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # An adapter's first half (x A^T) may start before the base product and run beside it (ondo/lora).
        lora_started = self.lora.begin(x) if self.lora is not None else None
        if self.sharded and self.parallel == "row":
            out = self.method.apply(self, x)                                 # [T, out] this rank's partial sum
            if self.lora is not None:
                out = self.lora.finish(x, out, lora_started)                 # before the sum, as its own partial
            out = all_reduce(out)                                            # [T, out]
            return out if self.bias is None else out + self.bias
        out = self.method.apply(self, x, self.bias)                          # [T, out]
        if self.lora is not None:
            out = self.lora.finish(x, out, lora_started)                     # out + x A^T B^T per token's adapter
        return out

    def shard_rows(self, shard: int | None) -> slice:
        """This rank's rows of projection `shard` (None = all rows) inside the layer's storage."""
        if shard is None:
            return slice(0, self.out_features)
        return slice(self.offsets[shard], self.offsets[shard] + self.out_sizes[shard])

    def load(self, param_name: str, tensor, shard: int | None = None) -> None:
        """Load a full HF tensor (`weight` [rows, in] or `bias` [rows]) of projection `shard` (None = the
        whole layer, every projection's rows in order); a sharded layer keeps only this rank's part."""
        if param_name not in ("weight", "bias"):
            raise ValueError(f"a linear layer loads 'weight' or 'bias', got {param_name!r}")
        if param_name == "bias" and self.bias is None:
            raise ValueError(f"{type(self).__name__} was built without a bias, but the checkpoint has one")
        if not self.sharded:
            self._store(param_name, tensor, self.shard_rows(shard))
        elif self.parallel == "column":
            for part in ([shard] if shard is not None else range(len(self.out_sizes))):
                base = 0 if shard is not None else self.full_offsets[part]
                rows = self.source_rows[part]
                piece = take(tensor, 0, slice(base + rows.start, base + rows.stop))
                self._store(param_name, piece, self.shard_rows(part))
        else:
            piece = take(tensor, 1, self.source_cols) if param_name == "weight" else tensor
            self._store(param_name, piece, self.shard_rows(shard))

    def _store(self, param_name: str, tensor, rows: slice) -> None:
        if param_name == "bias":
            _check_shape(self, tensor, self.bias.data[rows].shape)
            self.bias.data[rows].copy_(tensor)
        else:
            self.method.load_weight(self, tensor, rows)

    def finish_loading(self) -> None:
        self.method.finish_loading(self)

    def split(self, out: torch.Tensor) -> list[torch.Tensor]:
        return list(out.split(self.out_sizes, dim=-1))

    def gated(self, x: torch.Tensor, activation: str) -> torch.Tensor | None:
        """act(gate) * up of a [gate | up] layer straight from the product where the method can fuse it
        (`LinearMethod.apply_gated`); None where it cannot, or where a LoRA delta or a sum over ranks
        must reach the product's output first."""
        if self.lora is not None or (self.sharded and self.parallel == "row") or x.dim() != 2:
            return None
        if len(self.out_sizes) != 2 or self.out_sizes[0] != self.out_sizes[1]:
            raise ValueError(f"a gated product needs two equal projections [gate | up], got {self.out_sizes}")
        return self.method.apply_gated(self, x, self.bias, activation)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_sizes}, bias={self.bias is not None}, "
                f"method={self.method.name}, parallel={self.parallel}")


class MergedLinear(Linear):
    """Several projections of the same input as one matrix: rows [offsets[i], offsets[i] + out_sizes[i])."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, parallel: str = "replicated",
                 out_replicas: list[int] | None = None):
        super().__init__(in_features, sum(out_sizes), bias=bias, out_sizes=list(out_sizes), parallel=parallel,
                         out_replicas=out_replicas)


class QKVLinear(MergedLinear):
    """q, k and v as one column-parallel matrix; `num_heads` / `num_kv_heads` are this rank's.

    Query heads are split over the ranks; KV heads are split when there are at least as many as ranks,
    else each is replicated on the ranks whose query heads read it (`kv_heads_per_rank`)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool):
        heads = divide(num_heads, "num_attention_heads")
        kv_heads, kv_replicas = kv_heads_per_rank(num_kv_heads)
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, [q_size, kv_size, kv_size], bias=bias, parallel="column",
                         out_replicas=[1, kv_replicas, kv_replicas])
        self.num_heads, self.num_kv_heads = heads, kv_heads


class _VocabParallel(Linear):
    """A [vocab, hidden] matrix split by vocabulary rows: rank r holds rows [r * n, (r + 1) * n) with
    n = ceil(vocab / tp_size); rows past the vocabulary are zero padding."""

    def __init__(self, vocab_size: int, hidden_size: int):
        per_rank = -(-vocab_size // tp_size())
        super().__init__(hidden_size, per_rank, bias=False)
        self.vocab_size, self.vocab_sharded = vocab_size, tp_size() > 1
        self.vocab_start = tp_rank() * per_rank

    @property
    def full_shape(self) -> tuple[int, int]:
        return self.vocab_size, self.full_in_features

    def load(self, param_name: str, tensor, shard: int | None = None) -> None:
        if self.vocab_sharded and param_name == "weight":
            stop = min(self.vocab_start + self.out_features, self.vocab_size)
            tensor = pad_rows(take(tensor, 0, slice(min(self.vocab_start, stop), stop)), self.out_features)
        super().load(param_name, tensor, shard)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """[T, vocab / tp] on each rank -> [T, vocab] on every rank (the padding cut)."""
        if not self.vocab_sharded:
            return local
        return all_gather(local, dim=-1)[..., :self.vocab_size]               # [T, vocab]


class VocabEmbedding(_VocabParallel):
    """The token embedding [vocab, hidden]: `forward` looks rows up; `project` is the (tied) LM head."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if not self.vocab_sharded:
            return self.method.embed(self, token_ids)                        # [T, hidden]
        local = token_ids - self.vocab_start
        inside = (local >= 0) & (local < self.out_features)
        rows = self.method.embed(self, torch.where(inside, local, torch.zeros_like(local)))  # [T, hidden]
        # Tokens of other ranks' shards give zeros, so the sum over ranks is every token's own row, exactly.
        return all_reduce(rows.masked_fill(~inside.unsqueeze(-1), 0))        # [T, hidden]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.gather_logits(self.method.apply(self, hidden))           # [T, vocab]


class LMHead(_VocabParallel):
    """An untied output projection [vocab, hidden] (a tied one is the `VocabEmbedding` itself)."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(vocab_size, hidden_size)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.gather_logits(self(hidden))                              # [T, vocab]


def take(tensor, dim: int, index: slice):
    """Part `index` of a full HF tensor or packed payload along `dim` (0 = output rows, 1 = inputs).

    A payload cuts itself (`payload.shard(dim, index)`) when its packing allows; one that cannot (e.g.
    GGUF blocks cut inside a block) returns None and is dequantized here, exactly, to a dense float32
    slice, which the layer's method then stores dense or quantizes as it would a dense checkpoint."""
    if index.start == 0 and index.stop == tensor.shape[dim]:
        return tensor
    if isinstance(tensor, torch.Tensor):
        return tensor.narrow(dim, index.start, index.stop - index.start)
    cut = tensor.shard(dim, index) if hasattr(tensor, "shard") else None
    if cut is not None:
        return cut
    return tensor.dequantize().narrow(dim, index.start, index.stop - index.start)


def pad_rows(tensor, rows: int):
    """A tensor or payload with zero rows appended up to `rows` (vocabulary padding)."""
    missing = rows - tensor.shape[0]
    if missing == 0:
        return tensor
    if not isinstance(tensor, torch.Tensor):
        if hasattr(tensor, "pad_rows"):
            return tensor.pad_rows(rows)
        tensor = tensor.dequantize()
    return F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, missing))


def _rank_part(total: int, replicas: int, what: str) -> slice:
    """This rank's contiguous part of `total` when it is cut into tp_size / replicas parts."""
    parts = tp_size() // replicas
    if total % parts:
        raise ValueError(f"{what} ({total}) must be divisible by tensor_parallel_size ({tp_size()})"
                         + (f" / {replicas}" if replicas > 1 else ""))
    size = total // parts
    start = (tp_rank() // replicas) * size
    return slice(start, start + size)


def _offsets(sizes: list[int]) -> list[int]:
    return [sum(sizes[:i]) for i in range(len(sizes))]


def row_chunks(rows: int, chunk: int = 4096) -> list[slice]:
    """Output rows in chunks, so a method that dequantizes a large matrix needs little scratch memory."""
    return [slice(start, min(start + chunk, rows)) for start in range(0, rows, chunk)]


def linear_layers(model: nn.Module) -> Iterator[tuple[str, Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            yield name, module


def _check_shape(layer: nn.Module, tensor, expected) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"shape mismatch in {type(layer).__name__}: checkpoint {tuple(tensor.shape)}, "
                         f"model {tuple(expected)}")
