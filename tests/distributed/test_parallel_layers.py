"""Tensor-parallel layers: a model built on 2 ranks (gloo, CPU) holds only its shard and computes the
logits of the same model on one rank.

One spawn runs every check (starting processes is the slow part). Criteria:
- dense float32, every family (and KV heads replicated, and a vocabulary that does not divide):
  max |TP=2 - TP=1| <= 1e-5. Sharding changes only the order of float32 sums (each row-parallel
  product is summed as two halves, then all-reduced), about 1e-7 relative per layer.
- int4 on-the-fly and packed GGUF blocks (Q4_1, and Q6_K cut inside its 256-wide blocks, which
  loads dense): the shards hold the very codes and scales of TP=1 (int4 groups and GGUF blocks
  never straddle a cut, rows are quantized independently), so again only the sum order differs;
  the int4 kernel accumulates in its own blocked order, so the bound is 2e-5 (measured: 5e-6) on
  logits of std > 0.5. Where that kernel rounds activations to 16-bit integers per group (CPUs with
  AVX512 byte permutes or AVX2 alone, `cpu_kernels.int4_rounds_activations`), an input that a 1e-7 change of sum order
  moves across a rounding boundary moves by a whole step (1.5e-5 of its group's largest input), and the
  Q6_K shard that loads dense multiplies unrounded inputs: there the bound is 1e-3 (measured: 2.0e-4 for
  the GGUF, 2.8e-4 for int4).
- every rank ends with the same full logits.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import quantize
from transformers import AutoConfig, LlamaConfig

from ondo.layers import cpu_kernels
from ondo.layers.attention import Attention
from ondo.layers.linear import Linear, linear_method_scope
from ondo.layers.quantization import folder_factory, gguf_factory
from ondo.layers.quantization.gguf_blocks import GGUFBlocks
from ondo.models.registry import get_model_class
from ondo.models.weights import finish_loading, weight_names
from tests.distributed.conftest import run_on_ranks
from tests.models.tiny_models import FAMILIES, PagedDriver, build_tiny_model, read_safetensors

DENSE_TOLERANCE = 1e-5
QUANTIZED_TOLERANCE = 1e-3 if cpu_kernels.int4_rounds_activations() else 2e-5
ODD_VOCAB = 383                       # 192 rows per rank, the last one padding
PROMPTS = [[5, 17, 200, 3, 9, 44, 381, 12, 7, 100, 250, 33, 8], [60, 2, 19, 301, 77]]
CHUNKS = [[9, 1, 1, 1, 1], [3, 2]]   # chunked prefill reading the cached prefix, then decode steps


def _case_folders(tmp_path_factory) -> dict[str, tuple[str, str | None]]:
    """name -> (model folder or 'gguf:<folder>', quantization)."""
    cases = {}
    for i, family in enumerate(FAMILIES):
        folder = tmp_path_factory.mktemp(family)
        build_tiny_model(family, folder, seed=i)
        cases[family] = (str(folder), None)
    overrides = {"llama-kv-replicated": dict(num_key_value_heads=1),
                 "qwen3-odd-vocab": dict(vocab_size=ODD_VOCAB)}
    for name, change in overrides.items():
        folder = tmp_path_factory.mktemp(name)
        build_tiny_model(name.split("-")[0], folder, seed=7, **change)
        cases[name] = (str(folder), None)
    folder = tmp_path_factory.mktemp("int4")
    build_tiny_model("llama", folder, seed=8, vocab_size=ODD_VOCAB)
    cases["llama-int4"] = (str(folder), "int4")
    folder = tmp_path_factory.mktemp("gguf")
    build_tiny_model("llama", folder, seed=9, vocab_size=ODD_VOCAB, head_dim=16, intermediate_size=256)
    cases["llama-gguf"] = ("gguf:" + str(folder), None)
    return cases


def _gguf_payloads(folder: str):
    """The folder's matrices as packed GGUF blocks: Q4_1, except layer 0's down_proj as Q6_K, whose
    256-wide blocks a 2-way cut of its 256 inputs splits (so that shard loads dense)."""
    for name, tensor in read_safetensors(folder):
        if tensor.dim() != 2:
            yield name, tensor
        elif name == "model.layers.0.mlp.down_proj.weight":
            yield name, GGUFBlocks(T.Q6_K, tuple(tensor.shape), _random_q6k(*tensor.shape))
        else:
            yield name, GGUFBlocks(T.Q4_1, tuple(tensor.shape), quantize(tensor.numpy(), T.Q4_1))


def _random_q6k(n: int, k: int) -> np.ndarray:
    elems, size = GGML_QUANT_SIZES[T.Q6_K]
    raw = np.random.default_rng(0).integers(0, 256, (n, k // elems * size), dtype=np.uint8)
    raw.reshape(n, k // elems, size)[..., 208:210] = np.frombuffer(np.float16(0.003).tobytes(), np.uint8)
    return raw


def _build(source: str, quantization: str | None) -> torch.nn.Module:
    """The model as the loader builds it (method chosen per layer while it is built), filled from HF
    names; every parameter must be filled and no tensor left over."""
    packed = source.startswith("gguf:")
    folder = source.removeprefix("gguf:")
    config = AutoConfig.from_pretrained(folder)
    factory = gguf_factory(None) if packed else folder_factory(quantization, config)
    with linear_method_scope(factory):
        model = get_model_class(config)(config)
    loaded = model.load_weights(_gguf_payloads(folder) if packed else read_safetensors(folder))
    missing = set(weight_names(model)) - loaded
    assert not missing and not [n for n in loaded if n.startswith("unexpected:")], missing
    finish_loading(model)
    return model.eval()


def _bad_heads_errors() -> list[str]:
    base = dict(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1, head_dim=16)
    errors = []
    for heads, kv_heads in ((3, 1), (6, 3)):
        try:
            get_model_class(LlamaConfig(**base, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                        architectures=["LlamaForCausalLM"]))(
                LlamaConfig(**base, num_attention_heads=heads, num_key_value_heads=kv_heads))
            errors.append("")
        except ValueError as error:
            errors.append(str(error))
    return errors


def all_checks(cases: dict[str, tuple[str, str | None]]) -> dict:
    """Everything one rank computes: logits per case, local shapes, the head-count errors."""
    logits, shapes = {}, {}
    for name, (source, quantization) in cases.items():
        model = _build(source, quantization)
        logits[name] = PagedDriver(model, len(PROMPTS), max(map(len, PROMPTS))).run(PROMPTS, CHUNKS)
        attention = next(m for m in model.modules() if isinstance(m, Attention))
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        shapes[name] = {"heads": (attention.num_heads, attention.num_kv_heads),
                        "column": sum(m.out_features for m in linears if m.parallel == "column"),
                        "row": sum(m.in_features for m in linears if m.parallel == "row"),
                        "vocab": max(m.out_features for m in linears if m.parallel == "replicated"),
                        "methods": {n: m.method.name for n, m in model.named_modules() if isinstance(m, Linear)}}
    return {"logits": logits, "shapes": shapes, "errors": _bad_heads_errors() if len(cases) > 1 else []}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    torch.set_num_threads(1)
    cases = _case_folders(tmp_path_factory)
    single = all_checks(cases)
    ranks = run_on_ranks(all_checks, cases, world_size=2)
    return cases, single, ranks


CASES = [*FAMILIES, "llama-kv-replicated", "qwen3-odd-vocab", "llama-int4", "llama-gguf"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_two_ranks_give_the_single_rank_logits(results, name):
    _, single, ranks = results
    tolerance = QUANTIZED_TOLERANCE if name in ("llama-int4", "llama-gguf") else DENSE_TOLERANCE
    for prompt, (reference, rank0, rank1) in enumerate(zip(single["logits"][name], ranks[0]["logits"][name],
                                                            ranks[1]["logits"][name])):
        assert rank0.shape == reference.shape
        assert reference.std().item() > 0.5
        diff = (rank0 - reference).abs().max().item()
        print(f"{name} prompt {prompt}: max |TP=2 - TP=1| = {diff:.3g}")
        assert diff <= tolerance, f"{name}, prompt {prompt}: max |TP=2 - TP=1| = {diff:.3g} > {tolerance}"
        assert torch.equal(rank0, rank1), f"{name}, prompt {prompt}: the ranks' logits differ"


@pytest.mark.slow
def test_each_rank_holds_its_half(results):
    _, single, ranks = results
    for name in CASES:
        whole, half = single["shapes"][name], ranks[1]["shapes"][name]
        heads, kv_heads = whole["heads"]
        if name == "llama-kv-replicated":      # one KV head for 2 ranks: both hold it whole
            assert kv_heads == 1 and half["heads"] == (heads // 2, 1)
            assert half["column"] > whole["column"] // 2, name
        else:
            assert half["heads"] == (heads // 2, kv_heads // 2), name
            assert half["column"] == whole["column"] // 2, name
        assert half["row"] == whole["row"] // 2, name
        assert half["vocab"] == -(-whole["vocab"] // 2), name


@pytest.mark.slow
def test_heads_that_do_not_divide_name_the_field(results):
    _, single, ranks = results
    assert single["errors"] == ["", ""]     # one rank: any head count
    assert ranks[0]["errors"] == [
        "num_attention_heads (3) must be divisible by tensor_parallel_size (2)",
        "num_key_value_heads (3) must be divisible by tensor_parallel_size (2)"]


@pytest.mark.slow
def test_quantized_shards_keep_their_method(results):
    _, single, ranks = results
    gguf_whole, gguf_half = single["shapes"]["llama-gguf"]["methods"], ranks[0]["shapes"]["llama-gguf"]["methods"]
    cut_inside_blocks = "model.layers.0.mlp.down_proj"
    assert set(gguf_whole.values()) == {"gguf"}
    assert gguf_half.pop(cut_inside_blocks) == "dense"            # Q6_K cut mid-block: loaded dense
    assert set(gguf_half.values()) == {"gguf"}                     # Q4_1 rows and 32-aligned columns: packed
    int4 = ranks[0]["shapes"]["llama-int4"]["methods"]
    assert {m for n, m in int4.items() if n not in ("model.embed_tokens", "lm_head")} == {"int4"}


def _payload_cuts():
    from tests.layers.gptq_awq_writers import awq_tensors, gptq_tensors, quantize as quantize_int4_reference
    from ondo.layers.quantization.gptq_awq import PackedInt4
    from ondo.layers.quantization.int8 import quantize_int8

    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    reference = quantize_int4_reference(weight, 32)
    gptq, awq = gptq_tensors(reference), awq_tensors(reference)
    yield "gptq", PackedInt4("gptq", gptq["qweight"], gptq["qzeros"], gptq["scales"], 32, gptq["g_idx"], 1)
    yield "awq", PackedInt4("awq", awq["qweight"], awq["qzeros"], awq["scales"], 32)
    yield "int8", quantize_int8(weight)
    yield "q4_1", GGUFBlocks(T.Q4_1, (32, 128), quantize(weight.numpy(), T.Q4_1))


@pytest.mark.parametrize("dim, index", [(0, slice(8, 24)), (1, slice(64, 128)), (1, slice(16, 48))])
def test_a_payload_cut_is_the_cut_of_its_weight(dim, index):
    """Each packed format cuts itself where its packing allows (else `take` dequantizes), exactly."""
    from ondo.layers.linear import take

    for name, payload in _payload_cuts():
        part = take(payload, dim, index)
        expected = payload.dequantize().narrow(dim, index.start, index.stop - index.start)
        dense = part if isinstance(part, torch.Tensor) else part.dequantize()
        assert torch.equal(dense, expected), (name, dim, index)
        stays_packed = name == "int8" or index != slice(16, 48)     # int8 rows cut anywhere; the rest on groups
        assert (type(part) is type(payload)) == stays_packed, (name, dim, index)
