"""``sglang_deft.Engine``: SGLang's offline Engine with the ``deft`` backend registered everywhere.

Import it as ``from sglang_deft import Engine`` (or ``import sglang_deft.engine``): the import sets
the process up before SGLang loads (``server_setup.prepare_process``: on a machine without CUDA,
SGLang's CPU engine and ``sglang_deft.cpu_compat``). Constructor arguments are SGLang's Engine /
ServerArgs keywords; ``attention_backend="deft"`` and ``decode_attention_backend="deft"`` are valid,
and unsupported configurations raise ``sglang_deft.config_checks.UnsupportedConfiguration``.
"""
from __future__ import annotations

from sglang_deft.server_setup import prepare_process

_IMPORT_DEVICE = prepare_process(None)

import sglang.srt.entrypoints.engine as _sglang_engine  # noqa: E402  (after prepare_process)

from sglang_deft import subprocess_entry  # noqa: E402
from sglang_deft.registration import register  # noqa: E402
from sglang_deft.server_setup import check_startup, make_server_args, split_deft_backend  # noqa: E402


class Engine(_sglang_engine.Engine):
    run_scheduler_process_func = staticmethod(subprocess_entry.run_scheduler_process)
    run_detokenizer_process_func = staticmethod(subprocess_entry.run_detokenizer_process)

    def __init__(self, **kwargs):
        register()
        if "server_args" not in kwargs:
            device = kwargs.get("device") or _IMPORT_DEVICE
            _check_device(device)
            split_deft_backend(kwargs, device)
            kwargs.setdefault("log_level", "error")  # SGLang's Engine default
            # (server_args_class: SGLang's hook for a ServerArgs subclass)
            kwargs = {"server_args": make_server_args(lambda: self.server_args_class(**kwargs), kwargs, device)}
        else:
            _check_device(kwargs["server_args"].device)
        check_startup(kwargs["server_args"])
        super().__init__(**kwargs)


def _check_device(device: str) -> None:
    """The process was set up for ``_IMPORT_DEVICE`` at import: SGLang's layers would run the other
    device's kernels (CUDA ones on CPU tensors: the scheduler dies at its first RMSNorm)."""
    if device == "cpu" and _IMPORT_DEVICE != "cpu":
        raise ValueError(
            "device='cpu' on a machine with CUDA: set SGLANG_USE_CPU_ENGINE=1 before importing "
            "sglang_deft.Engine (SGLang reads it at import time)"
        )
    if device == "cuda" and _IMPORT_DEVICE != "cuda":
        raise ValueError(
            "device='cuda', but sglang_deft.Engine was imported for the CPU (no CUDA device, or "
            "SGLANG_USE_CPU_ENGINE=1 set; SGLang reads it at import time)"
        )
