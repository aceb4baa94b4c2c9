"""LoRA adapters (PEFT LoRA / rsLoRA / QLoRA) added at the linear seam, several per batch.

`adapter.py` reads a PEFT folder and maps it onto ondo's layers; `layers.py` holds the per-layer
slot pool and adds each token's delta; `manager.py` owns the slots (LRU) and the per-step token
→ slot buffer; `triton_ops.py` is the GPU kernel; `merge.py` folds an adapter into a model folder.
"""
from ondo.lora.adapter import LoRAError
from ondo.lora.request import LoRARequest

__all__ = ["LoRARequest", "LoRAError"]
