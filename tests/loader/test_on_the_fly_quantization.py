"""`quantization="int8" | "nf4" | "int4"` on a dense folder: the quantized model is exactly the dense
model of its dequantized weights, and stays within a stated logit error of the original.

Error bounds (relative RMS of the logits of a 12-token prompt against the float32 dense model, on
this 2-layer random Llama whose logits spread over std 0.16; measured 0.008 / 0.104 / 0.102 in
float32, the same within 0.001 in bfloat16): int8 < 0.03, nf4 < 0.25, int4 < 0.2. A 4-bit code keeps
about 10 % RMS error per weight (16 levels per block or group), int8 under 1 % (127 per row).
"""
from __future__ import annotations

import pytest
import torch

from ondo import LLM, SamplingParams
from ondo.config import EngineConfig
from ondo.layers.linear import linear_layers
from ondo.loader import load_model
from tests.conftest import build_tiny_llama
from tests.models.tiny_models import PagedDriver

PROMPT = [1, 4, 8, 15, 16, 23, 42, 99, 7, 300, 5, 77]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ERROR_BOUNDS = {"int8": 0.03, "nf4": 0.25, "int4": 0.2}


pytestmark = pytest.mark.usefixtures("one_cpu_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """(folder, transformers model) of a tiny random Llama."""
    path = tmp_path_factory.mktemp("dense")
    return path, build_tiny_llama(path, seed=3)


def ondo_model(folder, quantization, dtype="float32"):
    config = EngineConfig(model=str(folder), dtype=dtype, device="cpu", quantization=quantization)
    return load_model(config, torch.device("cpu"))[0].model


def ondo_logits(model) -> torch.Tensor:
    return PagedDriver(model, 1, len(PROMPT)).run([PROMPT], [[len(PROMPT)]])[0].float()   # [T, vocab]


def dequantized_reference(model, hf_model):
    """The transformers model with every quantized matrix replaced by ondo's dequantized one."""
    reference = type(hf_model)(hf_model.config).eval()
    state = dict(hf_model.state_dict())
    shards: dict[str, list[str]] = {}
    for hf_name, (merged, index) in model.stacked_params.items():
        shards.setdefault(merged, [None] * 3)[index] = hf_name
    for name, layer in linear_layers(model):
        weight = layer.method.dense_weight(layer).float()
        parent, _, leaf = name.rpartition(".")
        names = [n for n in shards.get(leaf, [leaf]) if n]
        for hf_leaf, part in zip(names, weight.split(layer.out_sizes)):
            state[f"{parent}.{hf_leaf}.weight" if parent else f"{hf_leaf}.weight"] = part
    reference.load_state_dict(state)
    return reference


def relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("quantization", list(ERROR_BOUNDS))
def test_quantized_model_is_the_dense_model_of_its_weights(dense, quantization):
    folder, hf_model = dense
    model = ondo_model(folder, quantization)
    for name, layer in linear_layers(model):
        expected = "dense" if name in ("model.embed_tokens", "lm_head") else quantization
        assert layer.method.name == expected, (name, layer.method.name)
    reference = dequantized_reference(model, hf_model)
    logits = ondo_logits(model)
    with torch.no_grad():
        exact = reference(torch.tensor([PROMPT])).logits[0]
        original = hf_model(torch.tensor([PROMPT])).logits[0]
    assert (logits - exact).abs().max().item() <= 1e-4
    error = relative_rms(logits, original)
    assert error < ERROR_BOUNDS[quantization], f"{quantization}: relative logit error {error:.3f}"
    # Greedy decoding through the engine (decode steps run the small-batch kernels) follows the
    # dequantized model token for token.
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    # The cache in float32 too (auto would take float16 for quantized weights: tests/engine/test_kv_cache_dtype.py
    # bounds that), so that only the weights' path is compared, on a random model's near-ties.
    llm = LLM(str(folder), dtype="float32", quantization=quantization, kv_cache_dtype="float32")
    assert llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids == expected


@pytest.mark.parametrize("quantization", list(ERROR_BOUNDS))
def test_bfloat16_run_stays_within_the_bound(dense, quantization):
    """bfloat16 activations take the CPU int8 / int4 kernels; the error adds bfloat16's rounding only."""
    folder, hf_model = dense
    with torch.no_grad():
        original = hf_model(torch.tensor([PROMPT])).logits[0]
    error = relative_rms(ondo_logits(ondo_model(folder, quantization, "bfloat16")), original)
    assert error < ERROR_BOUNDS[quantization] + 0.02, f"{quantization}: relative logit error {error:.3f}"


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_a_bfloat16_run_quantizes_the_weights_as_stored(dense, quantization):
    """The folder holds float32 weights: a bfloat16 run quantizes those, not their bfloat16 rounding
    (rounding twice moves codes that sit near a rounding boundary)."""
    from safetensors.torch import load_file

    from ondo.layers.quantization.int4 import quantize_int4
    from ondo.layers.quantization.int4_planes import cpu_tile_rows, plane_tiles, unpack_tiles
    from ondo.layers.quantization.int8 import quantize_int8

    folder, _ = dense
    stored = load_file(folder / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    assert stored.dtype == torch.float32
    layer = ondo_model(folder, quantization, "bfloat16").model.layers[0].mlp.down_proj
    if quantization == "int4":
        codes = unpack_tiles(plane_tiles(layer), cpu_tile_rows())[:stored.shape[0], :stored.shape[1]]
        as_stored, rounded_first = (quantize_int4(w).codes for w in (stored, stored.bfloat16()))
    else:
        codes = layer.qweight
        as_stored, rounded_first = (quantize_int8(w).codes for w in (stored, stored.bfloat16()))
    assert not torch.equal(as_stored, rounded_first)     # the two roundings differ on this matrix
    assert torch.equal(codes, as_stored)


def test_quantized_run_with_the_default_dtype(dense):
    folder, _ = dense
    llm = LLM(str(folder), quantization="int8")
    assert len(llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids) == 12


@pytest.mark.parametrize("device,dtype,quantization,rows,expected", [
    ("cuda", torch.bfloat16, "int4", 64, "int8"), ("cuda", torch.float16, "nf4", 1, "int8"),
    ("cuda", torch.bfloat16, "int4", 65, "dense"), ("cuda", torch.bfloat16, "int8", 1, "dense"),
    ("cuda", torch.float32, "int4", 1, "dense"), ("cpu", torch.bfloat16, "int4", 1, "dense"),
    ("cpu", torch.float32, "int8", 1, "dense")])
def test_untied_lm_head_is_int8_under_4_bits_on_a_gpu_for_small_batches(device, dtype, quantization, rows, expected):
    from transformers import LlamaConfig

    from ondo.layers.linear import LMHead, VocabEmbedding
    from ondo.layers.quantization import folder_factory

    factory = folder_factory(quantization, LlamaConfig(), torch.device(device), dtype, rows)
    assert factory(LMHead(8, 16)).name == expected
    assert factory(VocabEmbedding(16, 8)).name == "dense"      # lookups, and a tied head, stay dense


def test_int8_lm_head_changes_logits_little(dense, monkeypatch):
    """The int8 head a GPU run gets (chosen here as if on a GPU, run on the CPU's int8 kernel): the same
    int4 model with a dense head gives logits within 1 % (relative RMS; measured 0.65 %, as per-row int8 of
    64-wide Gaussian rows predicts: a step of absmax / 127 ~ 2.4 sigma / 127, RMS step / sqrt(12))."""
    import ondo.loader
    from ondo.layers import quantization

    real = quantization.folder_factory
    monkeypatch.setattr(ondo.loader, "folder_factory",
                        lambda q, config, device, dtype, rows: real(q, config, torch.device("cuda"), dtype, rows))
    folder, _ = dense
    model = ondo_model(folder, "int4", "bfloat16")
    assert model.lm_head.method.name == "int8"
    monkeypatch.undo()
    reference = ondo_model(folder, "int4", "bfloat16")
    assert reference.lm_head.method.name == "dense"
    error = relative_rms(ondo_logits(model), ondo_logits(reference))
    print(f"int8 head against the dense head: relative logit error {error:.4f}")
    assert 0 < error < 0.01
