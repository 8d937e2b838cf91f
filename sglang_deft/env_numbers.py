"""The deft backend's numeric environment variables, read one way: a value that does not parse or is out of range
is an error that names the variable, what it got and what it takes (the launcher reports it before SGLang starts,
``config_checks``), never a silent default."""
from __future__ import annotations

import os
import re
from typing import Callable, TypeVar

N = TypeVar("N", int, float)
# What the variables are written as: ASCII digits, a sign, a point, an exponent. Python's int() and float() also take
# spaces around, underscores ("1_000") and other scripts' digits, which a typo in a launch script could hide behind.
_PLAIN_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def env_number(name: str, default: str, parse: Callable[[str], N], valid: Callable[[N], bool], expected: str) -> N:
    """``parse`` of ``name``'s value (``default`` when unset), a plain number (_PLAIN_NUMBER); ValueError
    ``"<name>='<raw>': expected <expected>"`` when it is none, does not parse or ``valid`` refuses it."""
    raw = os.environ.get(name, default)
    try:
        value = parse(raw) if _PLAIN_NUMBER.fullmatch(raw) else None
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise ValueError(f"{name}={raw!r}: expected {expected}")
    return value
