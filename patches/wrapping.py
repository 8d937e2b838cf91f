"""Installing a patch's wrapper around an SGLang method, once."""
from __future__ import annotations

import functools
import inspect
from typing import Callable

_MARK = "_sglang_deft_patched"


def wrap_once(owner: type, name: str, make_wrapper: Callable[[Callable], Callable]) -> None:
    """Replace ``owner.name`` by ``make_wrapper(original)`` (a classmethod stays one). Idempotent: the
    installed wrapper carries a mark, and a second call finds it and does nothing."""
    attr = inspect.getattr_static(owner, name)
    is_classmethod = isinstance(attr, classmethod)
    original = attr.__func__ if is_classmethod else attr
    if getattr(original, _MARK, False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _MARK, True)
    setattr(owner, name, classmethod(wrapper) if is_classmethod else wrapper)
