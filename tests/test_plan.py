"""Planner invariants on random forests: exact coverage, merge lists, balanced chunks."""
from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kernel_trees import make_tree, random_forest
from sglang_deft.kernels import KVTree, PlanCapacity, TreeDecodePlan, plan_tree_decode
from sglang_deft.kernels import plan as plan_module
from sglang_deft.kernels.plan import MAX_GRID_ITEMS, MIN_CHUNK_TOKENS, SMALL_ROWS, TreeDecodePlanner, build_schedule
from sglang_deft.kernels.reference import path_nodes
from sglang_deft.kernels.schedule import PlanCapacityError, Schedule


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
    # Small items fit the small tile, large items the large one.
    group, large_rows = [1, 4, 8][seed % 3], [16, 64, 128][seed % 3]
    assert (items[num_large:, 3] * group <= SMALL_ROWS).all()
    assert (items[:num_large, 3] * group <= large_rows).all()


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


@pytest.mark.parametrize("lengths,num_items", [
    ([8192] * 4, 66),  # 4 x 16.5 chunks: 17 each would be 68 items, two past one wave
    ([8192] * 8, 66),  # 8 x 8.25: 72
    ([16384] * 32, 66),  # 32 x 2.06: 96
    ([8192] * 3, 66),  # 3 x 22: exact, never rounded
    ([4096] * 4, 64),  # 16 each, capped by the minimum chunk: nothing to fit
])
def test_chunk_counts_fit_one_wave(lengths, num_items):
    """Rounding each request's chunk count up must not push a few programs into a second wave
    (132 SMs x 4 programs / 8 KV heads = 66 items) when rounding down fits: the largest remainders
    take the spare items instead."""
    n = len(lengths)
    tree = make_tree([-1] * n, lengths, list(range(n)), pool=2 * sum(lengths))
    items = schedule(tree)[1]
    assert len(items) == num_items
    per_request = np.unique(items[:, 2], return_counts=True)[1]  # q_start: the request's position
    assert per_request.max() - per_request.min() <= 1


def test_chunk_counts_fit_one_wave_keep_a_groups_tiles_alike():
    # 40 queries x GQA 4 share a 8k root: three query tiles, which must be cut alike (the items are
    # laid out chunk by chunk), beside two private 8k and 4k requests.
    tree = make_tree([-1, 0, -1, -1], [8192, 300, 8192, 4000], [1] * 40 + [2, 3], pool=60000)
    qperm, items, num_large, *_ = schedule(tree)
    assert len(items) == 66
    per_tile = Counter(int(q) for q in items[:num_large][items[:num_large, 1] > 300][:, 2])
    assert sorted(per_tile) == [0, 16, 32] and len(set(per_tile.values())) == 1


def test_no_split_below_min_chunk():
    tree = make_tree([-1, 0, 0], [MIN_CHUNK_TOKENS - 1, 5, 5], [1, 2])
    items = schedule(tree, num_sms=1000)[1]
    assert (items[:, 1] <= MIN_CHUNK_TOKENS).all() and len(items) == 3


def fork_300(step: int = 0):
    """256 queries on a 300-node tree (a root, 43 mid nodes, 256 private tails), the tails ``step``
    tokens longer: one decode step after another."""
    parent = [-1] + [0] * 43 + [1 + i % 43 for i in range(256)]
    return make_tree(parent, [1000] + [64] * 43 + [128 + step] * 256, list(range(44, 300)), pool=80000)


def test_plan_cpu_time_256_queries_300_nodes():
    """Issue 3's target (<= 300 us) is measured on the GPU host (``gpu_session.sh step-host``). Here
    the whole plan is timed against the numpy schedule it replaced (the schedule alone, no tensors),
    in turns within one test: this 2-core box's speed drifts 3x between runs (50 to 310 us for the
    plan), so an absolute bound fails on a slow day while the ratio holds: 0.3-0.5 once, 0.54-0.60 since the
    plan copies host slot ids and checks their bound (session 53; 0.60 in a CI run at 6c80d0d, beside another
    worker's servers), so the bound is 0.75: the whole plan still well under the numpy schedule alone."""
    from test_plan_reference import build_schedule_reference

    tree = fork_300()
    arrays = [t.numpy().astype(np.int64) for t in (tree.node_indptr, tree.node_parent, tree.query_node)]
    sizes = dict(group_size=4, head_dim=128, kv_elem_bytes=2, num_kv_heads=8, num_sms=132)
    plan = lambda: plan_tree_decode(tree, 32, 8, 128, device="cpu")
    numpy_schedule = lambda: build_schedule_reference(*arrays, **sizes)
    # Alternate the two, call by call, so both see the same drift of the box's speed.
    times = {plan: [], numpy_schedule: []}
    for i in range(105):
        for fn in times:
            t = time.perf_counter()
            fn()
            if i >= 5:
                times[fn].append(time.perf_counter() - t)
    plan_us, numpy_us = (sorted(t)[len(t) // 2] * 1e6 for t in times.values())
    print(f"plan_tree_decode 256 queries / 300 nodes: {plan_us:.0f} us; numpy schedule alone {numpy_us:.0f} us")
    assert plan_us < 0.75 * numpy_us


# ------------------------------------------------------------------------ a planner over decode steps


def plan_arrays(plan: TreeDecodePlan, num_kv_tokens: int) -> dict:
    """The plan's contents that a step defines (capacity buffers hold stale entries past them)."""
    num_large, num_small, B = plan.counts.tolist()
    indptr = plan.merge_indptr[:B + 1]
    return dict(qperm=plan.qperm[:B], items=plan.items[:num_large + num_small], counts=plan.counts,
                merge_indptr=plan.merge_indptr, merge_slots=plan.merge_slots[:int(indptr[-1])],
                kv_indices=plan.kv_indices[:num_kv_tokens],
                grid=(plan.grid_items, plan.grid_queries, plan.num_queries),
                partials=(tuple(plan.partial_out.shape), tuple(plan.partial_lse.shape)))


def assert_same_plan(got: TreeDecodePlan, want: TreeDecodePlan, tree: KVTree) -> None:
    a, b = plan_arrays(got, tree.kv_indices.numel()), plan_arrays(want, tree.kv_indices.numel())
    for k in a:
        if isinstance(a[k], tuple):
            assert a[k] == b[k], k
        else:
            assert torch.equal(a[k], b[k]), k


def decode_steps(seed: int, steps: int = 12):
    """A random forest whose query nodes grow one token per step; now and then a query joins,
    leaves, or a node's KV empties: shapes that must be planned afresh."""
    rng = random.Random(seed)
    tree = random_forest(num_nodes=20 + seed, num_queries=12 + seed, max_len=400, seed=seed, roots=1 + seed % 3)
    parent, qnode = tree.node_parent.tolist(), tree.query_node.tolist()
    lengths = torch.diff(tree.node_indptr).tolist()
    for step in range(steps):
        yield make_tree(parent, lengths, qnode, seed=step)
        for n in set(qnode):
            lengths[n] += 1
        change = rng.random()
        if change < 0.15:
            qnode = qnode + [rng.randrange(len(parent))]
        elif change < 0.25 and len(qnode) > 1:
            qnode = qnode[1:]
        elif change < 0.3:
            lengths[rng.randrange(len(parent))] = 0


@pytest.mark.parametrize("seed", range(8))
def test_planner_plans_every_step_as_a_fresh_plan(seed, monkeypatch):
    """A planner reuses its host buffers from step to step (growing them for bigger trees): steps that
    keep the shape, steps that change the chunking (an H200's 132 SMs make the chunk counts follow the
    growing tails), and new shapes all plan as fresh plans do."""
    monkeypatch.setattr(plan_module, "sm_count", lambda device: [8, 132][seed % 2])
    group, large_rows = [(1, 16), (4, 64), (8, 128), (4, 32)][seed % 4]
    planner = TreeDecodePlanner(8 * group, 8, 64, kv_dtype=torch.float16, large_rows=large_rows)
    for tree in decode_steps(seed):
        # A Schedule of its own: plan_tree_decode's is the thread's, which would have planned the same steps before
        # and so carry whatever state the long-lived planner's does.
        fresh = TreeDecodePlanner(8 * group, 8, 64, kv_dtype=torch.float16, large_rows=large_rows, schedule=Schedule())
        assert_same_plan(planner.plan(tree, "cpu"), fresh.plan(tree, "cpu"), tree)


def test_planner_covers_every_pair_exactly_once():
    """The coverage invariant, read back from the planner's device tensors over a few steps."""
    planner = TreeDecodePlanner(16, 4, 32, large_rows=16)
    for tree in decode_steps(3):
        plan = planner.plan(tree, "cpu")
        num_large, num_small, _ = plan.counts.tolist()
        sched = (plan.qperm.numpy(), plan.items[:num_large + num_small].numpy(), num_large,
                 plan.merge_indptr.numpy(), plan.merge_slots.numpy(), None)
        indptr = tree.node_indptr.tolist()
        expected = {(b, pos) for b, path in enumerate(path_nodes(tree)) for n in path
                    for pos in range(indptr[n], indptr[n + 1])}
        cover = covered_pairs(tree, sched)
        assert set(cover) == expected and set(cover.values()) <= {1}


def test_items_ending_at_finds_one_item_per_position_or_none():
    """The step planner grows a tail in place through the one item whose KV range ends at the tail's
    end; a position where several items end (a node split into query tiles) or none has no such item."""
    tree = make_tree([-1] + [0] * 24, [150] + [3] * 24, list(range(1, 25)))  # 24 x GQA 4: root in 6 tiles
    planner = TreeDecodePlanner(8, 2, 32, large_rows=16)
    plan = planner.plan(tree, "cpu")
    items = plan.items[:int(plan.counts[0] + plan.counts[1])].numpy()
    tails = np.array([153, 156, 150 + 3 * 24])  # ends of three private tails
    found = planner.items_ending_at(tails)
    assert found is not None and (items[found, 0] + items[found, 1] == tails).all()
    assert planner.items_ending_at(np.array([150])) is None  # the root's last chunk: one item per tile
    assert planner.items_ending_at(np.array([151])) is None  # inside a tail


def test_items_starting_at_finds_every_tile_of_a_node_or_none():
    """A sliding-window plan moves a root's start through every item that starts there: one per query tile of a
    node split into tiles; None when some position starts no item."""
    tree = make_tree([-1] + [0] * 24, [150] + [3] * 24, list(range(1, 25)))  # 24 x GQA 4: root in 6 tiles
    planner = TreeDecodePlanner(8, 2, 32, large_rows=16)
    plan = planner.plan(tree, "cpu")
    items = plan.items[:int(plan.counts[0] + plan.counts[1])].numpy()
    found, lens = planner.items_starting_at(np.array([0, 153]))
    assert sorted(items[found, 0].tolist()) == [0] * 6 + [153] and (lens == items[found, 1]).all()
    assert planner.items_starting_at(np.array([0, 152])) is None  # inside a tail


def test_planner_into_fixed_buffers():
    """Capacity and reuse= (CUDA-graph replay) as with plan_tree_decode."""
    cap = PlanCapacity(max_queries=64, max_kv_tokens=20000, max_items=300, max_partials=600, max_merge=600)
    planner = TreeDecodePlanner(16, 4, 32, kv_dtype=torch.float32)
    graph = None
    for tree in decode_steps(5):
        want = TreeDecodePlanner(16, 4, 32, kv_dtype=torch.float32, schedule=Schedule()).plan(tree, "cpu", capacity=cap)
        if graph is None:
            graph = planner.plan(tree, "cpu", capacity=cap)
            assert_same_plan(graph, want, tree)
        else:
            got = planner.plan(tree, "cpu", reuse=graph)
            assert got.meta.data_ptr() == graph.meta.data_ptr()
            assert_same_plan(got, want, tree)


@pytest.mark.parametrize("capacity", [None, PlanCapacity(max_queries=37, max_kv_tokens=4096, max_items=53,
                                                         max_partials=999, max_merge=999)], ids=["exact", "capacity"])
@pytest.mark.parametrize("num_queries", [1, 2, 3, 5, 17])
def test_metadata_fields_start_on_16_bytes(num_queries, capacity):
    # Triton compiles a kernel variant per alignment class of each pointer argument; a field offset
    # that followed the batch size would recompile stage 1/2 in the middle of serving.
    B = num_queries
    tree = KVTree(torch.arange(8 + 3 * B, dtype=torch.int32),
                  torch.tensor([0, 8] + [8 + 3 * (i + 1) for i in range(B)], dtype=torch.int32),
                  torch.tensor([-1] + [0] * B, dtype=torch.int32), torch.arange(1, B + 1, dtype=torch.int32))
    plan = plan_tree_decode(tree, 8, 2, 32, "cpu", kv_dtype=torch.float16, capacity=capacity)
    base = plan.meta.data_ptr()
    for field in (plan.qperm, plan.items, plan.counts, plan.merge_indptr, plan.merge_slots):
        assert (field.data_ptr() - base) % 16 == 0
    assert plan.counts.tolist()[2] == B and plan.qperm.numel() == (capacity.max_queries if capacity else B)


def _tiny_tree(indptr=(0, 4, 6), kv=6):
    return KVTree(torch.arange(kv, dtype=torch.int32), torch.tensor(indptr, dtype=torch.int32),
                  torch.tensor([-1, 0], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32))


CAP = PlanCapacity(max_queries=4, max_kv_tokens=16, max_items=32, max_partials=64, max_merge=64)


@pytest.mark.parametrize("case,match", [
    # Items would index kv_indices up to 300: out-of-bounds reads (a segfault on the CPU).
    ("indptr_past_kv", "ends at 300 but kv_indices has 6"),
    ("zero_qo_heads", "must be >= 1"),  # a division by zero in schedule.c killed the process
    ("zero_kv_heads", "must be >= 1"),
    # The Triton kernel's KV block for head_dim 384 would be 10 tokens: Triton's arange refused it.
    ("head_dim_384", "head_dim=384 is above the 256"),
    ("kv_indices_2d", "kv_indices must be a 1-D int32 tensor"),
    # Cast to int32 before, an int64 id past 2**31 wrapped into another, valid slot or node.
    ("kv_indices_int64", "kv_indices must be a 1-D int32 tensor, got torch.int64"),
    ("query_node_int64", "query_node must be a 1-D int32 tensor, got torch.int64"),
    ("node_parent_2d", r"node_parent must be a 1-D int32 tensor, got torch.int32 \(1, 2\)"),
    # Items address kv_indices from node_indptr: a start past 0 shifted every node's slots.
    ("indptr_start", "must start at 0"),
    ("negative_capacity", "must be >= 0"),
    # More KV slots than the capacity's: copied past the plan's kv_indices buffer.
    ("kv_past_capacity", "needs 6 KV tokens, more than the plan capacity 5"),
    # A plan without capacity holds the caller's kv_indices: reusing it overwrote them.
    ("reuse_plain_plan", "made with capacity"),
    # Sizes other than the reused buffers': writes past them.
    ("reuse_other_capacity", "differs from the reused plan's buffers"),
    ("reuse_other_tiles", "tile size"),
    # Planned for another device than the buffers it writes into (by default the buffers' device).
    ("reuse_other_device", "reuse= plan's buffers are on cpu, not on meta"),
])
def test_malformed_calls_are_refused(case, match):
    def call():
        if case == "indptr_past_kv":
            plan_tree_decode(_tiny_tree((0, 4, 300)), 8, 2, 32, "cpu")
        elif case == "zero_qo_heads":
            plan_tree_decode(_tiny_tree(), 0, 2, 32, "cpu")
        elif case == "zero_kv_heads":
            plan_tree_decode(_tiny_tree(), 8, 0, 32, "cpu")
        elif case == "head_dim_384":
            plan_tree_decode(_tiny_tree(), 8, 2, 384, "cpu")
        elif case == "kv_indices_2d":
            t = _tiny_tree()
            plan_tree_decode(KVTree(t.kv_indices.view(2, 3), t.node_indptr, t.node_parent, t.query_node), 8, 2, 32,
                             "cpu")
        elif case in ("kv_indices_int64", "query_node_int64", "node_parent_2d"):
            t = _tiny_tree()
            kv, parent, qnode = t.kv_indices, t.node_parent, t.query_node
            if case == "kv_indices_int64":
                kv = kv.long() + 2**32  # wraps to the same slots
            elif case == "query_node_int64":
                qnode = qnode.long()
            else:
                parent = parent.view(1, 2)
            plan_tree_decode(KVTree(kv, t.node_indptr, parent, qnode), 8, 2, 32, "cpu")
        elif case == "indptr_start":
            t = _tiny_tree((2, 4, 6))
            plan_tree_decode(t, 8, 2, 32, "cpu")
        elif case == "kv_past_capacity":
            plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu", capacity=dataclasses.replace(CAP, max_kv_tokens=5))
        elif case == "negative_capacity":
            PlanCapacity(max_queries=4, max_kv_tokens=16, max_items=-1, max_partials=64, max_merge=64)
        elif case == "reuse_plain_plan":
            plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu", reuse=plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu"))
        elif case == "reuse_other_capacity":
            graph = plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu", capacity=CAP)
            bigger = PlanCapacity(max_queries=4, max_kv_tokens=16, max_items=32, max_partials=1000, max_merge=64)
            plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu", capacity=bigger, reuse=graph)
        elif case == "reuse_other_device":
            graph = plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu", capacity=CAP)
            plan_tree_decode(_tiny_tree(), 8, 2, 32, "meta", reuse=graph)
        else:
            graph = plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu", capacity=CAP)
            plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu", large_rows=32, reuse=graph)

    with pytest.raises(ValueError, match=match):
        call()


def test_a_refused_reuse_leaves_the_planner_as_it_was():
    """items_ending_at describes the last plan made: a refused call must not change it (it did when the
    reused plan's tile shape was checked after the new schedule was taken)."""
    planner = TreeDecodePlanner(8, 2, 32, kv_dtype=torch.float32)
    planner.plan(_tiny_tree(), "cpu")
    before = planner.items_ending_at(np.array([4, 6]))
    assert before is not None
    other = plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu", capacity=CAP, large_rows=32)
    longer = KVTree(torch.arange(12, dtype=torch.int32), torch.tensor([0, 3, 12], dtype=torch.int32),
                    torch.tensor([-1, 0], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="tile size"):
        planner.plan(longer, "cpu", reuse=other)
    assert np.array_equal(planner.items_ending_at(np.array([4, 6])), before)


def test_reuse_with_its_own_capacity_is_accepted():
    graph = plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu", capacity=CAP)
    again = plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu", capacity=CAP, reuse=graph)
    assert again.meta.data_ptr() == graph.meta.data_ptr() and again.fixed_buffers


@pytest.mark.parametrize("parent,query_node,match", [
    ([-1, 1], [1], "smaller than i"),  # a cycle: the walk never ended
    ([-1, 0], [-2], "must index a node"),  # Python's negative indexing took node 0
    ([-1, 0], [2], "must index a node"),
])
def test_reference_paths_refuse_malformed_trees(parent, query_node, match):
    tree = KVTree(torch.arange(6, dtype=torch.int32), torch.tensor([0, 4, 6], dtype=torch.int32),
                  torch.tensor(parent, dtype=torch.int32), torch.tensor(query_node, dtype=torch.int32))
    with pytest.raises(ValueError, match=match):
        path_nodes(tree)


def test_a_plan_past_the_launch_grid_is_refused_by_name():
    """Stage 1's grid puts the work items on CUDA's second axis (at most 65535 programs): a step with more
    items per KV head is refused at planning, with the limit named, not by the launch's bare error."""
    n = MAX_GRID_ITEMS + 1  # one-token roots, one query each: an item per root
    tree = KVTree(torch.arange(n, dtype=torch.int32), torch.arange(n + 1, dtype=torch.int32),
                  torch.full((n,), -1, dtype=torch.int32), torch.arange(n, dtype=torch.int32))
    with pytest.raises(ValueError, match=f"{n} work items per KV head.*at most {MAX_GRID_ITEMS}"):
        plan_tree_decode(tree, 8, 8, 64)
    small = KVTree(tree.kv_indices[:8], tree.node_indptr[:9], tree.node_parent[:8], tree.query_node[:8])
    with pytest.raises(ValueError, match="at most 65535.*give the capacity fewer max_items"):
        plan_tree_decode(small, 8, 8, 64, capacity=PlanCapacity(8, 8, MAX_GRID_ITEMS + 1, 8, 8))
    # Refused before the schedule lays out host buffers for that many items (18 TiB: a MemoryError, not this).
    with pytest.raises(ValueError, match="1000000000000 work items per KV head.*give the capacity fewer max_items"):
        plan_tree_decode(small, 8, 8, 64, capacity=PlanCapacity(8, 8, 10**12, 8, 8))


def test_a_step_whose_split_chunks_pass_the_launch_grid_is_planned_with_coarser_chunks():
    """A step of fewer query tiles than the grid holds, whose long node the cost model splits into enough
    chunks to pass 65535 items, is planned with coarser chunks (as a fixed capacity would be), not refused.
    (Many programs per SM make the CPU's 8 "SMs" ask for the chunks a large GPU would.)"""
    n_short, long_len, pps = MAX_GRID_ITEMS - 10, 50_000, 1000  # one-token roots, each a query's, and one long root
    indptr = np.concatenate([np.arange(n_short + 1), [n_short + long_len]])
    split = build_schedule(indptr, np.full(n_short + 1, -1), np.arange(n_short + 1), group_size=1, head_dim=64,
                           kv_elem_bytes=2, num_kv_heads=1, num_sms=8, programs_per_sm=pps)[1]
    assert len(split) > MAX_GRID_ITEMS  # what the cost model cuts with no cap on the items
    tree = KVTree(torch.arange(n_short + long_len, dtype=torch.int32), torch.from_numpy(indptr).to(torch.int32),
                  torch.full((n_short + 1,), -1, dtype=torch.int32), torch.arange(n_short + 1, dtype=torch.int32))
    plan = plan_tree_decode(tree, 1, 1, 64, device="cpu", programs_per_sm=pps)
    num_large, num_small, B = plan.counts.tolist()
    assert num_large + num_small == plan.grid_items <= MAX_GRID_ITEMS and B == n_short + 1
    assert (plan.items[:, 1] > 1).sum() > 1  # the long root is still cut into chunks, only fewer
    sched = (plan.qperm.numpy(), plan.items.numpy(), num_large, plan.merge_indptr.numpy(),
             plan.merge_slots.numpy(), None)
    cover = covered_pairs(tree, sched)
    assert len(cover) == n_short + long_len and set(cover.values()) == {1}


def test_an_unindexed_cuda_device_is_planned_for_by_its_index(monkeypatch):
    """"cuda" and "cuda:0" are unequal devices: a capacity plan's two uploads (its KV slots for kv_indices' device,
    its metadata for the one given) made a new staging ring, page-locked memory and events, twice a plan."""
    tree = make_tree([-1], [4], [0])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert plan_module._plan_device("cuda", tree, None) == torch.device("cuda", 3)
    assert plan_module._plan_device(None, tree, None) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_plans_for_cuda_keep_one_staging_ring():
    tree = make_tree([-1, 0, 0], [40, 3, 5], [1, 2])
    planner = TreeDecodePlanner(8, 2, 64)
    planner.plan(tree, "cuda", capacity=dataclasses.replace(CAP, max_kv_tokens=64))
    ring = planner._staging
    planner.plan(tree, "cuda", capacity=dataclasses.replace(CAP, max_kv_tokens=64))
    assert planner._staging is ring and ring.device == torch.device("cuda", torch.cuda.current_device())


# Mutation review (session 58): each test below fails on a mutant of kernels/plan.py that the rest let through.

@pytest.mark.parametrize("args, kw, match", [
    ((8, 2, 0), {}, "must be >= 1"),  # head_dim 0: refused by the planner, not only later by schedule.c
    ((6, 4, 32), {}, "num_qo_heads=6 is not a multiple of num_kv_heads=4"),  # group 6 // 4 = 1 left heads unread
    ((8, 2, 32), {"large_rows": 48}, "large_rows must be a power of two >= 16, got 48"),
])
def test_a_planner_refuses_a_bad_head_configuration(args, kw, match):
    with pytest.raises(ValueError, match=match):
        TreeDecodePlanner(*args, **kw)


def test_a_planner_takes_the_limits_themselves():
    TreeDecodePlanner(8, 2, plan_module.MAX_HEAD_DIM)  # head_dim 256 is served
    TreeDecodePlanner(16, 1, 32, large_rows=16)  # a group exactly as large as the large tile
    PlanCapacity(0, 0, 0, 0, 0)  # sizes >= 0: zero is a size


@pytest.mark.parametrize("field, what", [("max_partials", "partials"), ("max_merge", "merge entries")])
def test_capacity_refuses_too_few_partials_or_merge_entries(field, what):
    """Partials and merge entries are checked each against its own buffer: partial_out (stage 1 writes past it)
    and merge_slots (the packed metadata would not fit meta)."""
    need = plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu").merge_slots.numel()
    cap = dataclasses.replace(CAP, **{field: need - 1})
    with pytest.raises(PlanCapacityError, match=f"needs {need} {what}, more than the plan capacity {need - 1}"):
        plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu", capacity=cap)


def test_reuse_with_its_own_capacity_is_accepted_when_partials_and_merge_differ():
    cap = dataclasses.replace(CAP, max_partials=48, max_merge=80)
    graph = plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu", capacity=cap)
    again = plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu", capacity=cap, reuse=graph)
    assert again.meta.data_ptr() == graph.meta.data_ptr()
    assert plan_module._capacity_of(again) == cap


def test_a_reused_plan_is_planned_for_its_buffers_device():
    """The tree's kv_indices may be on the host while the buffers are on the GPU: reuse's device wins."""
    reuse = SimpleNamespace(meta=torch.empty(0, device="meta"))
    assert plan_module._plan_device(None, make_tree([-1], [4], [0]), reuse) == torch.device("meta")


@pytest.mark.parametrize("view", ["strided", "shifted"])
def test_kv_indices_that_view_the_buffers_are_copied_in(view):
    """A tree whose kv_indices view the reused buffers' own kv_indices, but not as their first T entries."""
    graph = plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu", capacity=CAP)
    graph.kv_indices.copy_(torch.arange(100, 116, dtype=torch.int32))
    src = graph.kv_indices[::2][:6] if view == "strided" else graph.kv_indices[1:7]
    want = src.clone()
    tree = KVTree(src, torch.tensor([0, 4, 6], dtype=torch.int32), torch.tensor([-1, 0], dtype=torch.int32),
                  torch.tensor([1, 0], dtype=torch.int32))
    plan = plan_tree_decode(tree, 8, 2, 32, "cpu", reuse=graph)
    assert torch.equal(plan.kv_indices[:6], want)
    assert plan.max_kv_slot == int(want.max())


def test_a_write_that_fails_leaves_the_buffers_holding_no_step(monkeypatch):
    graph = plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu", capacity=CAP)
    assert graph.buffered_queries == 2 and graph.buffered_max_kv_slot == 5
    planner = TreeDecodePlanner(8, 2, 32)

    def fail(*args, **kwargs):
        raise RuntimeError("upload failed")

    monkeypatch.setattr(planner, "_upload", fail)
    with pytest.raises(RuntimeError, match="upload failed"):
        planner.plan(_tiny_tree(), "cpu", reuse=graph)
    assert graph.buffered_queries is None and graph.buffered_max_kv_slot is None


def test_slots_built_into_the_buffers_then_refused_leave_them_holding_no_step():
    """A caller that builds a step's KV slots into the reused buffers (the server's kv_out) has overwritten
    the last step's: if that step's plan is then refused, the buffers must not still claim the last step,
    whose counts and slot bound no longer describe the slots they hold."""
    graph = plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu", capacity=CAP)
    graph.kv_indices[:6].copy_(torch.tensor([0, 1, 2, 3, 900, 901], dtype=torch.int32))  # built in place
    too_many = KVTree(graph.kv_indices[:6], torch.tensor([0, 4, 6], dtype=torch.int32),
                      torch.tensor([-1, 0], dtype=torch.int32), torch.tensor([1, 0, 1, 1, 0], dtype=torch.int32))
    with pytest.raises(PlanCapacityError, match="5 queries, more than the plan capacity 4"):
        plan_tree_decode(too_many, 8, 2, 32, "cpu", reuse=graph)
    assert graph.buffered_queries is None and graph.buffered_max_kv_slot is None
    # Slots copied in from elsewhere leave the buffers as they were until the write itself.
    graph = plan_tree_decode(_tiny_tree(), 8, 2, 32, "cpu", capacity=CAP)
    elsewhere = KVTree(torch.arange(6, dtype=torch.int32), too_many.node_indptr, too_many.node_parent,
                       too_many.query_node)
    with pytest.raises(PlanCapacityError):
        plan_tree_decode(elsewhere, 8, 2, 32, "cpu", reuse=graph)
    assert graph.buffered_queries == 2 and graph.buffered_max_kv_slot == 5


def test_node_indptr_must_end_exactly_at_the_kv_slots():
    with pytest.raises(ValueError, match="ends at 4 but kv_indices has 6 slots"):
        plan_tree_decode(_tiny_tree((0, 2, 4)), 8, 2, 32, "cpu")


def test_an_empty_tree_has_max_kv_slot_minus_one():
    empty = KVTree(*(torch.zeros(0, dtype=torch.int32),) * 1, torch.zeros(1, dtype=torch.int32),
                   torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32))
    assert plan_tree_decode(empty, 8, 2, 32, "cpu").max_kv_slot == -1
