"""The linear seam: every matrix product of a model goes through `Linear`.

A `Linear` owns its shape (and, for merged projections, the row ranges of each HF projection); its
*method* owns storage and kernel: dense, GGUF blocks, int8, int4, NF4 (`ondo/layers/quantization/`).
Models name only the layer; the loader picks the method (`linear_method_scope`), so the same model
file runs dense, quantized or (later) sharded and with LoRA deltas added at this one place.

`MergedLinear` stores several projections that read the same input (q/k/v, gate/up) as one matrix,
so they run as one product; checkpoints still load from their HF names through `load(..., shard)`.
`VocabEmbedding` is a `Linear` whose rows are also looked up by token id, so a tied LM head and the
embedding share one (possibly packed) matrix.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


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
        return F.linear(x, layer.weight, bias)                               # [T, out]

    def embed(self, layer: "Linear", token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, layer.weight)                          # [T, in]

    def dense_weight(self, layer: "Linear") -> torch.Tensor:
        """The weight as a dense [out, in] matrix in the layer's dtype (for tests and merging)."""
        return layer.weight.data


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
    """y = x W^T (+ b), W: [out_features, in_features] in HF layout, stored as the method decides."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 out_sizes: list[int] | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.out_sizes = out_sizes or [out_features]
        self.offsets = [sum(self.out_sizes[:i]) for i in range(len(self.out_sizes))]
        dtype = torch.get_default_dtype()
        self.method = _method_factory(self)
        self.method.create_weights(self, dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)                         # [T, out]

    def shard_rows(self, shard: int | None) -> slice:
        if shard is None:
            return slice(0, self.out_features)
        return slice(self.offsets[shard], self.offsets[shard] + self.out_sizes[shard])

    def load(self, param_name: str, tensor, shard: int | None = None) -> None:
        """Load an HF tensor (`weight` [rows, in] or `bias` [rows]) into shard `shard` (None = all rows)."""
        rows = self.shard_rows(shard)
        if param_name == "bias":
            if self.bias is None:
                raise ValueError(f"{type(self).__name__} was built without a bias, but the checkpoint has one")
            _check_shape(self, tensor, self.bias.data[rows].shape)
            self.bias.data[rows].copy_(tensor)
        elif param_name == "weight":
            self.method.load_weight(self, tensor, rows)
        else:
            raise ValueError(f"a linear layer loads 'weight' or 'bias', got {param_name!r}")

    def finish_loading(self) -> None:
        self.method.finish_loading(self)

    def split(self, out: torch.Tensor) -> list[torch.Tensor]:
        return list(out.split(self.out_sizes, dim=-1))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_sizes}, bias={self.bias is not None}, method={self.method.name}"


class MergedLinear(Linear):
    """Several projections of the same input as one matrix: rows [offsets[i], offsets[i] + out_sizes[i])."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(out_sizes), bias=bias, out_sizes=list(out_sizes))


class VocabEmbedding(Linear):
    """The token embedding [vocab, hidden]: `forward` looks rows up; `project` is the (tied) LM head."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(embedding_dim, num_embeddings, bias=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.method.embed(self, token_ids)                            # [T, hidden]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, hidden)                               # [T, vocab]


class LMHead(Linear):
    """An untied output projection [vocab, hidden] (a tied one is the `VocabEmbedding` itself)."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self(hidden)                                                  # [T, vocab]


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
