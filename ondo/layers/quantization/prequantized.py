"""Folders that are already quantized: `quantization_config` in config.json names the format.

| quant_method | what | payload (`ondo/loader/prequantized.py` groups a layer's tensors into it) | storage |
|---|---|---|---|
| bitsandbytes, load_in_4bit | NF4 or fp4, with or without double quantization | `NF4Blocks` | `NF4Method` |
| bitsandbytes, load_in_8bit | LLM.int8 weights: int8 + `SCB` per row | `Int8Rows` | `Int8Method` |
| gptq (bits 4) | AutoGPTQ layout, v1 or v2 zeros, act-order included | `PackedInt4` | int4 planes |
| awq (bits 4, version gemm) | AutoAWQ GEMM layout | `PackedInt4` | int4 planes |

Each layer follows what the checkpoint holds for it: the quantizers leave some layers dense (the LM
head, `modules_to_not_convert` / `llm_int8_skip_modules`), and those load dense here, so the skip lists
are honoured by construction. A merged layer whose shards are stored differently (one projection
skipped, the others quantized) is dequantized to a dense matrix, exactly. Token embeddings and the
LM head always use the dense method (a quantized one is dequantized as it loads).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ondo.layers.linear import DENSE, Linear, LinearMethod, LMHead, VocabEmbedding

SUPPORTED = ("bitsandbytes (load_in_4bit: nf4 or fp4; load_in_8bit), gptq (bits 4, AutoGPTQ layout), "
             "awq (bits 4, version gemm)")


@dataclass(frozen=True)
class CheckpointFormat:
    """What a folder's quantization_config says, checked."""

    method: str                   # "bnb-4bit" | "bnb-8bit" | "gptq" | "awq"
    group_size: int = -1          # GPTQ/AWQ: inputs per group (-1: the whole row)
    zero_shift: int = 0           # GPTQ v1 stores each zero minus one

    @property
    def int4_planes(self) -> bool:
        """Whether the layers are stored as int4 planes (GPTQ, AWQ; the table above)."""
        return self.method in ("gptq", "awq")


def checkpoint_format(hf_config) -> CheckpointFormat | None:
    """None for a dense folder; the checked format otherwise (QuantizationError naming what is supported)."""
    from ondo.layers.quantization import QuantizationError

    raw = getattr(hf_config, "quantization_config", None)
    if not raw:
        return None
    config = dict(raw if isinstance(raw, dict) else raw.to_dict() if hasattr(raw, "to_dict") else vars(raw))
    method = str(config.get("quant_method") or ("bitsandbytes" if _bnb_flags(config) else "")).lower()

    def unsupported(why: str) -> QuantizationError:
        return QuantizationError(f"quantization_config: {why}; supported: {SUPPORTED}")

    if method == "bitsandbytes":
        if config.get("load_in_4bit") or config.get("_load_in_4bit"):
            quant_type = config.get("bnb_4bit_quant_type", "fp4")
            if quant_type not in ("nf4", "fp4"):
                raise unsupported(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
            return CheckpointFormat("bnb-4bit")
        if config.get("load_in_8bit") or config.get("_load_in_8bit"):
            return CheckpointFormat("bnb-8bit")
        raise unsupported("a bitsandbytes config with neither load_in_4bit nor load_in_8bit")
    if method in ("gptq", "awq"):
        bits = config.get("bits", config.get("w_bit"))
        if bits != 4:
            raise unsupported(f"{method} bits must be 4, got {bits!r}")
        group = int(config.get("group_size", config.get("q_group_size", -1)))
        if group != -1 and (group <= 0 or group % 8):
            raise unsupported(f"{method} group_size must be -1 or a positive multiple of 8, got {group}")
        if method == "awq":
            version = str(config.get("version", "gemm")).lower()
            if version != "gemm":
                raise unsupported(f"awq version must be 'gemm', got {version!r}")
            if config.get("zero_point", True) is False:
                raise unsupported("awq zero_point must be true")
            return CheckpointFormat("awq", group)
        layout = str(config.get("checkpoint_format", config.get("format", "gptq"))).lower()
        if layout not in ("gptq", "gptq_v2") or config.get("is_marlin_format"):
            raise unsupported(f"gptq checkpoint_format must be 'gptq' or 'gptq_v2', got {layout!r}")
        return CheckpointFormat("gptq", group, zero_shift=1 if layout == "gptq" else 0)
    raise unsupported(f"quant_method {method or None!r} is not supported")


def _bnb_flags(config: dict) -> bool:
    return bool(config.get("load_in_4bit") or config.get("load_in_8bit"))


def prequantized_factory(hf_config) -> Callable[[Linear], LinearMethod] | None:
    """None for a dense folder; else the method factory for its quantization_config."""
    fmt = checkpoint_format(hf_config)
    if fmt is None:
        return None
    method = CheckpointMethod(fmt)
    return lambda layer: DENSE if isinstance(layer, (VocabEmbedding, LMHead)) else method


class CheckpointMethod(LinearMethod):
    """Stages what the checkpoint holds for a layer, then hands the layer to the method that stores it."""

    def __init__(self, fmt: CheckpointFormat):
        self.fmt = fmt
        self.name = f"{fmt.method} (loading)"

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        layer.run_dtype, layer.run_device = dtype, torch.get_default_device()
        layer.staged = []                                    # (rows, payload or dense tensor)

    def load_weight(self, layer: Linear, tensor, rows: slice) -> None:
        # Checked now, so that a bad tensor is reported under its checkpoint name.
        expected = (rows.stop - rows.start, layer.in_features)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"shape mismatch in {type(layer).__name__}: checkpoint {tuple(tensor.shape)}, "
                             f"model {expected}")
        _check_payload(tensor)
        layer.staged.append((rows, tensor))

    def finish_loading(self, layer: Linear) -> None:
        from ondo.layers.quantization.gptq_awq import PackedInt4, store_packed_int4
        from ondo.layers.quantization.int8 import Int8Method, Int8Rows
        from ondo.layers.quantization.nf4 import NF4Blocks, NF4Method

        staged = layer.staged
        del layer.staged
        kinds = {type(payload) for _, payload in staged}
        if kinds == {PackedInt4}:
            store_packed_int4(layer, self.fmt.method, staged)
            return
        target = {NF4Blocks: NF4Method, Int8Rows: Int8Method}.get(kinds.pop(), None) if len(kinds) == 1 else None
        target = target() if target else DENSE
        if target is DENSE:                      # dense in the checkpoint, or shards stored differently
            staged = [(rows, t if isinstance(t, torch.Tensor) else t.dequantize()) for rows, t in staged]
        with torch.device(layer.run_device):
            target.create_weights(layer, layer.run_dtype)
        for rows, payload in staged:
            target.load_weight(layer, payload, rows)
        target.finish_loading(layer)
        layer.method = target


def _check_payload(payload) -> None:
    from ondo.layers.quantization.gptq_awq import PackedInt4
    from ondo.layers.quantization.nf4 import NF4Blocks, check_nf4_shape

    if isinstance(payload, PackedInt4):
        payload.check()
    elif isinstance(payload, NF4Blocks):
        check_nf4_shape(payload.shape, payload.blocksize)
