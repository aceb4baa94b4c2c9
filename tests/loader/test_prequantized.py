"""Pre-quantized folders: bitsandbytes 4-bit / 8-bit saved by transformers, GPTQ and AWQ written by their
published layouts. ondo's logits equal transformers' on the same folder (bitsandbytes) or the dense
model built from the dequantized weights (GPTQ/AWQ), in float32."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ondo import LLM, SamplingParams
from ondo.config import EngineConfig
from ondo.layers.linear import linear_layers
from ondo.layers.quantization import QuantizationError
from ondo.loader import load_model
from ondo.models.weights import WeightShapeError
from tests.conftest import build_tiny_llama
from tests.layers.gptq_awq_writers import awq_tensors, gptq_tensors, quantize
from tests.models.tiny_models import PagedDriver

pytest.importorskip("bitsandbytes")

PROMPT = [1, 4, 8, 15, 16, 23, 42, 99, 7, 300, 5, 77]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
TOLERANCE = 1e-4
DENSE_ALWAYS = ("model.embed_tokens", "lm_head")       # no quantizer here touches them


pytestmark = pytest.mark.usefixtures("one_cpu_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    build_tiny_llama(path, seed=7)
    return path


def ondo_model(folder, **options):
    loaded, _ = load_model(EngineConfig(model=str(folder), dtype="float32", device="cpu", **options),
                           torch.device("cpu"))
    return loaded.model


def ondo_logits(model) -> torch.Tensor:
    return PagedDriver(model, 1, len(PROMPT)).run([PROMPT], [[len(PROMPT)]])[0]        # [T, vocab]


@torch.no_grad()
def hf_logits(model) -> torch.Tensor:
    return model(torch.tensor([PROMPT])).logits[0]


def methods(model) -> dict[str, str]:
    return {name: layer.method.name for name, layer in linear_layers(model)}


# --- bitsandbytes --------------------------------------------------------------------------------------

def save_bnb(dense_folder, path, **options):
    """transformers + bitsandbytes on the CPU: quantize the dense folder while loading, save it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.float32, **options)
    model = AutoModelForCausalLM.from_pretrained(dense_folder, quantization_config=config, device_map="cpu",
                                                 dtype=torch.float32)
    model.save_pretrained(path)
    # bitsandbytes' training-mode CPU path is weight-only and exact: dequantize, then F.linear in
    # float32 (its inference path repacks 4-bit weights for a bfloat16 kernel on AVX512-BF16 CPUs, and
    # LLM.int8 inference also quantizes the activations). Dropout is 0, so train() changes nothing else.
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu").train()


BNB_CASES = {
    "nf4-double-quant": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "nf4-skip-o_proj": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["o_proj", "lm_head"]),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-bfloat16-storage": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}


@pytest.mark.parametrize("case", BNB_CASES)
def test_bitsandbytes_folder_matches_transformers(dense_folder, tmp_path, case):
    hf_model = save_bnb(dense_folder, tmp_path, **BNB_CASES[case])
    model = ondo_model(tmp_path)
    expected = "int8" if case == "int8" else "nf4"
    found = methods(model)
    for name, method in found.items():
        skipped = name in DENSE_ALWAYS or (case == "nf4-skip-o_proj" and name.endswith("o_proj"))
        assert method == ("dense" if skipped else expected), (name, method)
    reference = hf_logits(hf_model)
    diff = (ondo_logits(model) - reference).abs().max().item()
    assert diff <= TOLERANCE, f"max |ondo - transformers| = {diff:.3g}"


def test_bitsandbytes_greedy_generation_through_llm(dense_folder, tmp_path):
    hf_model = save_bnb(dense_folder, tmp_path, load_in_4bit=True, bnb_4bit_quant_type="nf4")
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    assert LLM(str(tmp_path), dtype="float32").generate([PROMPT], greedy)[0].outputs[0].token_ids == expected
    # bfloat16 (the CPU default for packed weights) runs the same storage; its tokens may differ by rounding.
    assert len(LLM(str(tmp_path)).generate([PROMPT], greedy)[0].outputs[0].token_ids) == 10


# --- GPTQ / AWQ ----------------------------------------------------------------------------------------

def write_int4_folder(dense_folder, path, kind, group=32, act_order=False, dense_modules=(), split_files=False,
                      **config_extra):
    """Quantize every decoder linear of the dense folder and write it in `kind`'s layout; returns the
    transformers model holding the dequantized weights (the exact reference). `split_files` writes two
    shards with an index, each layer's qweight in the first and its other parts in the second."""
    from transformers import AutoModelForCausalLM

    tensors = load_file(dense_folder / "model.safetensors")
    reference = dict(tensors)
    generator = torch.Generator().manual_seed(0)
    orders: dict[tuple[str, str], torch.Tensor] = {}      # q/k/v share an input, so one act-order; so do gate/up
    for name in list(tensors):
        module = name.split(".")[-2]
        if not name.endswith(".weight") or module not in LINEARS or module in dense_modules:
            continue
        weight = tensors.pop(name)
        k = weight.shape[1]
        g_idx = None
        if act_order:
            block = name.rsplit(".", 3)[0]                                    # model.layers.<i>
            order = orders.setdefault((block, SHARED_INPUT.get(module, module)),
                                      torch.randperm(k, generator=generator))
            g_idx = (order // group).numpy()
        q = quantize(weight, group, g_idx)
        layer = name[: -len(".weight")]
        packed = gptq_tensors(q) if kind == "gptq" else awq_tensors(q)
        tensors.update({f"{layer}.{part}": value for part, value in packed.items()})
        reference[name] = q.dense()
    shutil.copy(dense_folder / "config.json", path / "config.json")
    config = json.loads((path / "config.json").read_text())
    quant = {"quant_method": kind, "bits": 4, "group_size": group}
    quant.update({"desc_act": act_order, "sym": False, "checkpoint_format": "gptq"} if kind == "gptq"
                 else {"version": "gemm", "zero_point": True})
    quant.update(config_extra)
    config["quantization_config"] = quant
    (path / "config.json").write_text(json.dumps(config))
    if split_files:
        second = ("qzeros", "scales", "g_idx")
        files = {"model-00001-of-00002.safetensors": {n: t for n, t in tensors.items() if not n.endswith(second)},
                 "model-00002-of-00002.safetensors": {n: t for n, t in tensors.items() if n.endswith(second)}}
        weight_map = {name: file for file, part in files.items() for name in part}
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        files = {"model.safetensors": tensors}
    for file, part in files.items():
        save_file({n: t.contiguous() for n, t in part.items()}, str(path / file))
    model = AutoModelForCausalLM.from_pretrained(dense_folder, dtype=torch.float32).eval()
    model.load_state_dict(reference, strict=False)
    return model


@pytest.mark.parametrize("kind,act_order,split_files",
                         [("gptq", False, False), ("gptq", True, True), ("awq", False, True)])
def test_int4_folder_matches_dense_of_dequantized_weights(dense_folder, tmp_path, kind, act_order, split_files):
    reference = write_int4_folder(dense_folder, tmp_path, kind, act_order=act_order, dense_modules=("o_proj",),
                                  split_files=split_files, modules_to_not_convert=["o_proj"])
    model = ondo_model(tmp_path)
    for name, method in methods(model).items():
        quantized = not (name in DENSE_ALWAYS or name.endswith("o_proj"))
        assert method == ((f"{kind}+act-order" if act_order else kind) if quantized else "dense"), (name, method)
    diff = (ondo_logits(model) - hf_logits(reference)).abs().max().item()
    assert diff <= TOLERANCE, f"max |ondo - dense of dequantized| = {diff:.3g}"


# --- errors --------------------------------------------------------------------------------------------

def with_quantization_config(dense_folder, path, quantization_config):
    shutil.copytree(dense_folder, path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("quantization_config,message", [
    ({"quant_method": "fp8"}, "quant_method 'fp8' is not supported"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "gptq bits must be 4, got 8"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"},
     "awq version must be 'gemm', got 'gemv'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "int4"},
     "must be 'nf4' or 'fp4'"),
])
def test_unsupported_configs_name_what_is_supported(dense_folder, tmp_path, quantization_config, message):
    folder = with_quantization_config(dense_folder, tmp_path, quantization_config)
    with pytest.raises(QuantizationError, match=message) as error:
        ondo_model(folder)
    assert "supported: bitsandbytes" in str(error.value)


def test_group_size_not_dividing_in_features_names_the_tensor(dense_folder, tmp_path):
    write_int4_folder(dense_folder, tmp_path, "gptq", group=32)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["group_size"] = 48                  # 64 inputs are not groups of 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightShapeError, match=r"^model\.layers\.\d\.\w+\.\w+_proj\.weight: GPTQ group_size 48 "
                                               r"does not divide in_features (64|128)$"):
        ondo_model(tmp_path)


def test_on_the_fly_quantization_of_a_quantized_folder_is_refused(dense_folder, tmp_path):
    write_int4_folder(dense_folder, tmp_path, "awq")
    with pytest.raises(QuantizationError, match="already quantized"):
        ondo_model(tmp_path, quantization="int8")
