"""Hand each CUDA-graph replay's ForwardBatch to the decode attention backend, which may decline it.

``CudaGraphRunner.replay_prepare`` (SGLang 0.5.10.post1, ``sglang/srt/model_executor/cuda_graph_runner.py``)
refreshes the attention backend through ``init_forward_metadata_replay_cuda_graph(bs, req_pool_indices,
seq_lens, ...)``: the graph's padded input buffers only. There is no ForwardBatch there, so no
``deft_reqs`` (``forward_batch_reqs``) and no radix paths to build the step's KV tree from. The one
call that has the ForwardBatch and decides between the graph and an eager step is
``CudaGraphRunner.can_run(forward_batch)``, which ``ModelRunner._forward_raw`` calls right before
``replay(forward_batch)``; no attention-backend hook sees that batch.

This patch wraps ``can_run``: where SGLang would replay, it calls the decode attention backend's
``deft_prepare_graph_replay(forward_batch, bs)`` (a backend without that method is not asked), with
``bs`` the captured batch size that ``replay_prepare`` pads the batch to (the same bisection of
``capture_bs``). The backend plans the step into the buffers its graphs were captured with, or
returns False when the step's tree does not fit them: SGLang then runs that step eagerly, as it does
for a batch larger than every captured graph.
"""
from __future__ import annotations

import bisect

from .sglang_version import require_source, require_supported_sglang
from .wrapping import wrap_once

HOOK = "deft_prepare_graph_replay"
# SGLang 0.5.10.post1's source of what this patch wraps (can_run) and mirrors (replay_prepare's padding to a captured
# batch size): sglang_version.require_source.
SOURCE_SHA256 = {
    "can_run": "a4d897cae6b2c7e830917b64990eee06ffd3d2e2c884f959b54a2421d106b0b0",
    "replay_prepare": "2bf5fbc02fd7b06754e28c83fa64515135d914f5ebb4bdc175b30c8fcc6e95ca",
}


def apply() -> None:
    """Idempotent; raises UnsupportedSGLangVersion on another SGLang release."""
    require_supported_sglang(__name__)
    from sglang.srt.model_executor.cuda_graph_runner import CudaGraphRunner

    for name, sha256 in SOURCE_SHA256.items():
        require_source(__name__, CudaGraphRunner, name, sha256)

    def wrap(original):
        def can_run(self, forward_batch):
            if not original(self, forward_batch):
                return False
            backend = self.model_runner.attn_backend
            # HybridAttnBackend (deft decode, another backend's prefill) keeps the decode backend here.
            hook = getattr(getattr(backend, "decode_backend", backend), HOOK, None)
            if hook is None:
                return True
            # replay_prepare's padding for a batch-size key (DP attention's token-count key is refused
            # by sglang_deft.config_checks; the backend checks the size again when the replay comes).
            padded = self.capture_bs[bisect.bisect_left(self.capture_bs, forward_batch.batch_size)]
            return hook(forward_batch, padded)
        return can_run

    wrap_once(CudaGraphRunner, "can_run", wrap)
