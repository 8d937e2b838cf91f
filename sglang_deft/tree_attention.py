"""Which implementation computes decode attention over the KV tree: the one switch point.

The backend plans once per decode step (:func:`plan_step`) and runs every layer with that plan
(:func:`run_layer`). With the reference path the "plan" is the KV tree itself (node/query metadata
on the host, KV slots on the device), and each layer runs ``tree_decode_reference`` (grouped
PyTorch, fp32 math). With the Triton kernels it is a ``TreeDecodePlan``.
"""
from __future__ import annotations

import os

import torch

from sglang_deft.kernels import KVTree, plan_tree_decode, tree_decode, tree_decode_reference


def use_triton_kernels(device: torch.device) -> bool:
    """True where the Triton tree-decode kernels replace the PyTorch reference: on CUDA devices.

    ``SGLANG_DEFT_DECODE_IMPL=reference`` forces the reference on a GPU too (to compare the two
    paths in one setup); ``=triton`` forces the kernels (on CPU they need TRITON_INTERPRET=1).
    """
    impl = os.environ.get("SGLANG_DEFT_DECODE_IMPL", "auto")
    if impl not in ("auto", "reference", "triton"):
        raise ValueError(f"SGLANG_DEFT_DECODE_IMPL={impl!r}: expected auto, reference or triton")
    if impl == "auto":
        return device.type == "cuda"
    return impl == "triton"


def plan_step(tree: KVTree, num_qo_heads: int, num_kv_heads: int, head_dim: int, kv_dtype: torch.dtype,
              device: torch.device):
    """Everything a decode step's layers share. ``tree``: node/query metadata on the host."""
    if use_triton_kernels(device):
        return plan_tree_decode(tree, num_qo_heads, num_kv_heads, head_dim, device, kv_dtype=kv_dtype)
    return tree


def run_layer(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, plan, sm_scale: float,
              logit_cap: float, out: torch.Tensor) -> torch.Tensor:
    """q, out [B, Hq, D]; k/v_buffer [S, Hkv, D] (one layer's KV pool)."""
    if isinstance(plan, KVTree):
        return tree_decode_reference(q, k_buffer, v_buffer, plan, sm_scale, logit_cap, out=out)
    return tree_decode(q, k_buffer, v_buffer, plan, sm_scale, logit_cap, out=out)
