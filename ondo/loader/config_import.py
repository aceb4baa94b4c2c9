"""Building transformers configs without importing transformers' model-loading stack.

In transformers 5 every model config module imports `transformers.utils.type_validators`, which
imports `transformers.activations` only to check that `hidden_act` names a known activation. That
module pulls in the hub-kernel and checkpoint-conversion code and, through it,
`torch.distributed.tensor` and sympy: about a second and tens of MB on a small CPU before the first
weight is read. ondo never uses `transformers.activations` (its models have their own activation
layers), so while the validators are first imported a stand-in with an empty `ACT2FN` is put in
its place; `type_validators` skips the check when `ACT2FN` is empty (its own rule, for when torch
is missing). The stand-in is removed right after, so any later import gets the real module.

The only effect is that `hidden_act` names are not checked against transformers' list in this
process; every other config validation runs as usual. When the validators were already imported
(by transformers models in the same process), nothing is done.
"""

from __future__ import annotations

import sys
import types

_VALIDATORS = "transformers.utils.type_validators"
_ACTIVATIONS = "transformers.activations"


def import_validators_without_activations() -> None:
    """Import `transformers.utils.type_validators` without `transformers.activations` (see above)."""
    if _VALIDATORS in sys.modules or _ACTIVATIONS in sys.modules:
        return
    stand_in = types.ModuleType(_ACTIVATIONS)
    stand_in.ACT2FN = {}
    sys.modules[_ACTIVATIONS] = stand_in
    try:
        import transformers.utils.type_validators  # noqa: F401
    except Exception:
        # A transformers whose validators need more of the module: drop the half-imported copy
        # so the next import (the config's own) runs the ordinary way.
        sys.modules.pop(_VALIDATORS, None)
    finally:
        if sys.modules.get(_ACTIVATIONS) is stand_in:
            del sys.modules[_ACTIVATIONS]
