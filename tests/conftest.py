"""Test session setup: SGLang importable on a machine without CUDA.

``sglang_deft.cpu_compat.install()`` must run before the first ``sglang.srt`` import of the session,
so it runs here, at collection start. On a CUDA machine it is not needed and not installed.
"""
import torch

if not torch.cuda.is_available():
    import sglang_deft.cpu_compat

    sglang_deft.cpu_compat.install()

import pytest  # noqa: E402  (after the compatibility layer: nothing here imports sglang at load)


@pytest.fixture(scope="module")
def model_config(server_args):
    """The ModelConfig of the requesting module's ``server_args`` (backend unit tests)."""
    from sglang.srt.configs.model_config import ModelConfig

    return ModelConfig.from_server_args(server_args)


@pytest.fixture
def single_rank(monkeypatch):
    """One attention TP rank: SGLang sets the size in its distributed init, which unit tests skip."""
    import sglang_deft.backend

    monkeypatch.setattr(sglang_deft.backend, "get_attention_tp_size", lambda: 1)
