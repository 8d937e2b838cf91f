"""Make ``deft`` an SGLang attention backend in the current process.

Needed in every process that parses server arguments (the CLI rejects unknown backend names) and in
every scheduler process (the model runner looks the backend up in SGLang's registry). Spawned
schedulers get it from ``sglang_deft.subprocess_entry``.
"""
from __future__ import annotations

from sglang_deft.config_checks import BACKEND_NAME

_registered = False


def register() -> None:
    """Idempotent: registry entry, CLI choice, and the ForwardBatch patch the backend relies on
    (the CUDA-graph patch follows when the backend is created)."""
    global _registered
    if _registered:
        return
    from sglang_deft.patches.sglang_version import require_supported_sglang

    # Before SGLang's modules are imported: another release may lack them, which would fail as a bare ImportError
    require_supported_sglang("sglang_deft.registration")
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    from sglang_deft.patches import forward_batch_reqs

    forward_batch_reqs.apply()
    register_attention_backend(BACKEND_NAME)(_create_deft_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    _registered = True


def _create_deft_backend(model_runner):
    from sglang_deft.backend import DeftAttnBackend
    from sglang_deft.patches import cuda_graph_replay, warmup_dummy_run

    # Applied here rather than in register(): SGLang's CUDA-graph runner and model runner are loaded by
    # now, while register() also runs in processes that never load them. The model runner calls
    # kernel_warmup (and with it _dummy_run) after it has made the backend.
    cuda_graph_replay.apply()
    warmup_dummy_run.apply()
    return DeftAttnBackend(model_runner)
