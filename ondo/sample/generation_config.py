"""Translation of a transformers `GenerationConfig` into SamplingParams keyword arguments."""

from __future__ import annotations

from typing import Any, Mapping

from ondo.sample.validation import SamplingParamsError

# Options from_generation_config() takes from a GenerationConfig as they are.
_GENERATE_OPTIONS = (
    "do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff",
    "eta_cutoff", "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "max_new_tokens",
    "min_new_tokens", "max_length", "min_length", "num_return_sequences", "stop_strings",
)
_TRANSFORMERS_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
                       "num_return_sequences": "n", "stop_strings": "stop"}

# transformers' generate() options that change the output and that ondo does not implement.
# from_generation_config() refuses them when they are set to anything but their neutral value.
_UNSUPPORTED_GENERATE_OPTIONS = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "penalty_alpha": None,
    "diversity_penalty": 0.0,
    "guidance_scale": None,
    "constraints": None,
    "force_words_ids": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "dola_layers": None,
    "watermarking_config": None,
    "top_h": None,
    "begin_suppress_tokens": None,
}


def generation_config_kwargs(config: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams keywords from a `GenerationConfig` (or its dict) plus explicit overrides.

    Only options the config sets explicitly are taken (transformers leaves the others None);
    overrides win over the config. As in transformers, max_new_tokens wins over max_length, and
    a length given in the overrides replaces both of the config's. Token ids (eos, pad, bos) are
    the engine's to read; options that do not change the tokens (output_scores, use_cache, ...)
    are ignored; options that change them and that ondo does not implement raise
    SamplingParamsError."""
    if isinstance(config, Mapping):
        values = dict(config)
    elif hasattr(config, "to_dict"):
        values = config.to_dict()
    else:
        raise TypeError(
            f"expected a transformers.GenerationConfig or a dict, got {type(config).__name__}")
    values = {k: v for k, v in values.items() if v is not None}
    for name, neutral in _UNSUPPORTED_GENERATE_OPTIONS.items():
        if name in values and values[name] != neutral and values[name] not in ([], {}):
            raise SamplingParamsError(f"{name} is not supported by ondo, got {values[name]!r}")
    taken = _rename_transformers_names(
        {name: values[name] for name in _GENERATE_OPTIONS if name in values})
    if taken.get("top_k") == 0:
        taken["top_k"] = -1  # transformers spells "off" as 0
    if "max_tokens" in taken:
        taken.pop("max_length", None)
    elif "max_length" in taken:
        taken["max_tokens"] = None  # transformers' limit replaces vLLM's default of 16
    # Tokens suppressed at every step are one-token bad words.
    suppress = values.get("suppress_tokens") or []
    if not isinstance(suppress, (list, tuple)):
        raise SamplingParamsError(f"suppress_tokens must be a list of token ids, got {suppress!r}")
    suppressed = [[t] for t in suppress]
    if suppressed:
        taken["bad_words_ids"] = list(taken.get("bad_words_ids") or []) + suppressed
    for seq, bias in _sequence_bias_items(values.get("sequence_bias")):
        if len(seq) != 1:
            raise SamplingParamsError(
                f"sequence_bias is supported for single tokens only, got {list(seq)!r}")
        taken.setdefault("logit_bias", {})[seq[0]] = bias
    overrides = _rename_transformers_names(overrides)
    if "max_tokens" in overrides or "max_length" in overrides:
        taken.pop("max_tokens", None)
        taken.pop("max_length", None)
    if "min_tokens" in overrides or "min_length" in overrides:
        taken.pop("min_tokens", None)
        taken.pop("min_length", None)
    return {**taken, **overrides}


def _rename_transformers_names(kwargs: dict[str, Any]) -> dict[str, Any]:
    """{"max_new_tokens": 5} -> {"max_tokens": 5}, unless the vLLM name is there too (then the
    constructor reports the clash)."""
    out = dict(kwargs)
    for alias, name in _TRANSFORMERS_NAMES.items():
        if alias in out and name not in out:
            out[name] = out.pop(alias)
    return out


def _sequence_bias_items(value: Any) -> list[tuple[tuple[int, ...], float]]:
    """transformers accepts {(ids...): bias} and [[[ids...], bias], ...]."""
    if not value:
        return []
    pairs = value.items() if isinstance(value, Mapping) else value
    try:
        return [(tuple(ids), float(bias)) for ids, bias in pairs]
    except (TypeError, ValueError):
        raise SamplingParamsError(
            f"sequence_bias must map token id sequences to biases, got {value!r}") from None
