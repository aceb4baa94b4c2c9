"""Launching an eager Triton kernel with less host time.

`kernel[grid](...)` binds its arguments, derives the specialisation of each (dtype, 16-byte
alignment, integers equal to 1 or divisible by 16) and hashes a cache key on every call: about 26 us
of host time a launch on the H200's host, 45-55 us inside a busy engine step, and a one-stream
sampled decode step launches two such kernels outside any CUDA graph (penalties_triton.py,
candidates_triton.py), where the step has no host time to spare. `FastLaunch` keeps each compiled
kernel under a key built from the same distinctions Triton's own key draws for these arguments and
launches it through the compiled kernel's runner. A new key, and a Triton whose launch does not hand
back a compiled kernel with a runner (its interpreter, say), go through `kernel[grid]` as before.
"""

from __future__ import annotations

from typing import Any

import torch

INT32 = range(-2**31, 2**31)


def _specialisation(arg: Any) -> Any:
    """What Triton's launch specialises a kernel on for this argument."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool):
        return bool, arg
    if isinstance(arg, int):
        return int, arg == 1, arg % 16 == 0, arg in INT32
    return type(arg)


class FastLaunch:
    """`FastLaunch(kernel)(grid, *args, **constexprs_and_options)` runs `kernel[grid](*args, ...)`.
    args: the kernel's leading parameters in order; every later parameter as a keyword."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self._compiled: dict[tuple, Any] = {}
        self._runners: dict[tuple, Any] = {}
        self.enabled = True

    def __call__(self, grid: tuple[int, ...], *args: Any, **keywords: Any) -> None:
        if not self.enabled:
            self.kernel[grid](*args, **keywords)
            return
        key = (tuple(map(_specialisation, args)), tuple(sorted(keywords.items())))
        grid = tuple(grid) + (1,) * (3 - len(grid))
        runner = self._runners.get((key, grid))
        if runner is None:
            compiled = self._compiled.get(key)
            if compiled is None:   # compiled (or found in Triton's cache) and launched the usual way
                compiled = self.kernel[grid](*args, **keywords)
                if not hasattr(compiled, "run") or not hasattr(compiled, "__getitem__"):
                    self.enabled = False
                    return
                self._compiled[key] = compiled
                return
            runner = self._runners[(key, grid)] = compiled[grid]
        later = self.kernel.arg_names[len(args):]   # constexprs, in the kernel's order
        runner(*args, *(keywords[name] for name in later))
