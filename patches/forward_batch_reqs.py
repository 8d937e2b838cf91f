"""Give each ForwardBatch the live ``Req`` objects of the batch it was built from.

The deft backend builds its KV tree from the scheduler's radix tree, which it reaches through each
request's ``last_node``. ``ModelWorkerBatch.reqs`` holds the requests, but ``ForwardBatch.init_new``
(SGLang 0.5.10.post1, ``sglang/srt/model_executor/forward_batch_info.py``) copies only tensors and
lists derived from them, and no attention-backend hook sees the ModelWorkerBatch. This patch wraps
``ForwardBatch.init_new`` to set ``forward_batch.deft_reqs = model_worker_batch.reqs`` (a reference,
no copy; ``None`` where SGLang passes none). Forward batches built elsewhere do not carry it: the
CUDA-graph capture's dummy batches need no requests (each replay's real batch reaches the backend
through ``cuda_graph_replay``), and two-batch-overlap splits are refused by the config checks.
"""
from __future__ import annotations

from .sglang_version import require_source, require_supported_sglang
from .wrapping import wrap_once

ATTRIBUTE = "deft_reqs"
# SGLang 0.5.10.post1's source of ForwardBatch.init_new (sglang_version.require_source)
SOURCE_SHA256 = "63ea6ba68a547da02ba58b64f3c40a96920a8fee450b354bc2d6ae729f754601"


def apply() -> None:
    """Idempotent; raises UnsupportedSGLangVersion on another SGLang release."""
    require_supported_sglang(__name__)
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    require_source(__name__, ForwardBatch, "init_new", SOURCE_SHA256)

    def wrap(original):
        def init_new(cls, batch, model_runner):
            forward_batch = original(cls, batch, model_runner)
            setattr(forward_batch, ATTRIBUTE, batch.reqs)
            return forward_batch
        return init_new

    wrap_once(ForwardBatch, "init_new", wrap)
