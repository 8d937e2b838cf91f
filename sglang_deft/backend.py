"""``DeftAttnBackend``: SGLang decode attention over the batch's KV tree.

Per decode batch (``init_forward_metadata``), the requests' radix-tree paths become a KV tree
(``sglang_deft.kv_tree_builder``): shared prefix nodes plus each request's private tail. Each layer
(``forward_decode``) writes the new token's K/V, then computes attention over the tree with
``sglang_deft.tree_attention`` (the reference PyTorch path, or the Triton kernels where enabled),
reading each shared KV segment once for every request below it.

deft computes decode attention only: the launcher and ``sglang_deft.Engine`` route prefill/extend
to SGLang's triton (GPU) or torch_native (CPU) backend through SGLang's HybridAttnBackend.
CUDA-graph capture is not implemented (the server requires ``--disable-cuda-graph`` on GPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.dp_attention import get_attention_tp_size

from sglang_deft.config_checks import check_model_runner
from sglang_deft.kv_tree_builder import build_decode_kv_tree
from sglang_deft.patches.forward_batch_reqs import ATTRIBUTE as REQS_ATTRIBUTE
from sglang_deft.sharing_metrics import SharingMeter
from sglang_deft.tree_attention import plan_step, run_layer

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner


@dataclass(frozen=True)
class DeftDecodeMetadata:
    """One decode step's attention plan, shared by every layer."""

    plan: Any  # KVTree (reference path: kv_indices [T] int32 on the KV device, node/query metadata
    #            int32 on the host) or TreeDecodePlan (Triton path: device tensors); see tree_attention
    num_queries: int  # B: requests (one query token each) in the batch
    attended_tokens: int  # sum over requests of seq_len
    unique_tokens: int  # KV tokens in the tree (each read once)


class DeftAttnBackend(AttentionBackend):
    def __init__(self, model_runner: ModelRunner):
        super().__init__()
        check_model_runner(model_runner)
        config = model_runner.model_config
        tp = get_attention_tp_size()
        self.num_qo_heads = config.num_attention_heads // tp
        self.num_kv_heads = config.get_num_kv_heads(tp)
        self.head_dim = config.head_dim
        self.kv_dtype = model_runner.kv_cache_dtype
        self.device = torch.device(model_runner.device)
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.sharing = SharingMeter(interval=model_runner.server_args.decode_log_interval)
        self.forward_metadata: DeftDecodeMetadata | None = None

    def init_forward_metadata(self, forward_batch: ForwardBatch):
        mode = forward_batch.forward_mode
        if mode.is_idle():
            self.forward_metadata = None
            return
        if not mode.is_decode():
            raise _extend_not_routed_away(mode)
        reqs = getattr(forward_batch, REQS_ATTRIBUTE, None)
        if reqs is None:
            raise RuntimeError(
                "deft: this decode ForwardBatch carries no requests (forward_batch.deft_reqs); it was not "
                "built by ForwardBatch.init_new with sglang_deft.patches.forward_batch_reqs applied. "
                "Start SGLang through sglang_deft.launch_server or sglang_deft.Engine."
            )
        if forward_batch.seq_lens_cpu is None:
            raise RuntimeError("deft: decode ForwardBatch without seq_lens_cpu; the KV tree is planned on the host")
        built = build_decode_kv_tree(
            reqs, self.req_to_token, forward_batch.req_pool_indices, forward_batch.seq_lens_cpu
        )
        plan = plan_step(
            built.planning_tree, self.num_qo_heads, self.num_kv_heads, self.head_dim, self.kv_dtype, self.device
        )
        self.forward_metadata = DeftDecodeMetadata(plan, len(reqs), built.attended_tokens, built.unique_tokens)
        self.sharing.record(built.attended_tokens, built.unique_tokens)

    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs,
    ):
        unsupported = {name for name, value in kwargs.items() if value is not None}
        if unsupported:
            # e.g. attention sinks: ignoring them would silently change the model's outputs.
            raise NotImplementedError(f"deft forward_decode does not support {sorted(unsupported)}")
        if save_kv_cache:
            forward_batch.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        meta = self.forward_metadata
        q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        if meta is None or q.shape[0] != meta.num_queries:
            raise RuntimeError(
                f"deft: decode metadata is for {meta.num_queries if meta else 0} requests but q has "
                f"{q.shape[0]} tokens (one query token per request)"
            )
        out = q.new_empty(q.shape[0], layer.tp_q_head_num, layer.v_head_dim)
        run_layer(
            q,
            forward_batch.token_to_kv_pool.get_key_buffer(layer.layer_id),
            forward_batch.token_to_kv_pool.get_value_buffer(layer.layer_id),
            meta.plan,
            layer.scaling,
            layer.logit_cap,
            out,
        )
        return out.view(-1, layer.tp_q_head_num * layer.v_head_dim)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        raise _extend_not_routed_away(forward_batch.forward_mode)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        raise NotImplementedError("deft has no CUDA-graph capture yet: start the server with --disable-cuda-graph")

    def get_cuda_graph_seq_len_fill_value(self):
        raise NotImplementedError("deft has no CUDA-graph capture yet: start the server with --disable-cuda-graph")


def _extend_not_routed_away(mode) -> RuntimeError:
    return RuntimeError(
        f"deft computes decode attention only, but got a {mode.name} batch. Start SGLang through "
        "sglang_deft.launch_server or sglang_deft.Engine (they route --attention-backend deft's "
        "prefill/extend to SGLang's triton or torch_native backend), or pass "
        "--attention-backend triton|torch_native --decode-attention-backend deft."
    )
