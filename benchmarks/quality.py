"""Perplexity of every weight format over a fixed English and Korean text kept in the repo.

    python benchmarks/quality.py --output-json quality.json           # CPU, about 5-10 minutes
    python benchmarks/quality.py --models gemma3 --formats int4,nf4     # a part of it

The text (`benchmarks/data/quality_{en,ko}.txt`, written for ondo) is cut into windows of `--context`
tokens; each window is one prompt and every token after its first is scored through `prompt_logprobs`,
so a perplexity is exp(mean negative log-likelihood) over those tokens.

Rows:
- GGUF files (the built-in SmolLM2-135M Q4_1, Gemma 3 270M Q4_K_M): `packed` (the blocks kept
  packed, the default) against `dequantized` (`quantization="none"`) in the same run dtype, and the
  dequantized file in float32, the reference.
- A dense folder made from the Gemma 3 GGUF (dequantized to float32 with transformers, cached under
  ~/.cache/ondo): float32 is the reference for the on-the-fly formats int8, int4 and nf4.
- With `--perturb N`: each on-the-fly format again on N copies of that folder whose decoder matrices are
  multiplied by (1 + 1e-4 * N(0, 1)) (seeds 1..N; float32 scored once on the first copy). Such a change
  is far below any format's rounding but moves which side of a rounding boundary some weights fall on:
  the spread of these rows is how much of a format's perplexity change is the luck of its roundings.
- With `--peer llamacpp`: the same Gemma 3 weights requantized by llama.cpp to Q4_0, its all-4-bit
  format, against the same reference (scored by ondo: a GGUF's blocks dequantize exactly).
Bounds checked (printed, and `"within_bound"` in the JSON): int8 <= +1 %, int4 and nf4 <= +5 %, a packed
GGUF within 0.5 % of its dequantized self in the same dtype.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

DATA = Path(__file__).parent / "data"
BOUNDS = {"int8": 1.0, "int4": 5.0, "nf4": 5.0, "packed": 0.5}


def windows(token_ids: list[int], context: int) -> list[list[int]]:
    return [token_ids[i:i + context] for i in range(0, len(token_ids) - 1, context) if len(token_ids[i:i + context]) > 1]


def perplexity(llm, texts: dict[str, str], context: int) -> dict:
    from ondo import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    result = {}
    for name, text in texts.items():
        ids = llm.engine.tokenizer.encode(text)
        prompts = windows(ids, context)
        nll, count = 0.0, 0
        for out, prompt in zip(llm.generate(prompts, params), prompts):
            for position in range(1, len(prompt)):
                nll -= out.prompt_logprobs[position][prompt[position]].logprob
                count += 1
        result[name] = {"tokens": count, "ppl": math.exp(nll / count)}
    total_nll = sum(math.log(r["ppl"]) * r["tokens"] for r in result.values())
    total = sum(r["tokens"] for r in result.values())
    result["all"] = {"tokens": total, "ppl": math.exp(total_nll / total)}
    return result


def dense_folder_from_gguf(gguf_path: Path) -> Path:
    """The GGUF dequantized to a float32 safetensors folder (transformers' own GGUF loader), cached."""
    folder = Path(os.path.expanduser("~/.cache/ondo/quality")) / (gguf_path.stem + "-f32")
    if not (folder / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import torch
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # transformers will not save a model it loaded from GGUF; a fresh model of the same config will.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config          # the dense copy is not quantized
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(folder)
    return folder


def perturbed_folder(folder: Path, seed: int, relative: float = 1e-4) -> Path:
    """A copy of the dense `folder` with every matrix of its decoder layers multiplied by
    (1 + relative * N(0, 1)), drawn from `seed`; cached next to it."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    target = folder.with_name(f"{folder.name}-perturbed-{seed}")
    if not (target / "config.json").exists():
        generator = torch.Generator().manual_seed(seed)
        state = load_file(folder / "model.safetensors")
        for name, tensor in state.items():
            if ".layers." in name and tensor.dim() == 2:
                state[name] = tensor * (1 + relative * torch.randn(tensor.shape, generator=generator))
        partial = target.with_name(target.name + ".partial")
        shutil.copytree(folder, partial, ignore=shutil.ignore_patterns("*.safetensors"), dirs_exist_ok=True)
        save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
        partial.rename(target)
    return target


def model_paths(names: list[str]) -> dict[str, Path]:
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent))
    from tests.tokenizer.model_files import gemma3_gguf_path, smollm2_gguf_path

    found = {"smollm2": smollm2_gguf_path, "gemma3": gemma3_gguf_path}
    return {name: found[name]() for name in names}


def llamacpp_q4_0(gguf_path: Path) -> Path:
    """The GGUF requantized by llama.cpp (llama-cpp-python's `llama_model_quantize`) to Q4_0, its
    plain 4-bit format, cached. llama.cpp dequantizes each tensor to float32 and quantizes that: the
    same float weights the on-the-fly formats start from. (Its Q4_K_S and Q4_K_M keep Gemma 3 270M's
    640-wide rows in 5-bit Q5_0: k-quant blocks need rows that are multiples of 256.)"""
    import ctypes

    import llama_cpp

    target = Path(os.path.expanduser("~/.cache/ondo/quality")) / (gguf_path.stem + "-requantized-q4_0.gguf")
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, True
        partial = target.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(str(gguf_path).encode(), str(partial).encode(), ctypes.byref(params)):
            raise RuntimeError(f"llama.cpp could not quantize {gguf_path}")
        partial.rename(target)
    return target


def variants(name: str, gguf: Path, formats: list[str], dtype: str, peer: str | None = None, perturb: int = 0):
    """(label, model, options, reference label) for one model."""
    if "packed" in formats:
        yield f"{name} GGUF dequantized float32", gguf, dict(quantization="none", dtype="float32"), None
        yield f"{name} GGUF dequantized {dtype}", gguf, dict(quantization="none", dtype=dtype), None
        yield f"{name} GGUF packed {dtype}", gguf, dict(dtype=dtype), f"{name} GGUF dequantized {dtype}"
    on_the_fly = [f for f in formats if f in ("int8", "int4", "nf4")]
    if on_the_fly and name == "gemma3":
        folder = dense_folder_from_gguf(gguf)
        yield f"{name} folder float32", folder, dict(dtype="float32"), None
        for fmt in on_the_fly:
            yield f"{name} folder {fmt}", folder, dict(quantization=fmt), f"{name} folder float32"
        for seed in range(1, perturb + 1):
            copy = perturbed_folder(folder, seed)
            if seed == 1:   # how far the perturbation alone moves the reference
                yield f"{name} folder float32 perturbed 1", copy, dict(dtype="float32"), f"{name} folder float32"
            for fmt in on_the_fly:
                yield f"{name} folder {fmt} perturbed {seed}", copy, dict(quantization=fmt), f"{name} folder float32"
        if peer == "llamacpp" and "int4" in on_the_fly:   # the peer's 4-bit of the same float weights
            yield (f"{name} llama.cpp Q4_0", llamacpp_q4_0(gguf), dict(quantization="none", dtype="float32"),
                   f"{name} folder float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--formats", default="packed,int8,int4,nf4")
    parser.add_argument("--dtype", default="bfloat16", help="run dtype of the packed and dequantized GGUF rows")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--peer", choices=["llamacpp", "none"], default="none",
                        help="llamacpp: also score Gemma 3 requantized to llama.cpp's Q4_0 (needs llama-cpp-python), "
                             "against the same float32 reference as int4")
    parser.add_argument("--perturb", type=int, default=0, metavar="N",
                        help="also score each on-the-fly format on N slightly perturbed copies of the dense folder "
                             "(the spread of a format's perplexity over roundings)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("ONDO_NO_PROGRESS", "1")
    import torch

    from ondo import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = {lang: (DATA / f"quality_{lang}.txt").read_text() for lang in ("en", "ko")}
    formats = args.formats.split(",")
    rows, by_label = [], {}
    for name, gguf in model_paths(args.models.split(",")).items():
        for label, model, options, reference in variants(name, gguf, formats, args.dtype, args.peer, args.perturb):
            start = time.perf_counter()
            llm = LLM(str(model), max_model_len=args.context + 8, **options)
            result = perplexity(llm, texts, args.context)
            row = {"label": label, "options": options, "seconds": round(time.perf_counter() - start, 1), **result}
            if reference is not None:
                delta = 100 * (result["all"]["ppl"] / by_label[reference]["all"]["ppl"] - 1)
                kind = options.get("quantization") or "packed"
                kind = "int4" if kind == "none" else kind   # the peer's Q4_0 row, held to int4's bound
                row.update(reference=reference, delta_pct=delta, bound_pct=BOUNDS[kind],
                           within_bound=abs(delta) <= BOUNDS[kind] if kind == "packed" else delta <= BOUNDS[kind])
            by_label[label] = row
            rows.append(row)
            print(f"{label:<40} ppl en {result['en']['ppl']:8.3f}  ko {result['ko']['ppl']:8.3f}  all "
                  f"{result['all']['ppl']:8.3f} ({result['all']['tokens']} tokens)"
                  + (f"  {row['delta_pct']:+.2f}% vs {reference} (bound {row['bound_pct']}%: "
                     f"{'ok' if row['within_bound'] else 'OVER'})" if reference else ""), flush=True)
            del llm
    spread = rounding_spread(rows)
    for label, deltas in spread.items():
        print(f"{label:<40} over {deltas['roundings']} roundings: {deltas['min_pct']:+.2f}% .. {deltas['max_pct']:+.2f}%"
              f" (median {deltas['median_pct']:+.2f}%)")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"context": args.context, "rows": rows, "rounding_spread": spread},
                                                     indent=2))


def rounding_spread(rows: list[dict]) -> dict:
    """Per on-the-fly format with perturbed rows: min / median / max of its perplexity change over the
    original folder and every perturbed copy."""
    import statistics

    groups: dict[str, list[float]] = {}
    for row in rows:
        fmt = row["options"].get("quantization")
        if fmt in ("int8", "int4", "nf4") and "delta_pct" in row:
            groups.setdefault(row["label"].split(" perturbed ")[0], []).append(row["delta_pct"])
    return {label: {"roundings": len(d), "min_pct": min(d), "median_pct": statistics.median(d), "max_pct": max(d)}
            for label, d in groups.items() if len(d) > 1}


if __name__ == "__main__":
    main()
