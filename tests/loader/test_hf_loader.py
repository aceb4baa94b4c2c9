"""Loading HF folders (single, sharded, .bin) and fine-tuned state dicts over a base folder."""
from __future__ import annotations

import pytest
import torch

from ondo import LLM, SamplingParams
from ondo.loader.hf import ModelLoadError
from tests.conftest import build_tiny_llama

PROMPT = [1, 4, 8, 15, 16, 23, 42]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def hf_greedy(model, prompt=PROMPT):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def ondo_greedy(folder, **options):
    return LLM(str(folder), dtype="float32", **options).generate([PROMPT], GREEDY)[0].outputs[0].token_ids


def test_sharded_safetensors(tmp_path):
    model = build_tiny_llama(tmp_path / "src", seed=3)
    model.save_pretrained(tmp_path / "model", max_shard_size="100KB")
    assert (tmp_path / "model" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "model").glob("*.safetensors"))) > 1
    assert ondo_greedy(tmp_path / "model") == hf_greedy(model)


def test_pytorch_bin_fallback(tmp_path):
    model = build_tiny_llama(tmp_path, seed=3)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert ondo_greedy(tmp_path) == hf_greedy(model)


def test_tied_embeddings(tmp_path):
    model = build_tiny_llama(tmp_path, seed=4, tie_word_embeddings=True)
    assert ondo_greedy(tmp_path) == hf_greedy(model)


class HyperParameters:
    learning_rate = 1e-4


@pytest.fixture
def base_and_finetuned(tmp_path):
    build_tiny_llama(tmp_path / "base", seed=1)
    finetuned = build_tiny_llama(tmp_path / "finetuned", seed=2)
    return tmp_path / "base", finetuned


def test_lightning_checkpoint_over_base_folder(tmp_path, base_and_finetuned):
    base, finetuned = base_and_finetuned
    # Lightning's layout: the module held the model as `self.model`, keys prefixed `model.`.
    ckpt = tmp_path / "epoch=3.ckpt"
    state = {f"model.{k}": v for k, v in finetuned.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 120}, ckpt)
    assert ondo_greedy(base, checkpoint=str(ckpt)) == hf_greedy(finetuned)
    assert ondo_greedy(base) != hf_greedy(finetuned)   # the checkpoint really replaced the weights


def test_plain_state_dict_checkpoint(tmp_path, base_and_finetuned):
    base, finetuned = base_and_finetuned
    path = tmp_path / "finetuned.pt"
    torch.save(finetuned.state_dict(), path)
    assert ondo_greedy(base, checkpoint=str(path)) == hf_greedy(finetuned)


def test_checkpoint_key_mismatch_lists_the_keys(tmp_path, base_and_finetuned):
    base, finetuned = base_and_finetuned
    state = {f"model.{k}": v for k, v in finetuned.state_dict().items() if "layers.1.mlp.down_proj" not in k}
    state["model.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ModelLoadError) as error:
        LLM(str(base), dtype="float32", checkpoint=str(path))
    message = str(error.value)
    assert "missing keys: model.layers.1.mlp.down_proj.weight" in message
    assert "unexpected keys: extra_head.weight" in message


def test_checkpoint_with_pickled_objects_is_refused(tmp_path, base_and_finetuned):
    base, finetuned = base_and_finetuned
    path = tmp_path / "unsafe.ckpt"

    # A custom class: loading it needs arbitrary unpickling, which weights_only refuses.
    torch.save({"state_dict": finetuned.state_dict(), "hparams": HyperParameters()}, path)
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        LLM(str(base), dtype="float32", checkpoint=str(path))


def test_missing_checkpoint_file(base_and_finetuned, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(base_and_finetuned[0]), checkpoint=str(tmp_path / "missing.ckpt"))
