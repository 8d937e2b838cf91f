"""Installing a patch's wrapper around an SGLang method, once."""
from __future__ import annotations

import functools
import inspect
import weakref
from typing import Callable

_MARK = "_sglang_deft_patched"
# The wrappers wrap_once made, by identity: the mark alone is no proof, as functools.wraps copies a function's
# __dict__, so another plugin's replacement of a wrapped method made with it carries the mark too.
_WRAPPERS: weakref.WeakSet = weakref.WeakSet()


def is_deft_wrapper(function: Callable) -> bool:
    """Whether ``function`` is a wrapper ``wrap_once`` installed."""
    try:
        return function in _WRAPPERS
    except TypeError:  # not weakly referenceable: no function of ours
        return False


def wrap_once(owner: type, name: str, make_wrapper: Callable[[Callable], Callable]) -> None:
    """Replace ``owner.name`` by ``make_wrapper(original)`` (a classmethod stays one). Idempotent: a second call
    finds the wrapper it installed and does nothing. The wrapper also carries a mark, for tests and inspection."""
    attr = inspect.getattr_static(owner, name)
    is_classmethod = isinstance(attr, classmethod)
    original = attr.__func__ if is_classmethod else attr
    if is_deft_wrapper(original):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _MARK, True)
    _WRAPPERS.add(wrapper)
    setattr(owner, name, classmethod(wrapper) if is_classmethod else wrapper)
