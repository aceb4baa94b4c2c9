"""What loading a GGUF model costs in imports and memory, checked without timing anything."""

import json
import os
import subprocess
import sys

# SmolLM2-135M-shaped llama metadata: enough for build_config, no file needed.
_METADATA = {
    "general.architecture": "llama",
    "llama.embedding_length": 576,
    "llama.attention.head_count": 9,
    "llama.attention.head_count_kv": 3,
    "llama.block_count": 30,
    "llama.feed_forward_length": 1536,
    "llama.attention.layer_norm_rms_epsilon": 1e-5,
    "llama.context_length": 8192,
    "llama.vocab_size": 49152,
    "llama.rope.freq_base": 100000.0,
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
}

_BUILD_CONFIG = """
import json, sys
from ondo.loader.gguf_config import build_config
if sys.argv[1] == "with-activations":
    import transformers.activations  # the ordinary import order: the validators see the real ACT2FN
config = build_config(json.loads(sys.argv[2]), {"token_embd.weight"})
heavy = sorted(m for m in ("torch.distributed.tensor", "transformers.activations", "sympy") if m in sys.modules)
print(json.dumps({"config": config.to_dict(), "heavy": heavy}))
"""


def _build_in_subprocess(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _BUILD_CONFIG, mode, json.dumps(_METADATA)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_gguf_config_skips_the_model_loading_stack_and_matches_the_ordinary_config():
    light = _build_in_subprocess("light")
    ordinary = _build_in_subprocess("with-activations")
    assert light["heavy"] == []
    assert "transformers.activations" in ordinary["heavy"]
    assert light["config"] == ordinary["config"]
    assert light["config"]["architectures"] == ["LlamaForCausalLM"]
    assert light["config"]["num_key_value_heads"] == 3


def test_real_activations_module_importable_after_config_build():
    code = (
        "from ondo.loader.gguf_config import build_config; import json, sys;"
        f"build_config(json.loads({json.dumps(json.dumps(_METADATA))}), set());"
        "from transformers.activations import ACT2FN; print(len(ACT2FN) > 0, 'silu' in ACT2FN)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True"]


# Loads the built-in model's weights alone (config, tokenizer and model class already in place) and
# reports how far resident memory rose above where it stood, next to the bytes the model keeps.
_LOAD_WEIGHTS = """
import json, sys
import torch
from ondo.layers.quantization import gguf_factory
from ondo.loader import _instantiate, _load_checked
from ondo.loader.gguf import load_gguf
from ondo.models.registry import get_model_class

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

torch.set_num_threads(2)
gguf = load_gguf(sys.argv[1], torch.bfloat16)
model = _instantiate(get_model_class(gguf.config), gguf.config, torch.bfloat16, torch.device("cpu"),
                     gguf_factory(None))
start = status("VmRSS")
try:  # reset the high-water mark to now (Linux >= 4.0); else the earlier peak is the floor
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
except OSError:
    start = max(start, status("VmHWM"))
_load_checked(model, gguf.weights, sys.argv[1])
tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}.values()
kept = sum(t.numel() * t.element_size() for t in tensors)
print(json.dumps({"rise": status("VmHWM") - start, "kept": kept, "after": status("VmRSS") - start}))
"""


def test_loading_the_builtin_model_peaks_near_its_packed_size():
    """Repacking goes a chunk of rows at a time and drops each tensor's file pages once packed, so the
    load rises by the packed model (~97 MB) plus ~15 MB. Repacking a whole matrix at once (the tied
    49152 x 576 Q8_0 embedding) with the whole file kept resident rose by 366 MB."""
    from tests.tokenizer.model_files import smollm2_gguf_path

    path = smollm2_gguf_path()
    done = subprocess.run([sys.executable, "-c", _LOAD_WEIGHTS, str(path)], capture_output=True, text=True,
                          check=True, env={**os.environ, "ONDO_NO_PROGRESS": "1"})
    report = json.loads(done.stdout.strip().splitlines()[-1])
    mb = 2**20
    # Margins for a busy machine and other allocators; a whole-matrix repack is ~270 MB over `kept`.
    assert report["rise"] < report["kept"] + 120 * mb, {k: round(v / mb) for k, v in report.items()}
    assert report["after"] < report["kept"] + 60 * mb, {k: round(v / mb) for k, v in report.items()}
