"""Planner invariants on random forests: exact coverage, merge lists, balanced chunks."""
from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from kernel_trees import make_tree, random_forest
from sglang_deft.kernels import plan_tree_decode
from sglang_deft.kernels.plan import MIN_CHUNK_TOKENS, SMALL_ROWS, build_schedule
from sglang_deft.kernels.reference import path_nodes


def schedule(tree, group=4, head_dim=128, num_sms=132, hkv=8, large_rows=64):
    return build_schedule(tree.node_indptr.numpy().astype(np.int64), tree.node_parent.numpy().astype(np.int64),
                          tree.query_node.numpy().astype(np.int64), group_size=group, head_dim=head_dim,
                          kv_elem_bytes=2, num_kv_heads=hkv, num_sms=num_sms, large_rows=large_rows)


def covered_pairs(tree, sched):
    """(query, kv position) -> how many partials cover it, read back from the plan's arrays."""
    qperm, items, num_large, merge_indptr, merge_slots, num_partials = sched
    slot_item = np.repeat(np.arange(len(items)), items[:, 3])
    cover = Counter()
    for b in range(tree.num_queries):
        for slot in merge_slots[merge_indptr[b]:merge_indptr[b + 1]]:
            ks, kl, qs, qc, base = items[slot_item[slot]]
            # The slot's row in its item must hold this very query.
            assert qperm[qs + slot - base] == b
            for pos in range(ks, ks + kl):
                cover[(b, pos)] += 1
    return cover


@pytest.mark.parametrize("seed", range(12))
def test_every_query_token_pair_covered_exactly_once(seed):
    tree = random_forest(num_nodes=5 + 7 * seed, num_queries=1 + 5 * seed, max_len=300, seed=seed,
                         roots=1 + seed % 3)
    sched = schedule(tree, group=[1, 4, 8][seed % 3], large_rows=[16, 64, 128][seed % 3])
    indptr = tree.node_indptr.tolist()
    expected = {(b, pos) for b, path in enumerate(path_nodes(tree)) for n in path
                for pos in range(indptr[n], indptr[n + 1])}
    cover = covered_pairs(tree, sched)
    assert set(cover) == expected
    assert set(cover.values()) <= {1}
    qperm, items, num_large, *_ = sched
    assert sorted(qperm.tolist()) == list(range(tree.num_queries))
    assert (items[:, 1] > 0).all()  # no empty chunk is ever launched
    # Small items fit the small tile; every tile's rows fit its tile.
    assert (items[num_large:, 3] * [1, 4, 8][seed % 3] <= SMALL_ROWS).all()


def test_chunks_balance_a_long_root_against_short_tails():
    # prefix 16k shared by 64 queries with private tails of 256: the root must be cut into many
    # chunks whose cost is near the tails' cost-per-program target, not left as one giant program.
    tree = make_tree([-1] + [0] * 64, [16000] + [256] * 64, list(range(1, 65)), pool=40000)
    qperm, items, num_large, *_ = schedule(tree)
    large = items[:num_large]
    assert len(large) >= 24  # 4 query tiles x 7 chunks at 132 SMs, 8 KV heads
    assert large[:, 1].max() <= 2 * large[:, 1].min() + MIN_CHUNK_TOKENS
    # Query tiles of one chunk sit next to each other (shared KV stays in L2).
    starts = large[:, 0].tolist()
    for s in set(starts):
        idx = [i for i, x in enumerate(starts) if x == s]
        assert idx == list(range(idx[0], idx[0] + len(idx)))


def test_no_split_below_min_chunk():
    tree = make_tree([-1, 0, 0], [MIN_CHUNK_TOKENS - 1, 5, 5], [1, 2])
    items = schedule(tree, num_sms=1000)[1]
    assert (items[:, 1] <= MIN_CHUNK_TOKENS).all() and len(items) == 3


def test_plan_cpu_time_256_queries_300_nodes():
    """Issue target: <= 300 us of host time (measured here on the CI CPU; reported, loosely bounded)."""
    parent = [-1] + [0] * 43 + [1 + i % 43 for i in range(256)]
    tree = make_tree(parent, [1000] + [64] * 43 + [128] * 256, list(range(44, 300)))
    for _ in range(3):
        plan_tree_decode(tree, 32, 8, 128, device="cpu")
    times = []
    for _ in range(30):
        t = time.perf_counter()
        plan_tree_decode(tree, 32, 8, 128, device="cpu")
        times.append(time.perf_counter() - t)
    median_us = sorted(times)[len(times) // 2] * 1e6
    print(f"plan_tree_decode 256 queries / 300 nodes: median {median_us:.0f} us")
    # A shared 2-core CI box is noisy: bound at 2.7x the target so a regression to per-item Python
    # loops (measured ~1000 us here) still fails.
    assert median_us < 800
