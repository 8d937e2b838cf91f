"""Planning a tree decode step: KV-guided groups cut into cost-balanced chunks, and merge lists.

The plan is a pure function of the tree's shape and the head configuration. It is built once per
decode step on the host (numpy; the KV slot ids themselves never leave the device) and reused by
every layer.

Groups. A group is one node's KV segment plus every query whose path contains the node. Queries
are ordered by the tree's preorder (``qperm``), which makes every group's queries one contiguous
range of ``qperm``: a node's users are exactly the queries ending in its subtree.

Tiles. Stage 1 packs a group's queries x the GQA heads of one KV head as the rows of a tensor-core
tile. Groups with at most ``SMALL_ROWS`` rows (a private tail: one query) use the small tile;
bigger groups use the large tile and, past ``large_rows`` rows, are split into several query tiles.
Each query tile reads the group's KV again: the cost is that KV's bytes once more per extra tile.
Tiles of one chunk are launched next to each other so the repeat reads mostly hit L2.

Chunks. Each (group, query tile) segment is cut into chunks of near-equal cost, from the model
    cost(chunk) = tokens * (KV_BYTES + padded_rows * 4 * head_dim / FLOP_PER_BYTE) + fixed(rows)
in "bytes of HBM traffic" units: KV_BYTES is the chunk's K and V for one head; the math term
converts the tile's tensor-core FLOPs (padded rows count: the hardware computes them) at the rate
Triton's tl.dot sustains relative to HBM bandwidth on Hopper; ``fixed`` is the Q tile load, the
partial result written and read back by stage 2, and a per-program start-up latency. Chunks are
sized so that the whole step makes about ``PROGRAMS_PER_SM`` programs per SM (of all KV heads), and
never shorter than ``MIN_CHUNK_TOKENS``.

Merge. Every (chunk, query) produces one partial (output normalised by its own softmax sum, plus
its log-sum-exp in base 2). Query b's partials are listed in ``merge_slots[merge_indptr[b]:...]``
in a fixed order, which stage 2 folds sequentially: no atomics, bitwise deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .kv_tree import KVTree

SMALL_ROWS = 16  # rows of the small tile: tl.dot needs M >= 16
LARGE_ROWS = 64  # default rows of the large tile
FLOP_PER_BYTE = 100.0  # tl.dot FLOP rate / HBM bytes rate Triton reaches on H100/H200 (bf16)
PROGRAM_LATENCY_BYTES = 16 * 1024  # a program's start-up cost, in bytes the SM could have moved
PROGRAMS_PER_SM = 2  # H200 sweep over 1/2/4: 2 best on the long shared prefixes
MIN_CHUNK_TOKENS = 128
ITEM_FIELDS = 5  # kv_start, kv_len, q_start, q_count, slot


@dataclass(frozen=True)
class TreeDecodePlan:
    """Everything stage 1 and stage 2 need, on the device, reused by every layer of a step."""

    meta: torch.Tensor  # [...] int32, device: one packed buffer the index fields below are views of
    kv_indices: torch.Tensor  # [T] int32, device: the tree's KV slots (node after node)
    qperm: torch.Tensor  # [B] int32, device: queries in tree preorder; groups are ranges of it
    items: torch.Tensor  # [I_cap, 5] int32, device: (kv_start, kv_len, q_start, q_count, slot);
    #                      large-tile items first, then small-tile items
    counts: torch.Tensor  # [3] int32, device: (large items, small items, queries) in this step
    merge_indptr: torch.Tensor  # [B_cap + 1] int32, device: query b's partials are
    merge_slots: torch.Tensor  # [M_cap] int32, device:   merge_slots[merge_indptr[b]:merge_indptr[b+1]]
    partial_out: torch.Tensor  # [P_cap, Hq, D] float32, device: per (chunk, query) normalised output
    partial_lse: torch.Tensor  # [P_cap, Hq] float32, device: per (chunk, query) log2-sum-exp
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    large_rows: int  # rows of the large tile (a power of two >= 16)
    grid_items: int  # programs per KV head stage 1 is launched with (>= counts[0] + counts[1])
    grid_queries: int  # queries stage 2 is launched for (>= counts[2])
    num_queries: int  # B of this step (host copy of counts[2], for shape checks)

    @property
    def group_size(self) -> int:
        return self.num_qo_heads // self.num_kv_heads


@dataclass(frozen=True)
class PlanCapacity:
    """Fixed sizes for plans that must keep their buffers across steps (CUDA-graph replay)."""

    max_queries: int
    max_kv_tokens: int
    max_items: int
    max_partials: int
    max_merge: int


def _preorder(parent: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Preorder position and subtree size of every node; needs parent[i] < i."""
    n = len(parent)
    size = [1] * n
    for i in range(n - 1, -1, -1):
        p = parent[i]
        if p >= 0:
            size[p] += size[i]
    pre = [0] * n
    next_free = [0] * n  # next preorder slot for a node's following child
    roots_next = 0
    for i in range(n):
        p = parent[i]
        if p < 0:
            pre[i] = roots_next
            roots_next += size[i]
        else:
            pre[i] = next_free[p]
            next_free[p] += size[i]
        next_free[i] = pre[i] + 1
    return np.asarray(pre, dtype=np.int64), np.asarray(size, dtype=np.int64)


def _host_int32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.int32).numpy()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # CPU / interpreter: only the shape of the plan matters


def build_schedule(node_indptr: np.ndarray, node_parent: np.ndarray, query_node: np.ndarray, *,
                   group_size: int, head_dim: int, kv_elem_bytes: int, num_kv_heads: int, num_sms: int,
                   large_rows: int = LARGE_ROWS, programs_per_sm: int = PROGRAMS_PER_SM,
                   max_items: int | None = None):
    """The host half of planning: returns (qperm, items [I,5], num_large, merge_indptr, merge_slots,
    num_partials) as numpy int arrays. Pure; exposed for the planner-invariant tests."""
    B = len(query_node)
    pre, size = _preorder(node_parent.tolist())
    qpre = pre[query_node] if B else np.zeros(0, np.int64)
    qperm = np.argsort(qpre, kind="stable")
    sorted_pre = qpre[qperm]
    # Users of node i: queries whose node's preorder lies in [pre[i], pre[i] + size[i]).
    q_lo = np.searchsorted(sorted_pre, pre, side="left")
    q_hi = np.searchsorted(sorted_pre, pre + size, side="left")
    seg_len = node_indptr[1:] - node_indptr[:-1]
    groups = np.nonzero((q_hi > q_lo) & (seg_len > 0))[0]

    # Query tiles of every group (vectorised: this runs every decode step).
    g_lo, g_n = q_lo[groups], q_hi[groups] - q_lo[groups]
    small_q = SMALL_ROWS // group_size  # 0 when one query's heads overflow the small tile
    large_q = max(large_rows // group_size, 1)
    g_small = g_n <= small_q
    g_tiles = np.where(g_small, 1, -(-g_n // large_q))
    t_group = np.repeat(np.arange(len(groups)), g_tiles)
    t_k = np.arange(len(t_group)) - np.repeat(np.cumsum(g_tiles) - g_tiles, g_tiles)
    t_node = groups[t_group]
    t_small = g_small[t_group]
    t_qs = g_lo[t_group] + t_k * large_q
    t_qc = np.where(t_small, g_n[t_group], np.minimum(large_q, g_n[t_group] - t_k * large_q))
    t_len = seg_len[t_node]
    if max_items is not None and len(t_node) > max_items:
        raise ValueError(f"the tree needs {len(t_node)} work items, more than the plan capacity {max_items}")

    rows = np.where(t_small, SMALL_ROWS, large_rows)
    t_cost = t_len * (2 * head_dim * kv_elem_bytes + rows * 4 * head_dim / FLOP_PER_BYTE)
    t_fixed = PROGRAM_LATENCY_BYTES + rows * head_dim * kv_elem_bytes + 2 * t_qc * group_size * head_dim * 4
    target_items = max(1, (programs_per_sm * num_sms) // max(num_kv_heads, 1))
    target = max(float(t_cost.sum() + t_fixed.sum()) / target_items, 1.0)
    max_chunks = np.maximum(1, t_len // MIN_CHUNK_TOKENS)
    nchunks = np.minimum(np.maximum(1, np.ceil(t_cost / target).astype(np.int64)), max_chunks)
    # Coarsen the chunks until the plan fits a fixed capacity.
    while max_items is not None and nchunks.sum() > max_items:
        target *= 1.5
        nchunks = np.minimum(np.maximum(1, np.ceil(t_cost / target).astype(np.int64)), max_chunks)

    i_tile = np.repeat(np.arange(len(t_node)), nchunks)
    i_k = np.arange(len(i_tile)) - np.repeat(np.cumsum(nchunks) - nchunks, nchunks)
    i_n, i_len = nchunks[i_tile], t_len[i_tile]
    i_base = node_indptr[t_node[i_tile]]
    i_start = i_base + (i_len * i_k) // i_n
    i_kvlen = i_base + (i_len * (i_k + 1)) // i_n - i_start
    i_qs, i_qc, i_small = t_qs[i_tile], t_qc[i_tile], t_small[i_tile]
    # Large items first, longest first (a tail of short programs balances the SMs), query tiles of
    # one chunk adjacent (they read the same KV, so the repeat reads hit L2); then small items.
    order = np.lexsort((i_qs, i_start, -i_kvlen, i_small))
    num_large = int((~i_small).sum())
    items = np.stack([i_start, i_kvlen, i_qs, i_qc, np.zeros_like(i_qs)], axis=1)[order]
    items[:, 4] = np.cumsum(items[:, 3]) - items[:, 3]
    slot = int(items[:, 3].sum())

    # Merge lists: query at qperm position p gets slot(item) + (p - q_start) from every item
    # covering p, in item order (fixed, so stage 2 is deterministic).
    if len(items):
        counts_per_item = items[:, 3]
        item_of_slot = np.repeat(np.arange(len(items)), counts_per_item)
        pos_of_slot = items[item_of_slot, 2] + (np.arange(slot) - items[item_of_slot, 4])
        query_of_slot = qperm[pos_of_slot]
        order = np.argsort(query_of_slot, kind="stable")
        merge_slots = order
        merge_indptr = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(np.bincount(query_of_slot, minlength=B), out=merge_indptr[1:])
    else:
        merge_slots = np.zeros(0, np.int64)
        merge_indptr = np.zeros(B + 1, dtype=np.int64)
    return qperm, items, num_large, merge_indptr, merge_slots, slot


def plan_tree_decode(tree: KVTree, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                     device: torch.device | str | None = None, *, kv_dtype: torch.dtype = torch.bfloat16,
                     large_rows: int = LARGE_ROWS, programs_per_sm: int = PROGRAMS_PER_SM,
                     capacity: PlanCapacity | None = None, reuse: TreeDecodePlan | None = None) -> TreeDecodePlan:
    """Plan one decode step over ``tree``.

    ``device`` defaults to the device of ``tree.kv_indices``. Node and query metadata are read on
    the host (pass them as CPU tensors to avoid a device sync); ``kv_indices`` is used where it is.
    With ``capacity``, buffers have fixed sizes and launch grids cover the capacity (programs past
    the device-side counts exit at once), so a CUDA graph captured with the plan replays with any
    later plan written into the same buffers via ``reuse=plan``.
    """
    if num_qo_heads % num_kv_heads:
        raise ValueError(f"num_qo_heads={num_qo_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if large_rows < SMALL_ROWS or large_rows & (large_rows - 1):
        raise ValueError(f"large_rows must be a power of two >= {SMALL_ROWS}, got {large_rows}")
    if num_qo_heads // num_kv_heads > large_rows:
        raise ValueError(f"{num_qo_heads // num_kv_heads} query heads per KV head do not fit a tile of "
                         f"{large_rows} rows")
    device = torch.device(device) if device is not None else tree.kv_indices.device
    if reuse is not None:
        capacity = capacity or _capacity_of(reuse)
    group = num_qo_heads // num_kv_heads
    node_indptr = _host_int32(tree.node_indptr).astype(np.int64)
    node_parent = _host_int32(tree.node_parent).astype(np.int64)
    query_node = _host_int32(tree.query_node).astype(np.int64)
    B = len(query_node)
    qperm, items, num_large, merge_indptr, merge_slots, num_partials = build_schedule(
        node_indptr, node_parent, query_node, group_size=group, head_dim=head_dim,
        kv_elem_bytes=torch.empty(0, dtype=kv_dtype).element_size(), num_kv_heads=num_kv_heads,
        num_sms=_num_sms(device), large_rows=large_rows, programs_per_sm=programs_per_sm,
        max_items=capacity.max_items if capacity else None)
    T = tree.kv_indices.numel()
    if capacity is not None:
        _check_capacity(capacity, B, T, len(merge_slots), num_partials)
        cap_b, cap_t, cap_i = capacity.max_queries, capacity.max_kv_tokens, capacity.max_items
        cap_p, cap_m = capacity.max_partials, capacity.max_merge
    else:
        cap_b, cap_t, cap_i = B, T, len(items)
        cap_p, cap_m = num_partials, len(merge_slots)

    # Field offsets inside the packed metadata buffer (fixed by the capacity, so views stay put
    # across steps when a plan is written into an earlier plan's buffers).
    o_items = cap_b
    o_counts = o_items + cap_i * ITEM_FIELDS
    o_indptr = o_counts + 3
    o_slots = o_indptr + cap_b + 1
    fields = [(0, qperm), (o_items, items.reshape(-1)), (o_counts, [num_large, len(items) - num_large, B]),
              (o_indptr, merge_indptr), (o_slots, merge_slots)]
    if capacity is None:
        # Exact sizes: the fields are back to back, so one host-to-device copy moves them all.
        host = np.concatenate([np.asarray(f, dtype=np.int32) for _, f in fields])
        meta = torch.from_numpy(host).to(device, non_blocking=True)
        kv_indices = tree.kv_indices.to(device=device, dtype=torch.int32)
        partial_out = torch.empty(max(cap_p, 1), num_qo_heads, head_dim, dtype=torch.float32, device=device)
        partial_lse = torch.empty(max(cap_p, 1), num_qo_heads, dtype=torch.float32, device=device)
    else:
        if reuse is None:
            meta = torch.zeros(o_slots + cap_m, dtype=torch.int32, device=device)
            kv_indices = torch.empty(cap_t, dtype=torch.int32, device=device)
            partial_out = torch.empty(cap_p, num_qo_heads, head_dim, dtype=torch.float32, device=device)
            partial_lse = torch.empty(cap_p, num_qo_heads, dtype=torch.float32, device=device)
        else:
            if (reuse.num_qo_heads, reuse.num_kv_heads, reuse.head_dim) != (num_qo_heads, num_kv_heads, head_dim):
                raise ValueError("reuse= plan was made for another head configuration")
            meta, kv_indices = reuse.meta, reuse.kv_indices
            partial_out, partial_lse = reuse.partial_out, reuse.partial_lse
        kv_indices[:T].copy_(tree.kv_indices, non_blocking=True)
        # Queries past B must merge nothing: their indptr entries repeat the last one.
        tail = np.full(cap_b - B, merge_indptr[-1], dtype=np.int64)
        fields[3] = (o_indptr, np.concatenate([merge_indptr, tail]))
        for off, f in fields:
            f = torch.from_numpy(np.asarray(f, dtype=np.int32))
            meta[off:off + f.numel()].copy_(f, non_blocking=True)
    return TreeDecodePlan(
        meta=meta, kv_indices=kv_indices, qperm=meta[:cap_b], items=meta[o_items:o_counts].view(cap_i, ITEM_FIELDS),
        counts=meta[o_counts:o_indptr], merge_indptr=meta[o_indptr:o_slots], merge_slots=meta[o_slots:],
        partial_out=partial_out, partial_lse=partial_lse, num_qo_heads=num_qo_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, large_rows=large_rows,
        grid_items=cap_i if capacity is not None else len(items),
        grid_queries=cap_b, num_queries=B)


def _capacity_of(plan: TreeDecodePlan) -> PlanCapacity:
    return PlanCapacity(max_queries=plan.qperm.numel(), max_kv_tokens=plan.kv_indices.numel(),
                        max_items=plan.items.shape[0], max_partials=plan.partial_out.shape[0],
                        max_merge=plan.merge_slots.numel())


def _check_capacity(cap: PlanCapacity, B: int, T: int, M: int, P: int) -> None:
    for what, need, have in (("queries", B, cap.max_queries), ("KV tokens", T, cap.max_kv_tokens),
                             ("merge entries", M, cap.max_merge), ("partials", P, cap.max_partials)):
        if need > have:
            raise ValueError(f"the tree needs {need} {what}, more than the plan capacity {have}")
