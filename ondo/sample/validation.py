"""Value checks for SamplingParams: each returns the normalised value or raises
SamplingParamsError naming the field, the allowed range and the value given."""

from __future__ import annotations

import math
import numbers
from typing import Any


class SamplingParamsError(ValueError):
    """A decoding option is invalid. The server answers it with HTTP 400."""


def _range_text(ge=None, gt=None, le=None, lt=None) -> str:
    low = None if ge is None and gt is None else ("[" if ge is not None else "(", ge if ge is not None else gt)
    high = None if le is None and lt is None else ("]" if le is not None else ")", le if le is not None else lt)
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{'>=' if ge is not None else '>'} {low[1]}"
    return f"{'<=' if le is not None else '<'} {high[1]}"


def _check_range(name: str, value, ge=None, gt=None, le=None, lt=None):
    ok = ((ge is None or value >= ge) and (gt is None or value > gt)
          and (le is None or value <= le) and (lt is None or value < lt))
    if not ok:  # also catches NaN: every comparison with it is False
        raise SamplingParamsError(f"{name} must be {_range_text(ge, gt, le, lt)}, got {value!r}")
    return value


def as_number(name: str, value: Any, *, ge=None, gt=None, le=None, lt=None) -> float:
    """A finite real number (bool refused: True is never meant as 1.0) within the bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplingParamsError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if math.isinf(value):
        raise SamplingParamsError(f"{name} must be a finite number, got {value!r}")
    return _check_range(name, value, ge, gt, le, lt)


def as_int(name: str, value: Any, *, ge=None, gt=None, le=None, lt=None) -> int:
    """An integer (a float with an integral value is accepted, as JSON clients send 5.0)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SamplingParamsError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return _check_range(name, int(value), ge, gt, le, lt)


def as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SamplingParamsError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")
    return value


def as_int_list(name: str, value: Any, *, ge=None) -> list[int]:
    """A list of integers; None means empty."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise SamplingParamsError(f"{name} must be a list of integers, got {value!r}")
    return [as_int(name, item, ge=ge) for item in value]


def as_str_list(name: str, value: Any) -> list[str]:
    """A string or a list of non-empty strings; None means empty."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise SamplingParamsError(f"{name} must be a string or a list of strings, got {value!r}")
    for item in value:
        if not isinstance(item, str):
            raise SamplingParamsError(f"{name} must hold strings, got {item!r} ({type(item).__name__})")
        if not item:
            raise SamplingParamsError(f"{name} must not hold an empty string, got {list(value)!r}")
    return list(value)
