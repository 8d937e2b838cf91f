"""Mark SGLang's warm-up forward passes, whose decode batches carry no requests.

``ModelRunner.kernel_warmup`` (SGLang 0.5.10.post1, ``sglang/srt/model_executor/model_runner.py``) runs
FlashInfer's autotune before any CUDA graph is captured, on GPUs where the MoE runner is
``flashinfer_trtllm`` or ``flashinfer_mxfp4`` (SGLang picks the first by itself for Qwen3-MoE and GLM-4-MoE
on Blackwell). Its ``_dummy_run`` builds a DECODE ``ForwardBatch`` directly, not through ``init_new``, so
without ``deft_reqs`` (``forward_batch_reqs``), and calls the attention backend's
``init_forward_metadata`` on it. deft refuses a decode batch without requests (a real one would need
them), which stopped such servers at startup. This patch wraps ``_dummy_run`` so that, while it runs,
:func:`in_warmup_dummy_run` is true: the backend then plans the batch's rows as padding (they attend
nothing, as a CUDA graph's capture batch does), and still refuses a request-less batch at any other time.
"""
from __future__ import annotations

import contextvars

from .sglang_version import require_source, require_supported_sglang
from .wrapping import wrap_once

# SGLang 0.5.10.post1's source of ModelRunner._dummy_run (sglang_version.require_source)
SOURCE_SHA256 = "8393d14f445b5866a4a00213ecab8f991868c1879bd5504dac0ae7b26d190570"

_IN_DUMMY_RUN = contextvars.ContextVar("sglang_deft_in_warmup_dummy_run", default=False)


def in_warmup_dummy_run() -> bool:
    return _IN_DUMMY_RUN.get()


def apply() -> None:
    """Idempotent; raises UnsupportedSGLangVersion on another SGLang release."""
    require_supported_sglang(__name__)
    from sglang.srt.model_executor.model_runner import ModelRunner

    require_source(__name__, ModelRunner, "_dummy_run", SOURCE_SHA256)

    def wrap(original):
        def _dummy_run(self, *args, **kwargs):
            token = _IN_DUMMY_RUN.set(True)
            try:
                return original(self, *args, **kwargs)
            finally:
                _IN_DUMMY_RUN.reset(token)
        return _dummy_run

    wrap_once(ModelRunner, "_dummy_run", wrap)
