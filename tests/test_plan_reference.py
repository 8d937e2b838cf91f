"""The planner's host code against the implementation it replaced, bit for bit.

``build_schedule_reference`` below is ``build_schedule`` as it was before its host time was cut
(commit 478fb4e: a Python preorder walk, then numpy per tile and per item), with the one-wave
rounding of the chunk counts added since. It is the specification:
the faster ``build_schedule`` must return the very same arrays (values and dtypes), so plans, the
kernels' work and the merge order are unchanged.
"""
from __future__ import annotations

import numpy as np
import pytest

from kernel_trees import make_tree, named_trees, random_forest
from sglang_deft.kernels.plan import (FLOP_PER_BYTE, LARGE_ROWS, MIN_CHUNK_TOKENS, PROGRAM_LATENCY_BYTES,
                                      PROGRAMS_PER_SM, SMALL_ROWS, build_schedule)


def _preorder_reference(parent: list[int]) -> tuple[np.ndarray, np.ndarray]:
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


def build_schedule_reference(node_indptr: np.ndarray, node_parent: np.ndarray, query_node: np.ndarray, *,
                             group_size: int, head_dim: int, kv_elem_bytes: int, num_kv_heads: int, num_sms: int,
                             large_rows: int = LARGE_ROWS, programs_per_sm: int = PROGRAMS_PER_SM,
                             max_items: int | None = None):
    """Returns (qperm, items [I,5], num_large, merge_indptr, merge_slots, num_partials), as the
    planner did before its host time was cut, plus the one-wave rounding of the chunk counts added
    since (``chunk_counts``). The specification of build_schedule."""
    B = len(query_node)
    pre, size = _preorder_reference(node_parent.tolist())
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

    def chunk_counts(target):
        x = t_cost / target
        n = np.minimum(np.maximum(1, np.ceil(x).astype(np.int64)), max_chunks)
        # One wave: if rounding every tile up passes target_items but rounding down fits, the
        # largest remainders take the spare items (ties: the lower tile).
        base = np.minimum(np.maximum(1, np.floor(x).astype(np.int64)), max_chunks)
        if n.sum() > target_items and base.sum() <= target_items:
            # Per group (its tiles share a chunk count), while its tiles fit in the spare items.
            first = np.nonzero(np.r_[True, t_group[1:] != t_group[:-1]])[0] if len(t_group) else t_group
            frac = x - np.floor(x)
            spare = target_items - base.sum()
            for t in first[np.lexsort((first, -frac[first]))]:
                tiles = t_group == t_group[t]
                if base[t] < n[t] and tiles.sum() <= spare:
                    base[tiles] += 1
                    spare -= tiles.sum()
            n = base
        return n

    nchunks = chunk_counts(target)
    # Coarsen the chunks until the plan fits a fixed capacity.
    while max_items is not None and nchunks.sum() > max_items:
        target *= 1.5
        nchunks = chunk_counts(target)

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



def arrays(tree):
    return tuple(t.numpy().astype(np.int64) for t in (tree.node_indptr, tree.node_parent, tree.query_node))


def assert_same_schedule(got, want):
    assert len(got) == len(want) == 6
    names = ("qperm", "items", "num_large", "merge_indptr", "merge_slots", "num_partials")
    for name, a, b in zip(names, got, want):
        if isinstance(b, np.ndarray):
            assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, name
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            assert type(a) is type(b) and a == b, name


# (group_size, large_rows, num_sms, max_items): GQA 1..32, every large tile, few and many SMs, and
# capacities that force the chunks coarser (or are too small and must raise the same error).
CONFIGS = [(1, 16, 8, None), (4, 64, 132, None), (8, 128, 132, 40), (32, 64, 1000, None), (2, 32, 3, 25),
           (4, 64, 132, 60), (5, 64, 132, None), (6, 16, 66, 12)]


def check(tree, group, large_rows, num_sms, max_items, head_dim=128, kv_elem_bytes=2, num_kv_heads=8):
    kw = dict(group_size=group, head_dim=head_dim, kv_elem_bytes=kv_elem_bytes, num_kv_heads=num_kv_heads,
              num_sms=num_sms, large_rows=large_rows, max_items=max_items)
    try:
        want = build_schedule_reference(*arrays(tree), **kw)
    except ValueError as e:
        with pytest.raises(ValueError) as got:
            build_schedule(*arrays(tree), **kw)
        assert str(got.value) == str(e)
        return
    assert_same_schedule(build_schedule(*arrays(tree), **kw), want)


@pytest.mark.parametrize("seed", range(60))
def test_random_forests_match_the_reference(seed):
    # Deep and shallow forests, empty nodes (max_len 5 leaves many), nodes without users, long
    # segments cut into many chunks, no queries at all.
    tree = random_forest(num_nodes=1 + (7 * seed) % 80, num_queries=(11 * seed) % 70,
                         max_len=[5, 300, 3000][seed % 3], seed=seed, roots=1 + seed % 4)
    for cfg in CONFIGS:
        check(tree, *cfg)


@pytest.mark.parametrize("name", sorted(named_trees()))
def test_named_trees_match_the_reference(name):
    for cfg in CONFIGS:
        check(named_trees()[name], *cfg)


def test_builder_shaped_trees_match_the_reference():
    """Fork and nested shapes as the KV-tree builder makes them, at serving batch sizes."""
    B = 256
    fork = make_tree([-1] + [0] * B, [2000] + [1 + i % 50 for i in range(B)], list(range(1, B + 1)))
    nested = make_tree([-1] + [0] * 43 + [1 + i % 43 for i in range(B)], [1000] + [64] * 43 + [128] * B,
                       list(range(44, 44 + B)))
    chain = make_tree([-1] + list(range(299)), [3] * 300, [299, 299, 10, 150])
    for tree in (fork, nested, chain):
        for cfg in CONFIGS:
            check(tree, *cfg)
        check(tree, 4, 64, 132, None, head_dim=64, kv_elem_bytes=4, num_kv_heads=2)


@pytest.mark.parametrize("lengths", [[8192] * 4, [8192] * 8, [16384] * 32, [8192, 6000] * 3],
                         ids=["4x8k", "8x8k", "32x16k", "alternating"])
def test_one_wave_ties_go_to_the_lower_tile_as_in_the_reference(lengths):
    """Requests of equal length have equal chunk-count remainders: when only some of them fit in the
    spare items of the wave, the lower tiles take them (the specification's tie rule); the random
    forests almost never tie."""
    n = len(lengths)
    tree = make_tree([-1] * n, lengths, list(range(n)), pool=2 * sum(lengths))
    kw = dict(group_size=4, head_dim=128, kv_elem_bytes=2, num_kv_heads=8, num_sms=132, large_rows=64)
    got = build_schedule(*arrays(tree), **kw)
    assert_same_schedule(got, build_schedule_reference(*arrays(tree), **kw))
    if len(set(lengths)) == 1:  # equal requests: some took a spare item, the lower tiles first
        chunks = np.unique(got[1][:, 2], return_counts=True)[1]  # per request, in query (= tile) order
        assert chunks.max() > chunks.min() and list(chunks) == sorted(chunks, reverse=True)
