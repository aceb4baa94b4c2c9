"""Linear layers. MergedLinear stores several projections that read the same input as one matrix,
so q/k/v (and gate/up) run as one matrix product; checkpoints still load from their HF names."""
from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    def __init__(self, in_features: int, out_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(out_sizes), bias=bias)
        self.out_sizes = out_sizes
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]

    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        """Copy one HF projection (`weight` or `bias`) into its rows of the merged parameter."""
        param = getattr(self, param_name)
        rows = slice(self.offsets[shard], self.offsets[shard] + self.out_sizes[shard])
        if param[rows].shape != tensor.shape:
            raise ValueError(f"shape mismatch for shard {shard} of {param_name}: "
                             f"checkpoint {tuple(tensor.shape)}, model {tuple(param[rows].shape)}")
        param.data[rows].copy_(tensor)

    def split(self, out: torch.Tensor) -> list[torch.Tensor]:
        return list(out.split(self.out_sizes, dim=-1))
