"""Multi-LoRA serving cost: output tok/s of many concurrent requests spread over several adapters vs the
same requests on the base model, and single-stream decode with one adapter vs the base.

    python benchmarks/lora.py --model llama3-8b --load-format dummy --output-json results/lora.json
    python benchmarks/lora.py --model smollm2-135m --load-format dummy --num-prompts 8 --output-len 16   # CPU smoke

Adapters are random PEFT folders (rank --rank on q/k/v/o/gate/up/down of every layer) written to a
temporary folder; weights are random too, since speed does not depend on their values. Rows:
- `plain`: an engine without LoRA (enable_lora=False), the ceiling;
- `base`: the LoRA engine, every request on the base model (what enabling LoRA costs by itself);
- `multi-lora`: the LoRA engine, request i on adapter i % --num-adapters (one batch mixes them all);
- `1-stream base` / `1-stream lora`: one request at a time (decode latency).
`vs base` compares with the LoRA engine's base-model rows, `vs plain` with the engine without LoRA.
Each engine runs in a child process so GPU memory and CUDA graphs of one do not affect the other.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

COLUMNS = [("case", "case"), ("requests", "requests"), ("output_tokens", "out tokens"), ("elapsed_s", "seconds"),
           ("output_tok_s", "out tok/s"), ("vs_base", "vs base"), ("vs_plain", "vs plain")]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(parser)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--single-output-len", type=int, default=256, help="tokens of the single-stream runs")
    parser.add_argument("--adapter-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.check_positive(parser, args, "num-prompts", "num-adapters", "rank", "prompt-len", "output-len",
                          "single-output-len")
    return args


def write_random_adapters(hf_config, count: int, rank: int, folder: Path) -> list[str]:
    """PEFT-format adapters for `hf_config` (Llama-like names), random A and B in bfloat16."""
    import torch
    from safetensors.torch import save_file

    hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
    head_dim = getattr(hf_config, "head_dim", None) or hidden // hf_config.num_attention_heads
    q, kv = hf_config.num_attention_heads * head_dim, hf_config.num_key_value_heads * head_dim
    shapes = {"self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
              "self_attn.o_proj": (q, hidden), "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
              "mlp.down_proj": (inter, hidden)}
    generator = torch.Generator().manual_seed(0)
    paths = []
    for index in range(count):
        tensors = {}
        for layer in range(hf_config.num_hidden_layers):
            for module, (fan_in, fan_out) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.{module}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=generator) * 0.01).bfloat16()
                tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=generator) * 0.01).bfloat16()
        path = folder / f"adapter{index}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS), "bias": "none"}))
        paths.append(str(path))
    return paths


def _engine(args, enable_lora: bool):
    from ondo import LLM

    options = dict(load_format=args.load_format, dtype=args.dtype, device=args.device, enforce_eager=args.enforce_eager,
                   max_model_len=args.max_model_len or common.round_up(args.prompt_len + max(args.output_len, args.single_output_len)),
                   max_num_seqs=args.max_num_seqs or args.num_prompts, quantization=args.quantization)
    if args.max_num_batched_tokens:
        options["max_num_batched_tokens"] = args.max_num_batched_tokens
    if enable_lora:
        options.update(enable_lora=True, max_loras=args.num_adapters, max_lora_rank=args.rank)
    return LLM(args.model, **options)


def _timed(llm, device: str, prompts, params, loras) -> dict:
    common.sync(device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, lora_request=loras)
    common.sync(device)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"requests": len(prompts), "output_tokens": tokens, "elapsed_s": elapsed, "output_tok_s": tokens / elapsed}


def run_child(args: argparse.Namespace, which: str) -> list[dict]:
    from ondo import LoRARequest

    common.set_threads(args.threads)
    llm = _engine(args, enable_lora=which == "lora")
    device = str(llm.engine.device)
    vocab = llm.engine.vocab_size
    batch = common.greedy_params(args.output_len)
    single = common.greedy_params(args.single_output_len)
    prompts = common.prompt_sets(args.num_prompts, args.prompt_len, vocab, args.seed, 3)
    warm, sets = prompts["warmup"], prompts["timed"]
    rows = []
    if which == "plain":
        llm.generate(warm[:4], batch)
        rows.append({"case": "plain", **_timed(llm, device, sets[0], batch, None)})
        rows.append({"case": "1-stream plain", **_timed(llm, device, sets[1][:1], single, None)})
        return rows
    paths = write_random_adapters(llm.engine.hf_config, args.num_adapters, args.rank, Path(args.adapter_dir))
    loras = [LoRARequest(f"adapter{i}", i + 1, path) for i, path in enumerate(paths)]
    mixed = [loras[i % len(loras)] for i in range(args.num_prompts)]
    count = min(len(warm), len(loras))
    llm.generate(warm[:count], batch, lora_request=loras[:count])   # warm-up: compiles, loads slots
    rows.append({"case": "base", **_timed(llm, device, sets[0], batch, None)})
    rows.append({"case": "multi-lora", **_timed(llm, device, sets[1], batch, mixed)})
    rows.append({"case": "1-stream base", **_timed(llm, device, sets[2][:1], single, None)})
    rows.append({"case": "1-stream lora", **_timed(llm, device, sets[2][1:2], single, loras[0])})
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    common.resolve_model(args.model, args.load_format)
    if args.child_engine:
        rows = run_child(args, args.child_engine)
        Path(args.child_result).write_text(json.dumps(rows))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("plain", "lora"):
            result = Path(tmp) / f"{which}.json"
            argv_child = list(argv if argv is not None else sys.argv[1:])
            subprocess.run([sys.executable, __file__, *argv_child, "--child-engine", which, "--child-result",
                            str(result), "--adapter-dir", str(Path(tmp) / "adapters")], check=True)
            rows += json.loads(result.read_text())
    by_case = {row["case"]: row for row in rows}
    for row in rows:
        single = row["case"].startswith("1-stream")
        reference = by_case["1-stream base" if single else "base"]
        row["vs_base"] = round(row["output_tok_s"] / reference["output_tok_s"], 3)
        plain = by_case["1-stream plain" if single else "plain"]
        row["vs_plain"] = round(row["output_tok_s"] / plain["output_tok_s"], 3)
    common.print_table(f"LoRA: {args.num_prompts} requests over {args.num_adapters} rank-{args.rank} adapters "
                       f"({args.model}, prompt {args.prompt_len}, output {args.output_len})", rows, COLUMNS)
    common.write_json(args.output_json, {"benchmark": "lora", "args": vars(args), "rows": rows,
                                         "env": common.environment(common.resolve_device(args.device))})


if __name__ == "__main__":
    main()
