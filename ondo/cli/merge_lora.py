"""`ondo merge-lora BASE ADAPTER OUT`: fold a PEFT LoRA adapter into a copy of its base model folder.

Each target weight becomes W + scaling * B @ A (transposed for GPT-2's Conv1D weights, which
checkpoints store [in, out]); every other file (config, tokenizer, generation config) is copied, so
OUT loads anywhere the base does and generates what the base with the adapter generates.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

_CONV1D = ("c_attn", "c_proj", "c_fc")


def add_merge_lora_parser(commands) -> None:
    parser = commands.add_parser(
        "merge-lora", usage="%(prog)s BASE ADAPTER OUT", help="fold a LoRA adapter into a model folder",
        description="Write OUT: a copy of the HF model folder BASE (safetensors) whose weights include "
                    "the PEFT LoRA adapter in the folder ADAPTER.")
    parser.add_argument("base", metavar="BASE", help="the base HF model folder (safetensors)")
    parser.add_argument("adapter", metavar="ADAPTER", help="a PEFT adapter folder (adapter_config.json)")
    parser.add_argument("out", metavar="OUT", help="the folder to write (must not exist or be empty)")


def run_merge_lora(args: argparse.Namespace) -> int:
    merged = merge_lora(args.base, args.adapter, args.out)
    print(f"merged {merged} LoRA modules into {args.out}")
    return 0


def merge_lora(base: str | Path, adapter_path: str | Path, out: str | Path) -> int:
    """Returns the number of modules merged."""
    from safetensors.torch import load_file, save_file

    from ondo.lora.adapter import LoRAError, read_peft_adapter   # here: `ondo --help` must not import torch

    base, out = Path(base).expanduser(), Path(out).expanduser()
    if not (base / "config.json").is_file():
        raise LoRAError(f"merge-lora: {base} is not an HF model folder (no config.json)")
    shards = sorted(base.glob("*.safetensors"))
    if not shards:
        raise LoRAError(f"merge-lora: {base} has no .safetensors weights (GGUF and .bin bases cannot be merged)")
    if json.loads((base / "config.json").read_text()).get("quantization_config"):
        raise LoRAError(f"merge-lora: {base} is quantized; merge into the dense base model")
    if out.exists() and any(out.iterdir()):
        raise LoRAError(f"merge-lora: {out} exists and is not empty")
    adapter = read_peft_adapter("adapter", adapter_path)
    pending = dict(adapter.modules)
    out.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy2(item, out / item.name)
    for shard in shards:
        tensors = load_file(str(shard))
        for name in list(tensors):
            module = _module_of(name, pending)
            if module is None:
                continue
            delta = pending.pop(module)
            weight = tensors[name]
            update = delta.b @ delta.a                                    # [out, in] float32
            if module.rpartition(".")[2] in _CONV1D:
                update = update.t()                                       # GPT-2's Conv1D stores [in, out]
            if weight.shape != update.shape:
                raise LoRAError(f"merge-lora: {module} delta is {list(update.shape)} but the base weight is "
                                f"{list(weight.shape)}")
            tensors[name] = (weight.float() + update).to(weight.dtype).contiguous()
        save_file(tensors, str(out / shard.name), metadata={"format": "pt"})
    if pending:
        raise LoRAError(f"merge-lora: the base has no weight for {sorted(pending)[0]}")
    return len(adapter.modules)


def _module_of(weight_name: str, modules: dict) -> str | None:
    if not weight_name.endswith(".weight"):
        return None
    stem = weight_name[:-len(".weight")]
    if stem in modules:
        return stem
    # Old GPT-2 checkpoints name `h.0.attn.c_attn` where PEFT saw `transformer.h.0.attn.c_attn`.
    return "transformer." + stem if "transformer." + stem in modules else None
