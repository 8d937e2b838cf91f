"""Attention over a KV tree in plain PyTorch.

``tree_decode_reference`` is the grouped algorithm on the host-free PyTorch path: each node's KV is
gathered once for all the queries under it, each (node, query) pair yields a partial output and its
log-sum-exp, and each query's partials along its path are merged exactly. SGLang's decode backend
uses it on CPU, with a ``ReferencePlan`` made once per step (``plan_reference``) for every layer.
``attention_reference`` is the per-query fp32 textbook version tests compare against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_tree import KVTree


FP32_MAX = torch.finfo(torch.float32).max


def cap_refusal(logit_cap: float) -> ValueError:
    """The error for a cap that is not finite in float32 (NaN included): NaN would read as no cap, and a cap past
    fp32's range gives inf x 0 = NaN scores, in the kernels (which take it in fp32) and here alike."""
    return ValueError(f"logit_cap {logit_cap}: a cap finite in float32 (at most {FP32_MAX:.4g}), or 0 for none")


def _soft_cap(scores: torch.Tensor, logit_cap: float) -> torch.Tensor:
    # SGLang's definition: logit_cap * tanh(scores / logit_cap), applied after sm_scale.
    if not logit_cap <= FP32_MAX:
        raise cap_refusal(logit_cap)
    return logit_cap * torch.tanh(scores / logit_cap) if logit_cap > 0 else scores


def _check_shapes(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> None:
    """q [B, Hq, D], K and V [slots, Hkv, D] with Hq a multiple of Hkv. einsum broadcasts a size-1 head or head_dim:
    a one-head V beside a two-head K was read as V's head 0 twice, a head_dim-1 V gave every output column alike.
    K and V hold the same slots (one slot id indexes both, as tree_decode requires): slot ids are checked against K's
    count only, so a shorter V ended in an IndexError with no word of why."""
    if q.dim() != 3 or k_buffer.dim() != 3 or k_buffer.shape != v_buffer.shape or \
            k_buffer.shape[2] != q.shape[2] or q.shape[1] % k_buffer.shape[1]:
        raise ValueError(f"q {tuple(q.shape)}, k/v buffers {tuple(k_buffer.shape)}/{tuple(v_buffer.shape)}: q needs "
                         "[queries, heads, head_dim], K and V both [slots, kv heads, head_dim] with q's head_dim, and "
                         "the query heads a multiple of the KV heads")


def path_nodes(tree: KVTree) -> list[list[int]]:
    """Root-to-node path (node ids, root first) of every query, on the host. The tree is validated
    first (``KVTree.validate``): a parent cycle would never end, a negative query node would index
    from the end, and node bounds past ``kv_indices`` would read fewer tokens than the path holds."""
    tree.validate()
    parent = tree.node_parent.tolist()
    paths = []
    for node in tree.query_node.tolist():
        path = []
        while node != -1:
            path.append(node)
            node = parent[node]
        paths.append(path[::-1])
    return paths


def _slot_range(kv_indices: torch.Tensor) -> tuple[int, int] | None:
    """(lowest, highest) slot id of ``kv_indices``; None when empty."""
    return (int(kv_indices.min()), int(kv_indices.max())) if kv_indices.numel() else None


def _check_slot_range(slot_range: tuple[int, int] | None, num_slots: int) -> None:
    """Every slot must index one of the buffers' ``num_slots``: torch would take a negative id from the end of the
    buffer without a word. Names the lowest slot if it is negative, else the highest."""
    if slot_range is not None and (slot_range[0] < 0 or slot_range[1] >= num_slots):
        bad = slot_range[0] if slot_range[0] < 0 else slot_range[1]
        raise ValueError(f"KVTree.kv_indices holds slot {bad}, outside the KV buffers' {num_slots} slots")


def _slots(tree: KVTree, num_slots: int, device: torch.device) -> torch.Tensor:
    """``tree.kv_indices`` as int64 on ``device``, each checked to index one of the buffers' ``num_slots`` slots."""
    kv_indices = tree.kv_indices.to(device).long()
    _check_slot_range(_slot_range(kv_indices), num_slots)
    return kv_indices


def attention_reference(q, k_buffer, v_buffer, tree: KVTree, sm_scale: float, logit_cap: float = 0.0,
                        k_scale: float = 1.0, v_scale: float = 1.0):
    """Per query: gather its path's KV, softmax in fp32. Returns fp32 [B, Hq, D]. K and V stand for their
    values times ``k_scale`` / ``v_scale`` (an fp8 KV cache's scales, as in ``tree_decode``)."""
    _check_shapes(q, k_buffer, v_buffer)
    B, Hq, D = q.shape
    if B < tree.num_queries:
        raise ValueError(f"q has {B} rows for a tree of {tree.num_queries} queries")
    Hkv = k_buffer.shape[1]
    group = Hq // Hkv
    indptr = tree.node_indptr.tolist()
    kv_indices = _slots(tree, k_buffer.shape[0], q.device)
    out = torch.zeros(B, Hq, D, dtype=torch.float32, device=q.device)
    for b, path in enumerate(path_nodes(tree)):
        slots = torch.cat([kv_indices[indptr[n]:indptr[n + 1]] for n in path]) if path else kv_indices[:0]
        if slots.numel() == 0:
            continue  # a query with no KV gets zeros, like the kernels
        k = (k_buffer[slots].float() * k_scale).repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = (v_buffer[slots].float() * v_scale).repeat_interleave(group, dim=1)
        scores = _soft_cap(torch.einsum("hd,lhd->hl", q[b].float(), k) * sm_scale, logit_cap)
        out[b] = torch.einsum("hl,lhd->hd", torch.softmax(scores, dim=-1), v)
    return out


@dataclass(frozen=True)
class ReferencePlan:
    """``tree_decode_reference``'s work for one step, the same for every layer: the tree validated, and per node with
    KV its slots (int64, on the KV device) and the queries below it (an index on that device), and the range of the
    slots, checked against each layer's buffers without reading them again."""
    num_queries: int
    groups: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (slots [L], queries [n]) per node with KV
    slot_range: tuple[int, int] | None  # (lowest, highest) slot of the tree; None without KV


def plan_reference(tree: KVTree, device: torch.device | str) -> ReferencePlan:
    """The step's ``ReferencePlan`` (reads ``kv_indices`` on the host once: it synchronises on a GPU)."""
    indptr = tree.node_indptr.tolist()
    kv_indices = tree.kv_indices.to(device).long()
    slot_range = _slot_range(kv_indices)
    users: dict[int, list[int]] = {}
    for b, path in enumerate(path_nodes(tree)):
        for node in path:
            users.setdefault(node, []).append(b)
    groups = tuple((kv_indices[indptr[n]:indptr[n + 1]], torch.tensor(queries, device=device))
                   for n, queries in users.items() if indptr[n + 1] > indptr[n])
    return ReferencePlan(tree.num_queries, groups, slot_range)


def tree_decode_reference(q, k_buffer, v_buffer, plan: KVTree | ReferencePlan, sm_scale: float,
                          logit_cap: float = 0.0, out: torch.Tensor | None = None, k_scale: float = 1.0,
                          v_scale: float = 1.0):
    """Grouped KV-tree attention: every node's KV is read once for all queries below it. ``plan``: the tree, or
    its ``plan_reference`` (made once for all of a step's layers).

    Computes in fp32 and writes ``out``: q's shape and device, in q's dtype (allocated so when None) or float32,
    which holds the fp32 result unrounded (the kernel check compares a kernel's output with it). Queries with an
    empty path get zeros. K and V stand for their values times ``k_scale`` / ``v_scale`` (an fp8 KV cache).
    """
    _check_shapes(q, k_buffer, v_buffer)
    # (copy_ would broadcast one query's rows over a larger out, and round to another dtype without a word)
    if out is not None and (out.shape != q.shape or out.dtype not in (q.dtype, torch.float32)
                            or out.device != q.device):
        raise ValueError(f"out must be like q, {tuple(q.shape)} {q.dtype} (or float32) on {q.device}; got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    B, Hq, D = q.shape
    device = q.device
    if isinstance(plan, KVTree):
        plan = plan_reference(plan, device)
    if B < plan.num_queries:  # (more rows are a padded batch's: they get zeros, as in an out tree_decode allocates)
        raise ValueError(f"q has {B} rows for a plan of {plan.num_queries} queries")
    _check_slot_range(plan.slot_range, k_buffer.shape[0])

    m = torch.full((B, Hq), float("-inf"), dtype=torch.float32, device=device)  # running max
    s = torch.zeros(B, Hq, dtype=torch.float32, device=device)  # running sum of exp
    acc = torch.zeros(B, Hq, D, dtype=torch.float32, device=device)
    for slots, qi, scores in _group_scores(q, k_buffer, plan, sm_scale, logit_cap, k_scale):
        n = qi.numel()
        v = v_buffer[slots].float() * v_scale
        node_max = scores.amax(dim=-1)  # [n, Hkv, G]
        p = torch.exp(scores - node_max[..., None])
        node_sum = p.sum(-1).view(n, Hq)
        node_acc = torch.einsum("nhgl,lhd->nhgd", p, v).reshape(n, Hq, D)
        node_max = node_max.view(n, Hq)
        # Online-softmax merge of this node's partial into each query's running state.
        new_m = torch.maximum(m[qi], node_max)
        a_old = torch.exp(m[qi] - new_m)
        a_new = torch.exp(node_max - new_m)
        s[qi] = s[qi] * a_old + node_sum * a_new
        acc[qi] = acc[qi] * a_old[..., None] + node_acc * a_new[..., None]
        m[qi] = new_m
    # Zeros only where a query had no KV (s == 0): a NaN score (NaN in q or K) must stay NaN, as in the kernels.
    result = torch.where(s[..., None] == 0, torch.zeros_like(acc), acc / s[..., None])
    if out is None:
        out = torch.empty_like(q)
    out.copy_(result.to(out.dtype))
    return out


def _group_scores(q, k_buffer, plan: ReferencePlan, sm_scale: float, logit_cap: float, k_scale: float):
    """Per node with KV: its slots, the queries below it and their fp32 scores [n, Hkv, group, L] (capped), each
    node's K loaded once for all of them."""
    Hkv, D = k_buffer.shape[1], q.shape[2]
    qf = q.float()
    for slots, qi in plan.groups:
        k = k_buffer[slots].float() * k_scale  # [L, Hkv, D]
        qg = qf[qi].view(qi.numel(), Hkv, -1, D)
        yield slots, qi, _soft_cap(torch.einsum("nhgd,lhd->nhgl", qg, k) * sm_scale, logit_cap)


def max_abs_score(q, k_buffer, plan: KVTree | ReferencePlan, sm_scale: float, logit_cap: float = 0.0,
                  k_scale: float = 1.0) -> torch.Tensor:
    """The largest |score| (scaled, capped) any query gives a token of its path, a 0-dim fp32 tensor on q's device (0
    without KV). Rounding a score s in float32 moves its softmax weight by about |s| roundoffs, so a float32 kernel's
    (and this reference's) error grows with it: the kernel check's float32 bound does."""
    _check_shapes(q, k_buffer, k_buffer)
    if isinstance(plan, KVTree):
        plan = plan_reference(plan, q.device)
    _check_slot_range(plan.slot_range, k_buffer.shape[0])
    best = torch.zeros((), dtype=torch.float32, device=q.device)
    for _, _, scores in _group_scores(q, k_buffer, plan, sm_scale, logit_cap, k_scale):
        best = torch.maximum(best, scores.abs().amax())
    return best


def plan_kv_reads(plan) -> list[list[int]]:
    """Per query of a ``TreeDecodePlan``, the KV slots its partials cover, in merge order, read back
    from the plan's buffers (synchronises; for tests and checks). A correct plan gives each query
    exactly the slots of its path, once each."""
    num_large, num_small, num_queries = plan.counts.tolist()
    items = plan.items[:num_large + num_small].tolist()
    qperm, indptr = plan.qperm.tolist(), plan.merge_indptr.tolist()
    slots, kv = plan.merge_slots.tolist(), plan.kv_indices.tolist()
    owner = {}
    for i, (_, _, _, q_count, base) in enumerate(items):
        for p in range(base, base + q_count):
            owner[p] = i
    reads = []
    for b in range(num_queries):
        got = []
        for p in slots[indptr[b]:indptr[b + 1]]:
            kv_start, kv_len, q_start, _, base = items[owner[p]]
            if qperm[q_start + p - base] != b:
                raise AssertionError(f"partial {p} in query {b}'s merge list belongs to query "
                                     f"{qperm[q_start + p - base]}")
            got += kv[kv_start:kv_start + kv_len]
        reads.append(got)
    return reads
