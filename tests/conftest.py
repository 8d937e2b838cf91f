"""Test session setup: SGLang importable on a machine without CUDA.

``sglang_deft.cpu_compat.install()`` must run before the first ``sglang.srt`` import of the session,
so it runs here, at collection start. On a CUDA machine it is not needed and not installed.
"""
import torch

if not torch.cuda.is_available():
    import sglang_deft.cpu_compat

    sglang_deft.cpu_compat.install()
