"""The deft backend's numeric environment variables, read one way: a value that does not parse or is out of range
is an error that names the variable, what it got and what it takes (the launcher reports it before SGLang starts,
``config_checks``), never a silent default."""
from __future__ import annotations

import os
from typing import Callable, TypeVar

N = TypeVar("N", int, float)


def env_number(name: str, default: str, parse: Callable[[str], N], valid: Callable[[N], bool], expected: str) -> N:
    """``parse`` of ``name``'s value (``default`` when unset); ValueError ``"<name>=<raw>: expected <expected>"``
    when it does not parse or ``valid`` refuses it."""
    raw = os.environ.get(name, default)
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise ValueError(f"{name}={raw!r}: expected {expected}")
    return value
