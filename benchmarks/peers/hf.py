"""transformers `generate` as the peer: the same model (random weights from the same config, the same
folder, or the GGUF dequantized by transformers), the same dtype and device, greedy, EOS ignored.

Batches are padded (left) batches of `batch_size` requests run one `generate` call after another, the
way transformers serves several requests; a single request is one `generate` call. Needs `accelerate`
to load a GGUF.
"""
from __future__ import annotations

import time

import torch

import common


class HFRunner:
    name = "transformers"

    def __init__(self, spec: common.ModelSpec, dtype: str, device: str):
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        from ondo.loader import resolve_dtype

        transformers.logging.set_verbosity_error()
        self.device = common.resolve_device(device)
        start = time.perf_counter()
        config = None   # the config to build from, for random weights; the folder's, for its dtype
        if spec.config_fields is not None:
            fields = {k: v for k, v in spec.config_fields.items() if k != "torch_dtype"}
            config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        elif spec.kind == "folder":
            config = AutoConfig.from_pretrained(spec.path)
        self.dtype = resolve_dtype(dtype, config, torch.device(self.device))   # ondo's rule, so both match
        if config is not None and spec.load_format == "dummy":
            torch.manual_seed(0)
            with torch.device(self.device):
                model = AutoModelForCausalLM.from_config(config, dtype=self.dtype, attn_implementation="sdpa")
        elif spec.is_gguf:
            model = AutoModelForCausalLM.from_pretrained(spec.path.parent, gguf_file=spec.path.name, dtype=self.dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        common.sync(self.device)
        self.load_s = time.perf_counter() - start
        self.vocab_size = self.model.config.get_text_config().vocab_size
        self.details = {"dtype": str(self.dtype).removeprefix("torch."),
                        "attn_implementation": self.model.config._attn_implementation}

    def _config(self, new_tokens: int):
        from transformers import GenerationConfig

        # min_new_tokens masks EOS too, in case the model's own generation config brings one back.
        return GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                eos_token_id=None, pad_token_id=0)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], output_len: int, batch_size: int) -> dict:
        config = self._config(output_len)
        output_tokens = 0
        start = common.now(self.device)
        for first in range(0, len(prompts), batch_size):
            ids, mask = _left_padded(prompts[first:first + batch_size], self.device)
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            output_tokens += (out.shape[1] - ids.shape[1]) * out.shape[0]
        elapsed = common.now(self.device) - start
        return {"elapsed_s": elapsed, "prompt_tokens": sum(len(p) for p in prompts), "output_tokens": output_tokens}

    @torch.inference_mode()
    def latency(self, prompt: list[int], output_len: int) -> dict:
        streamer = _TimingStreamer(self.device)
        ids, mask = _left_padded([prompt], self.device)
        start = common.now(self.device)
        self.model.generate(input_ids=ids, attention_mask=mask, generation_config=self._config(output_len),
                            streamer=streamer)
        end = common.now(self.device)
        return common.timing_summary(start, streamer.stamps, end)


class _TimingStreamer:
    """generate() calls put() with the prompt first, then with each new token (batch of one)."""

    def __init__(self, device: str):
        self.device, self.stamps, self._seen_prompt = device, [], False

    def put(self, value) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.stamps.append((common.now(self.device), len(self.stamps) + 1))

    def end(self) -> None:
        pass


def _left_padded(prompts: list[list[int]], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)       # [batch, width]; pad id 0
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)
