"""What loading a GGUF model costs in imports and memory, checked without timing anything."""

import json
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
