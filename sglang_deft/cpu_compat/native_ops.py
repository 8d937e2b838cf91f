"""Stand-in for sgl_kernel's native library (``common_ops``) on machines without CUDA.

sgl_kernel's ``__init__`` loads ``common_ops`` only for its side effect: the ``.so`` registers the
``torch.ops.sgl_kernel.*`` operators that its Python wrappers call. This stand-in registers none, and
makes ``torch.ops.sgl_kernel`` raise :class:`NativeOpUnavailable` naming the missing operator, so a
code path that needs a native kernel stops with a clear message instead of a bare AttributeError.
"""
from __future__ import annotations

import torch
from torch._ops import _OpNamespace


class NativeOpUnavailable(AttributeError):
    """A ``torch.ops.sgl_kernel`` operator was reached on the CPU-only install.

    An AttributeError so that SGLang's own ``hasattr(torch.ops.sgl_kernel, ...)`` feature probes
    (e.g. the Intel AMX check in ``sglang/srt/utils/common.py``) keep answering False.
    """


class _SglKernelNamespace(_OpNamespace):
    """``torch.ops.sgl_kernel`` that names the operator and the reason when it is missing.

    Operators that do get registered (by a CPU build of sgl_kernel, or by ``torch.library`` calls in
    Python) are returned unchanged: this only rewrites the error.
    """

    def __getattr__(self, op_name: str):
        try:
            return super().__getattr__(op_name)
        except AttributeError as e:
            if op_name.startswith("__"):
                raise
            raise NativeOpUnavailable(
                f"sgl_kernel native op `torch.ops.sgl_kernel.{op_name}` is not available: "
                "sglang_deft.cpu_compat serves sgl_kernel's Python files without its native (CUDA) "
                "library. This code path needs a GPU install of sglang-kernel; on CPU, pick options "
                "that SGLang runs with plain torch ops."
            ) from e


def install_namespace() -> None:
    """Replace ``torch.ops.sgl_kernel`` with the namespace that explains missing operators."""
    if not isinstance(getattr(torch.ops, "sgl_kernel", None), _SglKernelNamespace):
        setattr(torch.ops, "sgl_kernel", _SglKernelNamespace("sgl_kernel"))
