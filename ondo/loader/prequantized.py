"""Reading a pre-quantized folder: the tensors of each quantized layer become one `<layer>.weight` payload.

A quantized checkpoint spells a layer as several tensors (`q_proj.qweight`, `q_proj.scales`, ...;
`q_proj.weight`, `q_proj.weight.absmax`, ...). They are gathered here, per layer, into the payload
object of their format, named `<layer>.weight`, so `load_weights` sees HF names as for a dense folder
(merged q/k/v included) and models need no quantization code. The quantization tensors are read as
stored (float32 absmax, float16 scales, int32 packs): only the dense tensors are cast to the run dtype.
A layer's tensors may sit in different shard files; a group is emitted once all of its parts are read.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ondo.layers.quantization.prequantized import CheckpointFormat, checkpoint_format
from ondo.loader.hf import ModelLoadError, cast_float, iter_weight_file, torch_load

_BNB4_STATE = "weight.quant_state.bitsandbytes__"
# Per format: the suffixes that mark a quantized layer, and every suffix that belongs to its group.
_GROUPS = {
    "bnb-4bit": ((_BNB4_STATE + "nf4", _BNB4_STATE + "fp4"),
                 ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                  _BNB4_STATE + "nf4", _BNB4_STATE + "fp4")),
    "bnb-8bit": (("SCB",), ("weight", "SCB", "weight_format")),
    "gptq": (("qweight",), ("qweight", "qzeros", "scales", "g_idx")),
    "awq": (("qweight",), ("qweight", "qzeros", "scales")),
}


def iter_folder_weights(files: list[Path], dtype: torch.dtype | None, hf_config) -> Iterator[tuple[str, object]]:
    """(name, tensor or payload) pairs of a folder's weight files, quantized layers grouped."""
    fmt = checkpoint_format(hf_config)
    if fmt is None:
        for path in files:
            yield from iter_weight_file(path, dtype)
        return
    markers, members = _GROUPS[fmt.method]
    names = [name for path in files for name in _tensor_names(path)]
    layers = {name[: -len(m) - 1] for name in names for m in markers if name.endswith("." + m)}
    expected: dict[str, set[str]] = {}
    for name in names:
        layer, part = _split(name, layers, members)
        if layer is not None:
            expected.setdefault(layer, set()).add(part)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for path in files:
        for name, tensor in _raw_tensors(path):
            layer, part = _split(name, layers, members)
            if layer is None:
                yield name, cast_float(tensor, dtype)
                continue
            parts = pending.setdefault(layer, {})
            parts[part] = tensor
            if set(parts) == expected[layer]:
                del pending[layer]
                yield f"{layer}.weight", _payload(fmt, f"{layer}.weight", parts)


def _payload(fmt: CheckpointFormat, name: str, parts: dict[str, torch.Tensor]):
    try:
        if fmt.method == "bnb-4bit":
            return _bnb4_payload(parts)
        if fmt.method == "bnb-8bit":
            from ondo.layers.quantization.int8 import Int8Rows

            if "weight_format" in parts and int(parts["weight_format"]) != 0:
                raise ValueError(f"bitsandbytes 8-bit weight_format {int(parts['weight_format'])} is not "
                                 "supported; only the row-major format (0) that save_pretrained writes")
            return Int8Rows.from_absmax(parts["weight"], parts["SCB"])
        from ondo.layers.quantization.gptq_awq import PackedInt4

        return PackedInt4(fmt.method, parts["qweight"], parts["qzeros"], parts["scales"], fmt.group_size,
                          parts.get("g_idx"), fmt.zero_shift)
    except KeyError as missing:
        raise ModelLoadError(f"{name}: the checkpoint lacks its {missing.args[0]!r} tensor") from None
    except ValueError as error:
        raise ModelLoadError(f"{name}: {error}") from None


def _bnb4_payload(parts: dict[str, torch.Tensor]):
    from ondo.layers.quantization.nf4 import NF4Blocks

    state_key = next(k for k in parts if k.startswith(_BNB4_STATE))
    state = json.loads(bytes(parts[state_key].cpu().numpy()).decode("utf-8"))
    shape = tuple(state["shape"])
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D weight, the quant state says {shape}")
    packed = parts["weight"].contiguous().view(torch.uint8).reshape(-1)        # any quant_storage dtype
    nested = "nested_absmax" in state or "weight.nested_absmax" in parts
    return NF4Blocks(packed, parts["weight.absmax"], shape, int(state["blocksize"]),
                     parts["weight.quant_map"].float(),
                     parts["weight.nested_absmax"].float() if nested else None,
                     parts["weight.nested_quant_map"].float() if nested else None,
                     float(state.get("nested_offset", 0.0)))


def _split(name: str, layers: set[str], members: Iterable[str]) -> tuple[str | None, str | None]:
    for part in members:
        if name.endswith("." + part):
            layer = name[: -len(part) - 1]
            if layer in layers:
                return layer, part
    return None, None


def _tensor_names(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    return [name for name, value in torch_load(path).items() if isinstance(value, torch.Tensor)]


def _raw_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """A file's tensors exactly as stored (no dtype cast)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
        return
    for name, value in torch_load(path).items():
        if isinstance(value, torch.Tensor):
            yield name, value
