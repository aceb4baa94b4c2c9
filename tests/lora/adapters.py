"""Tiny base models and random PEFT adapters for the LoRA tests; transformers + PEFT are the reference."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from tests.models.tiny_models import build_tiny_model

logging.getLogger("peft").setLevel(logging.ERROR)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def targets_of(family: str) -> list[str]:
    return GPT2_TARGETS if family == "gpt2" else LLAMA_TARGETS


def save_random_adapter(hf_model, folder: Path, seed: int, rank: int = 8, alpha: float = 16.0,
                        targets: list[str] | None = None, use_rslora: bool = False, family: str = "llama"):
    """A PEFT LoRA over `hf_model` with random A and B (PEFT starts B at zero, which would make the
    adapter a no-op), saved as PEFT saves it. Returns the PeftModel (the reference), unmerged."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or targets_of(family),
                        use_rslora=use_rslora, lora_dropout=0.0, fan_in_fan_out=family == "gpt2",
                        init_lora_weights=False)
    peft_model = get_peft_model(hf_model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.eval()
    peft_model.save_pretrained(folder)
    return peft_model


def base_and_adapters(tmp_path: Path, family: str, count: int = 1, **adapter_options):
    """A tiny base folder and `count` adapter folders; returns (base folder, [(adapter folder, PeftModel)])."""
    base = tmp_path / f"{family}-base"
    adapters = []
    for i in range(count):
        hf_model = build_tiny_model(family, base, seed=0)
        folder = tmp_path / f"{family}-lora{i}"
        adapters.append((folder, save_random_adapter(hf_model, folder, seed=100 + i, family=family, **adapter_options)))
    return base, adapters


@torch.no_grad()
def greedy_reference(model, prompt: list[int], max_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens by full recompute, and the logits each was chosen from: [max_tokens, vocab]."""
    ids, chosen = list(prompt), []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        chosen.append(logits)
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], torch.stack(chosen)
