"""Tiny random-weight models of every family, and a paged-cache driver that runs ondo models the way
the model runner does (flat batch, block tables, slot mapping), for parity tests against transformers."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (AutoConfig, AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPT2Config,
                          LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

from ondo.config import EngineConfig
from ondo.engine.forward_context import ForwardContext, set_forward_context
from ondo.layers.attention import Attention, AttentionMetadata
from ondo.loader import load_model
from ondo.models.registry import get_model_class

VOCAB = 384
SLIDING_WINDOW = 8   # far below the prompt lengths, so the window changes the logits
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _gemma3_config() -> Gemma3TextConfig:
    return Gemma3TextConfig(
        **{**_COMMON, "num_hidden_layers": 4}, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=SLIDING_WINDOW, final_logit_softcapping=3.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        # Distinct local/global RoPE, the global one scaled, as in the larger Gemma 3 checkpoints.
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0}})


# Each family exercises its own features: GQA everywhere, a head_dim that differs from
# hidden / heads where the family allows it, tied and untied heads, sliding windows and soft caps.
FAMILY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, head_dim=32, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=SLIDING_WINDOW),
    "qwen2": lambda: Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=SLIDING_WINDOW,
                                 max_window_layers=1),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=32, tie_word_embeddings=True),
    "gemma2": lambda: Gemma2Config(**{**_COMMON, "num_hidden_layers": 4}, head_dim=16, query_pre_attn_scalar=24,
                                   sliding_window=SLIDING_WINDOW, attn_logit_softcapping=4.0,
                                   final_logit_softcapping=3.0),
    "gemma3": _gemma3_config,
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=256,
                               scale_attn_by_inverse_layer_idx=True, bos_token_id=1, eos_token_id=2),
}
FAMILIES = list(FAMILY_CONFIGS)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that logits spread over several units, so a 1e-4 tolerance means something;
    biases and norm scales get noise too (transformers initialises them to constants), so that a norm
    or bias loaded into the wrong place shows up in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1:
                param.add_(noise * 0.1)
            else:
                param.copy_(noise * 0.15)


def build_tiny_model(family: str, folder: Path, seed: int = 0, **config_overrides):
    """Saves a random float32 transformers model of `family` (and a word-level tokenizer) to `folder`;
    returns the transformers model, in eval mode, as the reference."""
    config = FAMILY_CONFIGS[family]()
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    randomize_(model, seed)
    model.eval()
    model.save_pretrained(folder)
    save_word_tokenizer(folder, VOCAB)
    return model


def save_word_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)


def read_safetensors(folder: Path):
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_ondo_model(folder: Path) -> torch.nn.Module:
    """The model as the engine loads it (the loader checks that every parameter is filled)."""
    loaded, _ = load_model(EngineConfig(model=str(folder), dtype="float32", device="cpu"), torch.device("cpu"))
    return loaded.model


def load_ondo_weights(folder: Path, weights) -> torch.nn.Module:
    """ondo's class for the folder's config, filled from `weights`; checks that every parameter was
    filled and no tensor was left over."""
    config = AutoConfig.from_pretrained(folder)
    model = get_model_class(config)(config).float().eval()
    loaded = model.load_weights(weights)
    unexpected = sorted(n for n in loaded if n.startswith("unexpected:"))
    missing = sorted(set(dict(model.named_parameters())) - loaded)
    assert not unexpected and not missing, f"unexpected {unexpected}, missing {missing}"
    return model


@torch.no_grad()
def reference_logits(hf_model, prompt: list[int]) -> torch.Tensor:
    """transformers' logits of every position of one unpadded prompt: [len(prompt), vocab]."""
    return hf_model(torch.tensor([prompt])).logits[0].float()


@dataclass
class Step:
    seq_index: int
    num_tokens: int


class PagedDriver:
    """Runs prompts through an ondo model in scheduled chunks over a paged KV cache.

    Blocks are handed out from a shuffled pool so that a sequence's blocks are neither contiguous nor
    in order, and the cache starts filled with finite garbage: a wrong slot or a missing mask shows up.
    """

    def __init__(self, model: torch.nn.Module, num_seqs: int, max_len: int, block_size: int = 4, seed: int = 0):
        self.model, self.block_size = model, block_size
        layers = sorted((m for m in model.modules() if isinstance(m, Attention)), key=lambda m: m.layer_idx)
        blocks_per_seq = math.ceil(max_len / block_size)
        num_blocks = num_seqs * blocks_per_seq + 1
        generator = torch.Generator().manual_seed(seed)
        dtype = next(model.parameters()).dtype
        self.kv_caches = [(torch.randn(2, num_blocks, block_size, m.num_kv_heads, m.head_dim, generator=generator)
                           * 10).to(dtype) for m in layers]
        pool = torch.randperm(num_blocks, generator=generator).tolist()
        self.block_tables = [pool[i * blocks_per_seq:(i + 1) * blocks_per_seq] for i in range(num_seqs)]

    def slot(self, seq_index: int, position: int) -> int:
        table = self.block_tables[seq_index]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    @torch.no_grad()
    def step(self, prompts: list[list[int]], num_cached: list[int], steps: list[Step]) -> list[torch.Tensor]:
        """One forward over the flat batch of `steps`; returns each step's logits [num_tokens, vocab]
        and advances `num_cached`."""
        input_ids, positions, slots, query_lens, seq_lens = [], [], [], [], []
        for step in steps:
            start = num_cached[step.seq_index]
            span = range(start, start + step.num_tokens)
            input_ids += prompts[step.seq_index][start:start + step.num_tokens]
            positions += list(span)
            slots += [self.slot(step.seq_index, p) for p in span]
            query_lens.append(step.num_tokens)
            seq_lens.append(start + step.num_tokens)
        max_blocks = max(math.ceil(n / self.block_size) for n in seq_lens)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor([self.block_tables[s.seq_index][:max_blocks] for s in steps], dtype=torch.int32),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
            is_decode=all(n == 1 for n in query_lens))
        with set_forward_context(ForwardContext(meta, self.kv_caches)):
            hidden = self.model(torch.tensor(input_ids), torch.tensor(positions))   # [T, hidden]
            logits = self.model.compute_logits(hidden)                            # [T, vocab]
        for step in steps:
            num_cached[step.seq_index] += step.num_tokens
        return list(logits.split(query_lens))

    def run(self, prompts: list[list[int]], chunks: list[list[int]]) -> list[torch.Tensor]:
        """chunks[i] = the sizes in which prompt i is fed, one chunk per step; every step runs the next
        chunk of every sequence that has one left. Returns each prompt's logits [len(prompt), vocab]."""
        assert all(sum(c) == len(p) for c, p in zip(chunks, prompts))
        num_cached = [0] * len(prompts)
        outputs: list[list[torch.Tensor]] = [[] for _ in prompts]
        for round_index in range(max(len(c) for c in chunks)):
            steps = [Step(i, c[round_index]) for i, c in enumerate(chunks) if round_index < len(c)]
            for step, logits in zip(steps, self.step(prompts, num_cached, steps)):
                outputs[step.seq_index].append(logits)
        return [torch.cat(o) for o in outputs]
