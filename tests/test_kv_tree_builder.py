"""The decode KV tree built from real SGLang radix caches.

Every case drives real ``RadixCache`` / ``ChunkCache`` / ``ReqToTokenPool`` / ``Req`` objects through
the scheduler's calls (``radix_sim.RadixSim``) and checks each decode step's tree with ``check_tree``:
the tree validates; each query's path KV is exactly its ``req_to_token`` row; sharing is maximal
(two queries share exactly the longest common prefix of their rows, so each KV slot is read once);
chains are merged; attention over the tree equals plain per-request attention over the row.
"""
from __future__ import annotations

import gc
import os
import random
import time
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from radix_sim import RadixSim, join_random_forks, retire_random
from sglang_deft.kernels import attention_reference, tree_decode_reference
from sglang_deft.kernels.reference import path_nodes
from sglang_deft.kv_tree_builder import DecodeKVTree, DecodeKVTreeBuilder, KVTreeBuildError, build_decode_kv_tree

HQ, HKV, D = 4, 2, 16


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second intra-op thread only adds contention (1 ms vs 20 us per op
    on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lcp(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_tree(sim: RadixSim, reqs, seq_lens: torch.Tensor, d: DecodeKVTree) -> DecodeKVTree:
    tree = d.tree
    tree.validate()
    assert tree.kv_indices.device == sim.req_to_token.device
    for name in ("node_indptr", "node_parent", "query_node"):  # on the host: the planner reads them without a sync
        assert getattr(tree, name).device.type == "cpu", name
    assert tree.num_queries == len(reqs)

    lens = seq_lens.tolist()
    rows = [sim.req_to_token[r.req_pool_idx, :n].tolist() for r, n in zip(reqs, lens)]
    indptr = tree.node_indptr.tolist()
    kv = tree.kv_indices.tolist()
    paths = path_nodes(tree)
    for b, path in enumerate(paths):
        got = [s for n in path for s in kv[indptr[n]:indptr[n + 1]]]
        assert got == rows[b], f"query {b} ({reqs[b].rid}): path KV differs from its req_to_token row"

    # Every node is non-empty and used; a chain link (one child, no query ending there) would have
    # been merged into its child.
    n_nodes = tree.num_nodes
    children, ends = children_and_ends(tree)
    used = {n for path in paths for n in path}
    for n in range(n_nodes):
        assert indptr[n + 1] > indptr[n], f"node {n} is empty"
        assert n in used, f"node {n} serves no query"
        assert children[n] >= 2 or ends[n] >= 1, f"node {n} is an unmerged chain link"

    # Maximal sharing: private slots are owned by one request, so two rows agree exactly on their
    # shared radix prefix; the tree must share exactly that much between the two queries.
    for a in range(len(reqs)):
        for b in range(a + 1, len(reqs)):
            common = shared_tokens(indptr, paths[a], paths[b])
            assert common == lcp(rows[a], rows[b]), f"queries {a} and {b} share {common} tree tokens, " \
                                                    f"their rows {lcp(rows[a], rows[b])}"
    assert len(set(kv)) == len(kv), "a KV slot appears twice in the tree"
    assert d.unique_tokens == len(kv) == len({s for row in rows for s in row})
    assert d.attended_tokens == sum(lens)

    assert_attends_rows(sim, tree, rows, seed=len(kv))
    return d


def children_and_ends(tree) -> tuple[list[int], list[int]]:
    """Per node: its children, and the queries ending there."""
    children, ends = [0] * tree.num_nodes, [0] * tree.num_nodes
    for p in tree.node_parent.tolist():
        if p >= 0:
            children[p] += 1
    for q in tree.query_node.tolist():
        ends[q] += 1
    return children, ends


def shared_tokens(indptr: list[int], path_a: list[int], path_b: list[int]) -> int:
    """KV tokens of the nodes two root-first paths have in common."""
    common = 0
    for x, y in zip(path_a, path_b):
        if x != y:
            break
        common += indptr[x + 1] - indptr[x]
    return common


def assert_attends_rows(sim: RadixSim, tree, rows: list[list[int]], seed: int) -> None:
    """Attention over the tree (both reference implementations) == plain attention over each query's slots."""
    g = torch.Generator().manual_seed(seed)
    k_buf = torch.randn(sim.kv_slots + 1, HKV, D, generator=g)
    v_buf = torch.randn(sim.kv_slots + 1, HKV, D, generator=g)
    q = torch.randn(len(rows), HQ, D, generator=g)
    scale = D ** -0.5
    want = torch.stack([plain_attention(q[b], k_buf[rows[b]], v_buf[rows[b]], scale) for b in range(len(rows))]) \
        if rows else torch.zeros(0, HQ, D)
    torch.testing.assert_close(attention_reference(q, k_buf, v_buf, tree, scale), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tree_decode_reference(q, k_buf, v_buf, tree, scale), want, rtol=1e-5, atol=1e-5)


def plain_attention(q, k, v, scale):
    """One request: q [Hq, D] over its own k/v [L, Hkv, D], fp32."""
    k = k.repeat_interleave(HQ // HKV, dim=1)
    v = v.repeat_interleave(HQ // HKV, dim=1)
    p = torch.softmax(torch.einsum("hd,lhd->hl", q, k) * scale, dim=-1)
    return torch.einsum("hl,lhd->hd", p, v)


def decode_step(sim: RadixSim, reqs) -> DecodeKVTree:
    """One decode step: memory prepared as the scheduler does, tree built and checked, tokens sampled.

    The tree is built twice: from scratch, and by the simulation's long-lived DecodeKVTreeBuilder
    (the server's: it reuses the last step's radix part when it still holds). Both must be the
    same; the builder's is returned (its ``reused_shape`` says which way it went)."""
    seq_lens = sim.prepare_decode(reqs)
    d = build_decode_kv_tree(reqs, sim.req_to_token, seq_lens)
    check_tree(sim, reqs, seq_lens, d)
    if not hasattr(sim, "builder"):
        sim.builder = DecodeKVTreeBuilder(sim.req_to_token)
    kept = sim.builder.build(reqs, seq_lens)
    assert_same_tree(kept, d)
    for window in WINDOWS:
        check_window_tree(sim, reqs, seq_lens, window, sim.builder.build_window(reqs, seq_lens, window))
    sim.finish_decode(reqs)
    return kept


# Sliding windows every decode step's tree is also cut to (build_window): a query's own token only, a few
# tokens (windows that start inside the private tails), and windows that start inside shared prompts.
WINDOWS = (1, 3, 9, 40)


def check_window_tree(sim: RadixSim, reqs, seq_lens: torch.Tensor, window: int, d: DecodeKVTree) -> None:
    """Each query's path is the last ``window`` slots of its row, in order, except that a private node at its
    end may hold the window's first slots (the query starts before its run shares the top node); two queries
    share exactly the slots their windows have in common from where their runs start when those are the same
    position (nothing when not: a node is attended from its start by every query below it); attention over
    the tree equals plain attention over each window."""
    tree = d.tree
    tree.validate()
    lens = seq_lens.tolist()
    cut = [max(n - window, 0) for n in lens]
    rows = [sim.req_to_token[r.req_pool_idx, c:n].tolist() for r, c, n in zip(reqs, cut, lens)]
    indptr = tree.node_indptr.tolist()
    kv = tree.kv_indices.tolist()
    paths = path_nodes(tree)
    children, ends = children_and_ends(tree)
    assert all(indptr[n + 1] > indptr[n] for n in range(tree.num_nodes)), f"window {window}: an empty node"
    private = [0] * len(reqs)  # the length of each query's private first slots
    for b, path in enumerate(paths):
        read = [s for n in path for s in kv[indptr[n]:indptr[n + 1]]]
        if read != rows[b]:
            last = path[-1]
            private[b] = k = indptr[last + 1] - indptr[last]
            assert read == rows[b][k:] + rows[b][:k], f"query {b}: window {window}"
            assert cut[b] > 0 and children[last] == 0 and ends[last] == 1 and len(path) > 1, f"query {b}"
    # As in a full build, chains are merged (plan_limits counts on at most 2B - 1 nodes; the private nodes add
    # one per query at most, each the only child of its query's leaf)
    parents_of_private = {paths[b][-2] for b in range(len(reqs)) if private[b]}
    assert all(c >= 2 or e >= 1 or n in parents_of_private for n, (c, e) in enumerate(zip(children, ends))), \
        f"window {window}: an unmerged chain link"
    run_start = [c + k for c, k in zip(cut, private)]
    for a in range(len(reqs)):
        for b in range(a + 1, len(reqs)):
            common = shared_tokens(indptr, paths[a], paths[b])
            want = lcp(rows[a][private[a]:], rows[b][private[b]:]) if run_start[a] == run_start[b] else 0
            assert common == want, f"window {window}: queries {a} and {b} share {common} tree tokens, not {want}"
    assert d.attended_tokens == sum(len(r) for r in rows)
    assert d.unique_tokens == len(kv)
    if reqs and not any(cut):  # nothing to cut: the tree of build
        assert_same_tree(d, build_decode_kv_tree(reqs, sim.req_to_token, seq_lens))
    assert_attends_rows(sim, tree, rows, seed=window)


@pytest.mark.parametrize("suffixes, window, runs", [
    ([3, 4, 5, 6], 41, [[0, 1, 2, 3]]),  # one run from the latest start: 3 + 2 + 1 private positions
    ([5] * 8 + [6, 60], 100, [list(range(9)), [9]]),  # the far one alone; the 8 join the one a position on
])
def test_windows_starting_at_different_places_of_a_prompt_share_it_in_runs(suffixes, window, runs):
    """A fork's branches of different lengths: their windows start at different places of the shared prompt, and
    they still share it from the latest start of their run, each reading its earlier positions privately. The
    runs minimise the positions read: a branch far ahead of the others reads the prompt on its own rather than
    leave all the others that many private positions."""
    sim = RadixSim()
    prompt = sim.fresh(300 if window == 100 else 150)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.fresh(n)) for n in suffixes])
    seq_lens = sim.prepare_decode(reqs)
    d = DecodeKVTreeBuilder(sim.req_to_token).build_window(reqs, seq_lens, window)
    check_window_tree(sim, reqs, seq_lens, window, d)
    cut = [n - window for n in seq_lens.tolist()]
    want = 0
    for run in runs:
        start = max(cut[b] for b in run)
        want += len(prompt) - start + sum(start - cut[b] for b in run)  # the prompt from the run's start, once
    want += sum(n + 1 for n in suffixes)  # the private tails, each with this step's token
    assert d.unique_tokens == want < d.attended_tokens


def two_branches_on_a_prompt():
    """Two branches of 2 tokens on a cached 10-token prompt, each at 13 tokens with this step's: (sim, reqs,
    seq_lens)."""
    sim = RadixSim()
    prompt = sim.fresh(10)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.fresh(2)) for _ in range(2)])
    seq_lens = sim.prepare_decode(reqs)
    assert seq_lens.tolist() == [13, 13]
    return sim, reqs, seq_lens


@pytest.mark.parametrize("window, room", [(4, 0), (5, 1), (7, 3), (9, 5)])
def test_window_room_keeps_every_moving_root_a_position(window, room):
    """Two branches of 2 tokens on a 10-token prompt, 13 tokens each with this step's: windows of 4-9 start in
    the prompt, the two together, so the window tree's root is the prompt from there (window - 3 positions).
    It moves a position a step and does not grow, so the shape holds for one step less than its length
    (``MovingStarts.room``), whatever slack the tails get."""
    sim, reqs, seq_lens = two_branches_on_a_prompt()
    d = DecodeKVTreeBuilder(sim.req_to_token).build_window(reqs, seq_lens, window)
    check_window_tree(sim, reqs, seq_lens, window, d)
    assert roots(d) == [0] and node_lengths(d)[0] == window - 3
    slack = DecodeKVTreeBuilder(sim.req_to_token).build_window(reqs, seq_lens, window, tail_slack=8)
    assert slack.moving.room == room


@pytest.mark.parametrize("nodes_below", [0, 3], ids=["top_only", "nodes_below"])
def test_window_runs_read_the_fewest_positions(nodes_below):
    """_run_skips against every partition of a node's starts into runs (random nodes of 1-9 starts): each start's
    run begins at or after it, and the positions read are the fewest possible. ``nodes_below``: nodes under the top
    one, each used by the queries of a range of its starts (a nested fork's groups), which every run holding some
    of those queries reads again."""
    from itertools import combinations

    from sglang_deft.kv_tree_builder import _run_skips

    rng = random.Random(5 + nodes_below)
    for _ in range(200):
        length = rng.randint(20, 400)
        starts = sorted(rng.sample(range(length), rng.randint(1, 9)))
        counts = [rng.randint(1, 5) for _ in starts]
        skip = np.repeat(starts, counts)
        first_query = np.cumsum([0] + counts[:-1])  # the index in skip of each start's first query
        ranges = [sorted(rng.sample(range(len(starts)), 2) if len(starts) > 1 else [0, 0]) for _ in range(nodes_below)]
        sizes = [rng.randint(1, 300) for _ in ranges]
        entries = [(first_query[i], 100 + v, sizes[v]) for v, (a, b) in enumerate(ranges) for i in range(a, b + 1)]
        below = tuple(np.array([e[k] for e in entries], np.int64) for k in range(3)) if entries else None
        run = _run_skips(np.full(len(skip), 7), skip, np.full(len(skip), length), lambda: below)
        got = {int(s): int(r) for s, r in zip(skip, run)}
        assert all(r >= s for s, r in got.items())

        def positions(ends: list[int]) -> int:  # runs ending at these starts (indices), the last one included
            total, lo = 0, 0
            for hi in ends:
                total += length - starts[hi] + sum(c * (starts[hi] - s) for s, c in zip(starts[lo:hi + 1],
                                                                                     counts[lo:hi + 1]))
                total += sum(size for (a, b), size in zip(ranges, sizes) if a <= hi and b >= lo)  # read again
                lo = hi + 1
            return total

        n = len(starts)
        fewest = min(positions([*cuts, n - 1]) for k in range(n) for cuts in combinations(range(n - 1), k))
        runs = sorted({starts.index(r) for r in got.values()})
        assert positions(runs) == fewest


def test_window_runs_never_read_more_than_runs_blind_to_interleaved_nodes_below():
    """Nodes below whose users are any subset of the starts (interleaved with other nodes' users, where the cost
    model of ``_run_skips`` is not exact): its runs never read more positions than the runs it chooses with nothing
    below, counted exactly. The random ranges of ``test_window_runs_read_the_fewest_positions`` never reach the
    comparison that guarantees this."""
    from sglang_deft.kv_tree_builder import _run_skips

    rng = random.Random(11)
    for _ in range(400):
        length = rng.randint(20, 400)
        starts = sorted(rng.sample(range(length), rng.randint(2, 8)))
        counts = [rng.randint(1, 4) for _ in starts]
        skip = np.repeat(starts, counts)
        first_query = np.cumsum([0] + counts[:-1])
        users = [sorted(rng.sample(range(len(starts)), rng.randint(1, len(starts)))) for _ in range(rng.randint(1, 3))]
        sizes = [rng.randint(1, 300) for _ in users]
        entries = [(first_query[i], 100 + v, sizes[v]) for v, us in enumerate(users) for i in us]
        below = tuple(np.array([e[k] for e in entries], np.int64) for k in range(3))

        def positions(run) -> int:  # the runs' shared parts, each start's own part, each node below per run it is in
            by_start = {int(s): int(r) for s, r in zip(skip, run)}
            runs = [by_start[s] for s in starts]
            total = sum(length - r for r in set(runs)) + sum(c * (r - s) for s, c, r in zip(starts, counts, runs))
            return total + sum(size * len({runs[i] for i in us}) for size, us in zip(sizes, users))

        top, ends = np.full(len(skip), 7), np.full(len(skip), length)
        chosen = _run_skips(top, skip, ends, lambda: below)
        assert positions(chosen) <= positions(_run_skips(top, skip, ends, None)), (starts, counts, users, sizes)


def test_nested_forks_keep_their_groups_in_one_run():
    """Tree of thought under a window: 4 groups (each 200 tokens of its own on a 1000-token prompt) of 4 branches of
    3-63 tokens, 512-token windows starting in the prompt at four places per group. Parting the branches of a group
    into runs would repeat the group's node under each run; the runs count it (before, they split the starts as if
    nothing lay below the prompt: 2,840 positions against 2,072 with one run)."""
    sim = RadixSim(kv_slots=4096, max_reqs=16, max_context=1400)
    prompt = sim.fresh(1000)
    sim.run_to_cache(prompt)
    ids = []
    for _ in range(4):
        group = prompt + sim.fresh(200)
        sim.run_to_cache(group)
        ids += [group + sim.fresh(n) for n in (3, 23, 43, 63)]
    reqs = sim.prefill([sim.new_req(i) for i in ids])
    seq_lens = sim.prepare_decode(reqs)
    d = DecodeKVTreeBuilder(sim.req_to_token).build_window(reqs, seq_lens, 512)
    check_window_tree(sim, reqs, seq_lens, window=512, d=d)
    cut = [n - 512 for n in seq_lens.tolist()]
    one_run = (1000 - max(cut)) + sum(max(cut) - c for c in cut) + 4 * 200 + sum(n + 1 for n in (3, 23, 43, 63)) * 4
    assert d.unique_tokens == one_run


def test_window_runs_never_read_more_than_runs_chosen_without_the_nodes_below():
    """Two groups (6 and 20 tokens of their own on a 39-token prompt) whose branches' 100-token windows start at
    12, 19, 37 (group A) and 29, 31 (group B) of the prompt: B's starts lie among A's, so counting A's node once
    per run boundary between its users' starts counts it for a run of B's alone too, and those runs would hold
    450 positions. The runs without that count hold 446 (the fewest here), and are kept (found by review)."""
    sim = RadixSim(kv_slots=2048, max_reqs=8, max_context=256)
    prompt = sim.fresh(39)
    sim.run_to_cache(prompt)
    ids = []
    for own, branches in ((6, (66, 73, 91)), (20, (69, 71))):
        group = prompt + sim.fresh(own)
        sim.run_to_cache(group)
        ids += [group + sim.fresh(n) for n in branches]
    reqs = sim.prefill([sim.new_req(i) for i in ids])
    seq_lens = sim.prepare_decode(reqs)
    assert [n - 100 for n in seq_lens.tolist()] == [12, 19, 37, 29, 31]
    d = DecodeKVTreeBuilder(sim.req_to_token).build_window(reqs, seq_lens, 100)
    check_window_tree(sim, reqs, seq_lens, window=100, d=d)
    assert d.unique_tokens == 446


def assert_same_tree(a: DecodeKVTree, b: DecodeKVTree) -> None:
    for name in ("kv_indices", "node_indptr", "node_parent", "query_node"):
        assert torch.equal(getattr(a.tree, name), getattr(b.tree, name)), name
    assert (a.attended_tokens, a.unique_tokens) == (b.attended_tokens, b.unique_tokens)


def node_lengths(d: DecodeKVTree) -> list[int]:
    return torch.diff(d.tree.node_indptr).tolist()


def roots(d: DecodeKVTree) -> list[int]:
    return [n for n, p in enumerate(d.tree.node_parent.tolist()) if p == -1]


# --------------------------------------------------------------------------------------------- forks


@pytest.mark.parametrize("n", [1, 2, 8])
def test_fork(n):
    """fork(n): the prompt is cached first, then n branches with the same prompt decode."""
    sim = RadixSim()
    prompt = sim.tokens(40)
    sim.run_to_cache(prompt)
    branches = sim.prefill([sim.new_req(prompt) for _ in range(n)])
    for step in range(1, 5):
        d = decode_step(sim, branches)
        if n == 1:  # one user: prompt and tail are one node
            assert node_lengths(d) == [40 + step]
            assert d.unique_tokens == d.attended_tokens
        else:
            assert node_lengths(d) == [40] + [step] * n
            assert d.tree.node_parent.tolist() == [-1] + [0] * n
            assert d.unique_tokens == 40 + n * step < d.attended_tokens == n * (40 + step)


@pytest.mark.parametrize("cached_first", [True, False])
def test_fork_overlap_scheduler(cached_first):
    """The decode step after a prefill is built before that prefill's cache_unfinished_req runs:
    branches still hold last_node from match_prefix (one token short of the prompt, or nothing)."""
    sim = RadixSim()
    prompt = sim.tokens(33)
    if cached_first:
        sim.run_to_cache(prompt)
    branches = sim.prefill([sim.new_req(prompt) for _ in range(3)], overlap=True)
    d = decode_step(sim, branches)
    if cached_first:
        assert node_lengths(d) == [32, 2, 2, 2]  # prompt[:-1] shared; each branch prefilled its own last token
    else:
        assert node_lengths(d) == [34] * 3 and d.unique_tokens == d.attended_tokens
    sim.flush()  # cache_unfinished_req: duplicates freed, rows rewritten with the tree's slots
    d = decode_step(sim, branches)
    assert node_lengths(d) == [33, 2, 2, 2]


def test_nested_forks():
    """Two levels of fork(): each level's prefix cached before its branches run."""
    sim = RadixSim()
    p = sim.tokens(30)
    sim.run_to_cache(p)
    mids = [p + sim.fresh(10) for _ in range(2)]
    for m in mids:
        sim.run_to_cache(m)
    leaves = sim.prefill([sim.new_req(m + sim.fresh(5)) for m in mids for _ in range(3)])
    for step in range(1, 4):
        d = decode_step(sim, leaves)
        assert sorted(node_lengths(d)) == sorted([30, 10, 10] + [5 + step] * 6)
        assert len(roots(d)) == 1
        assert d.unique_tokens == 30 + 20 + 6 * (5 + step)


def test_nested_forks_deduplicated_in_one_batch():
    """Only the root prompt is cached; six leaves of two sub-prompts prefill in one batch and are
    deduplicated by cache_unfinished_req (splitting the nodes the first leaves inserted)."""
    sim = RadixSim()
    p = sim.tokens(25)
    sim.run_to_cache(p)
    mids = [p + sim.fresh(8) for _ in range(2)]
    leaves = sim.prefill([sim.new_req(m + sim.fresh(4)) for m in mids for _ in range(3)])
    d = decode_step(sim, leaves)
    assert sorted(node_lengths(d)) == sorted([25, 8, 8] + [5] * 6)


# ------------------------------------------------------------------------------------------- splits


def test_split_of_a_running_requests_node():
    """A new request matching part of a running request's last node splits it: SGLang puts the new
    node above, so the running request keeps its last_node and its path length."""
    sim = RadixSim()
    p, q_, r = sim.tokens(20), sim.fresh(15), sim.fresh(6)
    x = sim.prefill([sim.new_req(p + q_)])[0]
    d = decode_step(sim, [x])
    assert node_lengths(d) == [36]
    last = x.last_node
    y = sim.prefill([sim.new_req(p + r)])[0]
    assert x.last_node is last and len(last.key) == 15 and len(last.parent.key) == 20
    d = decode_step(sim, [x, y])
    assert node_lengths(d) == [20, 15 + 2, 6 + 1]


def test_split_inside_last_node_by_shorter_prompt():
    """The new prompt is a prefix of a running request's prompt: match_prefix splits at len - 1,
    cache_unfinished_req splits again one token later."""
    sim = RadixSim()
    base = sim.tokens(30)
    x = sim.prefill([sim.new_req(base)])[0]
    decode_step(sim, [x])
    y = sim.prefill([sim.new_req(base[:12])], overlap=True)[0]
    d = decode_step(sim, [y, x])
    assert node_lengths(d) == [11, 2, 30 - 11 + 2]
    sim.flush()
    d = decode_step(sim, [x, y])
    assert node_lengths(d) == [12, 30 - 12 + 3, 2]


def test_split_above_a_chain():
    """Splits deep in a shared path: every request's path still matches its row."""
    sim = RadixSim()
    p = sim.tokens(40)
    sim.run_to_cache(p)
    a = sim.prefill([sim.new_req(p) for _ in range(2)])
    decode_step(sim, a)
    b = sim.prefill([sim.new_req(p[:25] + sim.fresh(3)), sim.new_req(p[:10] + sim.fresh(3))])
    d = decode_step(sim, a + b)
    assert sorted(node_lengths(d)) == sorted([10, 15, 15, 2, 2, 4, 4])


def test_reused_shape_survives_a_split_by_a_request_outside_the_batch():
    """Same requests on the same last nodes: the builder reuses the radix part, also after another
    request's insert split a node on every batch path (the split changes no shared prefix)."""
    sim = RadixSim()
    p = sim.tokens(30)
    sim.run_to_cache(p)
    batch = sim.prefill([sim.new_req(p + sim.fresh(3)) for _ in range(3)])
    assert not decode_step(sim, batch).reused_shape  # the builder's first step
    d = decode_step(sim, batch)
    assert d.reused_shape and node_lengths(d) == [30, 5, 5, 5]
    shared = batch[0].last_node
    while len(shared.key) != 30:
        shared = shared.parent
    sim.run_to_cache(p[:12] + sim.fresh(4))
    assert len(shared.key) == 18 and len(shared.parent.key) == 12  # split above, identity kept
    d = decode_step(sim, batch)  # equal to a fresh build: checked in decode_step
    assert d.reused_shape and node_lengths(d) == [30, 6, 6, 6]


def test_shape_is_rebuilt_when_the_batch_changes():
    sim = RadixSim()
    p = sim.tokens(20)
    sim.run_to_cache(p)
    batch = sim.prefill([sim.new_req(p + sim.fresh(2)) for _ in range(3)])
    decode_step(sim, batch)
    assert decode_step(sim, batch).reused_shape
    assert not decode_step(sim, batch[::-1]).reused_shape  # another order
    assert not decode_step(sim, batch[:2]).reused_shape  # a request left
    late = sim.prefill([sim.new_req(p + sim.fresh(2))], overlap=True)
    assert not decode_step(sim, batch[:2] + late).reused_shape  # one joined, its prefill not yet cached
    assert decode_step(sim, batch[:2] + late).reused_shape
    sim.flush()  # cache_unfinished_req: `late` moves to its own radix node
    assert not decode_step(sim, batch[:2] + late).reused_shape


def test_shape_is_rebuilt_when_a_retracted_batch_returns_in_new_rows():
    """/pause_generation with mode=retract frees the whole batch's rows; re-prefilled, the same requests
    match the same radix nodes, and with the overlap scheduler their first decode step is built before
    cache_unfinished_req moves them: same requests, same last nodes, new rows. The builder reused its
    shape, rows included, and read the old rows' slots (0.2-0.36 off in logprobs on a CPU server)."""
    sim = RadixSim()
    prompt = sim.tokens(40)
    sim.run_to_cache(prompt)
    batch = sim.prefill([sim.new_req(prompt + sim.fresh(5)), sim.new_req(prompt + sim.fresh(7))])
    for _ in range(3):
        decode_step(sim, batch)
    rows, nodes = [r.req_pool_idx for r in batch], [r.last_node for r in batch]
    sim.retract(batch)
    sim.prefill(batch, overlap=True)
    assert [r.req_pool_idx for r in batch] != rows and all(r.last_node is n for r, n in zip(batch, nodes))
    assert not decode_step(sim, batch).reused_shape  # equal to a fresh build: checked in decode_step
    assert decode_step(sim, batch).reused_shape


def kept_shape(n: int):
    """(sim, batch, seq_lens, builder): ``n`` requests on a cached prompt, prepared for a decode step, and a
    builder that built that step and keeps its shape."""
    sim = RadixSim()
    p = sim.tokens(20)
    sim.run_to_cache(p)
    batch = sim.prefill([sim.new_req(p + sim.fresh(2)) for _ in range(n)])
    seq_lens = sim.prepare_decode(batch)
    builder = DecodeKVTreeBuilder(sim.req_to_token)
    builder.build(batch, seq_lens)
    assert builder.same_batch_as_last(batch, seq_lens.numpy())
    return sim, batch, seq_lens, builder


def test_other_requests_in_the_same_rows_on_the_same_nodes_are_another_batch():
    """The batch is compared by request identity, not only by rows and nodes: another request that
    took a finished one's row and radix node has its own private tail in that row, so the step planner
    must not take it for the last batch grown by a token (it would continue the old request's plan)."""
    sim, batch, seq_lens, builder = kept_shape(2)
    others = [SimpleNamespace(last_node=r.last_node, req_pool_idx=r.req_pool_idx,
                              retraction_count=r.retraction_count, rid=f"other-{r.rid}") for r in batch]
    assert not builder.same_batch_as_last(others, seq_lens.numpy())
    assert not builder.build(others, seq_lens).reused_shape


def test_the_builder_keeps_no_finished_request_alive():
    """The kept shape compares requests by identity but holds them weakly: once the scheduler drops a
    finished batch, nothing of it stays alive through the builder (before, the last batch's requests, with
    their token lists and device prefix_indices, lived until the next decode step)."""
    sim, batch, seq_lens, builder = kept_shape(3)
    sim.finish_decode(batch)
    refs = [weakref.ref(r) for r in batch]
    for req in batch:
        sim.finish(req)
    del req, batch
    gc.collect()
    assert [ref() for ref in refs] == [None] * 3


# ---------------------------------------------------------------------------------- request life cycle


def test_finished_requests():
    """Finished branches leave their tokens in the radix tree but not in the batch; a new request
    that continues one of them shares its decoded tokens too; evicting unlocked nodes changes nothing."""
    sim = RadixSim()
    prompt = sim.tokens(24)
    sim.run_to_cache(prompt)
    branches = sim.prefill([sim.new_req(prompt) for _ in range(4)])
    for _ in range(5):
        decode_step(sim, branches)
    done = branches[:2]
    text = done[0].origin_input_ids + done[0].output_ids[:done[0].kv_committed_len - 24]
    for req in done:
        sim.finish(req)
    running = branches[2:]
    d = decode_step(sim, running)
    assert node_lengths(d) == [24, 6, 6]
    follow = sim.prefill([sim.new_req(text + sim.fresh(2))])
    d = decode_step(sim, running + follow)
    assert node_lengths(d) == [24, 7, 7, 8]  # follow shares the prompt; the rest of its path is its own
    sim.evict_all_unlocked()
    d = decode_step(sim, running + follow)
    assert node_lengths(d) == [24, 8, 8, 9]


def test_no_sharing():
    sim = RadixSim()
    reqs = sim.prefill([sim.new_req(sim.fresh(8 + 5 * i)) for i in range(5)])
    for _ in range(3):
        d = decode_step(sim, reqs)
        assert d.unique_tokens == d.attended_tokens
        assert roots(d) == list(range(5)) and d.tree.query_node.tolist() == list(range(5))


@pytest.mark.parametrize("cache", ["disabled", "chunk"])
def test_without_radix_cache(cache):
    """RadixCache(disable=True) leaves last_node at the root; ChunkCache (--disable-radix-cache)
    leaves it None. Identical prompts then share nothing: every request is one private node."""
    sim = RadixSim(cache=cache)
    prompt = sim.tokens(20)
    reqs = sim.prefill([sim.new_req(prompt) for _ in range(3)])
    assert all((r.last_node is None) == (cache == "chunk") for r in reqs)
    for _ in range(2):
        d = decode_step(sim, reqs)
        assert d.unique_tokens == d.attended_tokens and roots(d) == [0, 1, 2]
    for r in reqs:
        sim.finish(r)


def test_mix():
    """A fork group, a nested fork, a partial-prefix request and independent requests in one
    shuffled batch, some still waiting for cache_unfinished_req, with requests finishing midway."""
    sim = RadixSim(seed=7)
    rng = random.Random(7)
    p = sim.tokens(50)
    sim.run_to_cache(p)
    fork = sim.prefill([sim.new_req(p) for _ in range(3)])
    mid = p + sim.tokens(12)
    sim.run_to_cache(mid)
    alone = sim.prefill([sim.new_req(sim.fresh(12)) for i in range(2)])
    nested = sim.prefill([sim.new_req(mid + sim.fresh(3)) for _ in range(2)], overlap=True)
    partial = sim.prefill([sim.new_req(p[:30] + sim.fresh(9))], overlap=True)
    batch = fork + nested + partial + alone
    rng.shuffle(batch)
    d = decode_step(sim, batch)
    assert d.unique_tokens < d.attended_tokens
    sim.flush()
    for step in range(4):
        d = decode_step(sim, batch)
        if step == 1:
            sim.finish(batch.pop(rng.randrange(len(batch))))
            sim.finish(batch.pop(rng.randrange(len(batch))))


@pytest.mark.parametrize("seed", range(6))
def test_random_schedules(seed):
    """Random arrivals (forks of a few shared prompts, with and without the overlap scheduler's
    delay), finishes and evictions; every decode step's tree is checked."""
    run_random_schedule(seed)


def run_random_schedule(seed: int, page_size: int = 1) -> None:
    """test_random_schedules' schedule, on a cache of ``page_size``."""
    rng = random.Random(seed)
    sim = RadixSim(seed=seed, kv_slots=16384, max_reqs=96, page_size=page_size)
    bases = [sim.tokens(rng.randint(1, 60)) for _ in range(4)]
    running = []
    for _ in range(25):
        join_random_forks(sim, rng, bases, running, forks=3, extra=[0, 0, 1, 5], cached=0.3, copies=[1, 1, 2, 4])
        if running:
            rng.shuffle(running)
            decode_step(sim, running)
        retire_random(sim, rng, running, finished=0.1)


def test_query_ending_on_a_shared_node():
    """A path covering the whole sequence (not reached in decode, where the new token is private,
    but allowed): the query ends on the shared node, which must not absorb the other query's tail."""
    sim = RadixSim()
    prompt = sim.tokens(12)
    reqs = sim.prefill([sim.new_req(prompt) for _ in range(2)])
    sim.prepare_decode(reqs)
    seq_lens = torch.tensor([12, 13])
    d = build_decode_kv_tree(reqs, sim.req_to_token, seq_lens)
    check_tree(sim, reqs, seq_lens, d)
    assert node_lengths(d) == [12, 1] and d.tree.query_node.tolist() == [0, 1]


def test_a_kept_shape_is_not_reused_when_a_query_gains_or_loses_its_tail():
    """The builder reuses the last step's radix part only while every request keeps a private tail
    (or keeps none) and no sequence got shorter than its radix path: a query that gains a tail needs
    a tail node (else its new token is never read), and a path longer than the sequence must raise
    as in a fresh build (else the query reads KV past its sequence)."""
    sim = RadixSim()
    prompt = sim.tokens(12)
    reqs = sim.prefill([sim.new_req(prompt) for _ in range(2)])
    sim.prepare_decode(reqs)
    builder = DecodeKVTreeBuilder(sim.req_to_token)
    builder.build(reqs, torch.tensor([12, 13]))  # query 0 ends on the shared node
    lens = torch.tensor([13, 13])  # now it has a private token
    kept = builder.build(reqs, lens)
    assert_same_tree(kept, check_tree(sim, reqs, lens, build_decode_kv_tree(reqs, sim.req_to_token, lens)))
    builder.build(reqs, torch.tensor([12, 13]))
    with pytest.raises(KVTreeBuildError, match="radix path holds 12 tokens but its sequence has 11"):
        builder.build(reqs, torch.tensor([11, 13]))


# ------------------------------------------------------------------------------------- paged caches
# --page-size > 1: the radix tree holds whole pages only (page_align_keys), a request's partial last page is its
# own (prefix_indices keeps it, cache_protected_len stops the tree at the page), and the paged allocator
# continues a request's partial page. Sharing is page-aligned; check_tree still requires that the tree
# shares exactly what the rows share and that attention over it is the rows' attention.
PAGE_SIZES = [2, 4, 16]
# SGLang's paged allocator is Triton: on a CPU it runs under the interpreter only (make test sets it).
# (Also on a GPU host: the simulator's allocator is on the CPU, where compiled Triton takes no pointers.)
paged = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                           reason="SGLang's paged KV allocator runs Triton kernels: TRITON_INTERPRET=1 on a CPU")


@paged
@pytest.mark.parametrize("page", PAGE_SIZES)
@pytest.mark.parametrize("n", [1, 3])
def test_fork_paged(page, n):
    sim = RadixSim(page_size=page)
    prompt = sim.tokens(40)
    sim.run_to_cache(prompt)
    branches = sim.prefill([sim.new_req(prompt) for _ in range(n)])
    shared = 40 // page * page  # cache_unfinished_req inserts the prompt's whole pages
    for step in range(1, 2 * page + 2):  # across the tails' page boundaries
        d = decode_step(sim, branches)
        if n == 1:
            assert node_lengths(d) == [40 + step]
        else:
            assert node_lengths(d) == [shared] + [40 - shared + step] * n
            assert d.unique_tokens == shared + n * (40 - shared + step)


@paged
@pytest.mark.parametrize("page", PAGE_SIZES)
@pytest.mark.parametrize("cached_first", [True, False])
def test_fork_overlap_scheduler_paged(page, cached_first):
    sim = RadixSim(page_size=page)
    prompt = sim.tokens(32)  # whole pages: the flush moves the shared part from prompt[:-1]'s pages to all 32
    if cached_first:
        sim.run_to_cache(prompt)
    branches = sim.prefill([sim.new_req(prompt) for _ in range(3)], overlap=True)
    d = decode_step(sim, branches)
    if cached_first:  # match_prefix: prompt[:-1]'s whole pages
        assert node_lengths(d) == [31 // page * page] + [33 - 31 // page * page] * 3
    else:
        assert d.unique_tokens == d.attended_tokens
    sim.flush()
    for step in range(1, page + 2):
        d = decode_step(sim, branches)
        assert node_lengths(d) == [32] + [1 + step] * 3


@paged
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_nested_forks_paged(page):
    sim = RadixSim(page_size=page)
    p = sim.tokens(30)
    sim.run_to_cache(p)
    mids = [p + sim.fresh(10) for _ in range(2)]
    for m in mids:
        sim.run_to_cache(m)
    leaves = sim.prefill([sim.new_req(m + sim.fresh(5)) for m in mids for _ in range(3)])
    for _ in range(page + 2):
        d = decode_step(sim, leaves)
        assert len(roots(d)) == 1 and d.unique_tokens < d.attended_tokens


@paged
@pytest.mark.parametrize("cache", ["disabled", "chunk"])
def test_without_radix_cache_paged(cache):
    """--disable-radix-cache with --page-size 16: nothing shared, each request one private node."""
    sim = RadixSim(cache=cache, page_size=16)
    prompt = sim.tokens(40)
    reqs = sim.prefill([sim.new_req(prompt) for _ in range(3)])
    for _ in range(17):  # across a page boundary of the tails
        d = decode_step(sim, reqs)
        assert d.unique_tokens == d.attended_tokens and roots(d) == [0, 1, 2]
    for r in reqs:
        sim.finish(r)


@paged
@pytest.mark.parametrize("page", PAGE_SIZES)
@pytest.mark.parametrize("seed", range(3))
def test_random_schedules_paged(page, seed):
    """test_random_schedules' arrivals, finishes and evictions on a paged cache."""
    run_random_schedule(seed, page)


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("table", [torch.zeros(2, 8, dtype=torch.int64), torch.zeros(8, dtype=torch.int32)],
                         ids=["int64", "1-D"])
def test_a_table_that_is_not_2d_int32_is_refused(table):
    with pytest.raises(ValueError, match="req_to_token must be a 2-D int32 tensor"):
        DecodeKVTreeBuilder(table)


def test_a_table_past_int32_positions_is_refused_and_one_entry_fewer_is_taken():
    """The gather's flat positions are int32 (cast with numpy's astype, which wraps silently): a table of 2^31
    entries would read other requests' slots. Meta tensors: the shapes without the memory."""
    with pytest.raises(ValueError, match="lower --max-running-requests or --context-length"):
        DecodeKVTreeBuilder(torch.empty(2 ** 16, 2 ** 15, dtype=torch.int32, device="meta"))  # 2^31
    DecodeKVTreeBuilder(torch.empty(1, 2 ** 31 - 1, dtype=torch.int32, device="meta"))


def test_path_longer_than_sequence_raises():
    sim = RadixSim()
    prompt = sim.tokens(10)
    reqs = sim.prefill([sim.new_req(prompt) for _ in range(2)])
    sim.prepare_decode(reqs)
    with pytest.raises(KVTreeBuildError, match="radix path holds 10 tokens but its sequence has 9"):
        build_decode_kv_tree(reqs, sim.req_to_token, torch.tensor([11, 9]))


def test_batch_mismatch_raises():
    sim = RadixSim()
    reqs = sim.prefill([sim.new_req(sim.tokens(5)) for _ in range(2)])
    seq_lens = sim.prepare_decode(reqs)
    with pytest.raises(KVTreeBuildError, match="batch mismatch"):
        build_decode_kv_tree(reqs, sim.req_to_token, seq_lens[:1])


def test_evicted_node_on_path_raises():
    sim = RadixSim()
    req = sim.prefill([sim.new_req(sim.tokens(8))])[0]
    seq_lens = sim.prepare_decode([req])
    req.last_node.value = None  # what HiCache leaves on a node whose KV went to the host
    with pytest.raises(KVTreeBuildError, match="evicted"):
        build_decode_kv_tree([req], sim.req_to_token, seq_lens)


def test_empty_batch():
    sim = RadixSim()
    d = build_decode_kv_tree([], sim.req_to_token, torch.zeros(0, dtype=torch.int64))
    d.tree.validate()
    assert d.tree.num_nodes == 0 and d.unique_tokens == d.attended_tokens == 0


def test_foreign_nodes_raise():
    """Nodes of two radix trees in one batch, or a last_node with a parent but no key or value, are
    refused rather than misread."""
    sims = [RadixSim(), RadixSim()]
    reqs = [sim.prefill([sim.new_req(sim.tokens(6))])[0] for sim in sims]
    seq_lens = torch.tensor([sim.prepare_decode([r])[0] for sim, r in zip(sims, reqs)])
    with pytest.raises(KVTreeBuildError, match="another radix tree"):
        build_decode_kv_tree(reqs, sims[0].req_to_token, seq_lens)
    reqs[0].last_node = type("Opaque", (), {"parent": reqs[0].last_node})()
    with pytest.raises(KVTreeBuildError, match="must be a radix TreeNode"):
        build_decode_kv_tree(reqs[:1], sims[0].req_to_token, seq_lens[:1])


def test_streaming_session_turn_is_a_private_request():
    """A streaming session's later turn (--enable-streaming-session) carries SessionAwareCache's
    _VirtualNode, not a radix node, and continues in the session's own row: it shares nothing and reads
    its whole row (before, the build raised and the scheduler died on the session's second turn)."""
    from sglang.srt.mem_cache.session_aware_cache import _VirtualNode

    sim = RadixSim()
    prompt = sim.tokens(20)
    sim.run_to_cache(prompt)
    batch = sim.prefill([sim.new_req(prompt + sim.fresh(3)) for _ in range(3)])
    batch[2].last_node = _VirtualNode()
    seq_lens = sim.prepare_decode(batch)
    d = build_decode_kv_tree(batch, sim.req_to_token, seq_lens)
    d.tree.validate()
    indptr, kv = d.tree.node_indptr.tolist(), d.tree.kv_indices.tolist()
    for b, path in enumerate(path_nodes(d.tree)):
        row = sim.req_to_token[batch[b].req_pool_idx, :int(seq_lens[b])].tolist()
        assert [s for n in path for s in kv[indptr[n]:indptr[n + 1]]] == row
    assert len(path_nodes(d.tree)[2]) == 1  # one private root: the whole row
    assert path_nodes(d.tree)[0][0] == path_nodes(d.tree)[1][0]  # the other two still share the prompt


# ------------------------------------------------------------------------------------------- host time


def fork_batch(B: int):
    """B branches of one prompt cached in three pieces (a shared path of radix nodes), each with its
    own prefilled tokens and decoded token: B private paths below one shared node."""
    sim = RadixSim(max_reqs=B, kv_slots=300 + 80 * B)
    prompt = sim.tokens(300)
    for n in (100, 200, 300):
        sim.run_to_cache(prompt[:n])
    return sim, sim.prefill([sim.new_req(prompt + sim.fresh(4)) for _ in range(B)])


def three_level_batch(B: int, mids: int = 8):
    """A cached prompt, `mids` cached continuations of it, B requests spread over those."""
    sim = RadixSim(max_reqs=B, kv_slots=300 + 50 * mids + 80 * B)
    prompt = sim.tokens(300)
    sim.run_to_cache(prompt)
    middles = [prompt + sim.fresh(50) for _ in range(mids)]
    for m in middles:
        sim.run_to_cache(m)
    return sim, sim.prefill([sim.new_req(middles[i % mids] + sim.fresh(4)) for i in range(B)])


@pytest.mark.parametrize("B", [64, 256])
@pytest.mark.parametrize("shape", ["fork", "3-level"])
def test_build_cpu_time(shape, B):
    """Host time of one decode step's tree, built from scratch and as a steady decode step (the
    builder reuses the radix part; the tails grew), timed in turns. This 2-core box's speed drifts
    3x from one run to the next, so only the ratio is bounded (measured 0.2-0.4); the host time the
    target counts is measured on the GPU host (``gpu_session.sh step-host``)."""
    sim, reqs = (fork_batch if shape == "fork" else three_level_batch)(B)
    builder = DecodeKVTreeBuilder(sim.req_to_token)
    full, steady = [], []
    for step in range(60):
        seq_lens = sim.prepare_decode(reqs)
        t = time.perf_counter()
        build_decode_kv_tree(reqs, sim.req_to_token, seq_lens)
        t1 = time.perf_counter()
        d = builder.build(reqs, seq_lens)
        t2 = time.perf_counter()
        assert d.reused_shape == (step > 0)
        full.append(t1 - t)
        steady.append(t2 - t1)
        sim.finish_decode(reqs)
    assert d.tree.num_nodes == B + (1 if shape == "fork" else 9)
    full_us, steady_us = (sorted(x[10:])[25] * 1e6 for x in (full, steady))
    print(f"KV tree {shape} B={B}: full build median {full_us:.0f} us, steady step {steady_us:.0f} us")
    assert steady_us < 0.7 * full_us


@pytest.mark.parametrize("tail_slack", [0, 3])
def test_build_into_a_buffer_writes_only_the_trees_entries(tail_slack):
    """``kv_out`` is a CUDA graph's plan buffer, shared with the rest of the plan: the build writes
    its T slots at the front and nothing past them or before the view (sentinels on both sides), and
    the slots equal a build into fresh memory. Too small a buffer is left alone."""
    sim = RadixSim()
    prompt = sim.tokens(40)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.fresh(i + 1)) for i in range(3)])
    seq_lens = sim.prepare_decode(reqs)
    fresh = DecodeKVTreeBuilder(sim.req_to_token).build(reqs, seq_lens, tail_slack=tail_slack)
    T = fresh.tree.kv_indices.numel()
    for size in (T + 7, T, T - 1):
        backing = torch.full((size + 2,), -7, dtype=torch.int32)
        kv_out = backing[1:-1]
        built = DecodeKVTreeBuilder(sim.req_to_token).build(reqs, seq_lens, kv_out=kv_out, tail_slack=tail_slack)
        assert torch.equal(built.tree.kv_indices, fresh.tree.kv_indices)
        if size >= T:
            assert built.tree.kv_indices.data_ptr() == kv_out.data_ptr()  # written in place
            assert (backing[1 + T:] == -7).all() and backing[0] == -7
        else:
            assert (backing == -7).all()  # not used at all


def test_a_window_starting_at_a_fork_point_keeps_no_empty_node():
    """Two 2-token branches on a 10-token prompt, 13 tokens each: 3-token windows start exactly where the prompt
    ends. The prompt is then outside every window: no node of it (not an empty one), and the roots are the
    tails, which move and grow, so the shape holds for all the slack."""
    sim, reqs, seq = two_branches_on_a_prompt()
    d = DecodeKVTreeBuilder(sim.req_to_token).build_window(reqs, seq, 3)
    assert torch.diff(d.tree.node_indptr).tolist() == [3, 3]
    slack = DecodeKVTreeBuilder(sim.req_to_token).build_window(reqs, seq, 3, tail_slack=4)
    assert (torch.diff(slack.tree.node_indptr) > 0).all() and slack.moving.room == 4


def test_requests_that_swap_rows_are_another_batch():
    """Same requests, same radix nodes, same retraction counts, but each now in the other's req_to_token row:
    the kept shape (whose segments are read from those rows) must not be reused (its row was not compared: a
    mutation review; SGLang 0.5.10 moves a row only with a retraction, which the count catches)."""
    sim = RadixSim()
    p = sim.tokens(20)
    sim.run_to_cache(p)
    batch = sim.prefill([sim.new_req(p + sim.fresh(2 + i)) for i in range(2)])
    seq_lens = sim.prepare_decode(batch)
    builder = DecodeKVTreeBuilder(sim.req_to_token)
    builder.build(batch, seq_lens)
    a, b = batch
    a.req_pool_idx, b.req_pool_idx = b.req_pool_idx, a.req_pool_idx
    assert not builder.same_batch_as_last(batch, seq_lens.numpy())


def test_a_window_of_no_tokens_is_refused():
    sim = RadixSim()
    reqs = sim.prefill([sim.new_req(sim.tokens(6))])
    seq_lens = sim.prepare_decode(reqs)
    builder = DecodeKVTreeBuilder(sim.req_to_token)
    with pytest.raises(ValueError, match="a sliding window of 0 tokens"):
        builder.build_window(reqs, seq_lens, 0)
    builder.build_window(reqs, seq_lens, 1).tree.validate()  # one token: the query's own


@pytest.mark.parametrize("cache", ["radix", "disabled"])
def test_a_query_of_no_tokens_is_refused(cache):
    """A request with seq_len 0 and nothing shared has no node to end at: refused by name, not planned with
    query_node -1."""
    sim = RadixSim(cache=cache)
    reqs = sim.prefill([sim.new_req(sim.fresh(6))], overlap=True)  # last_node: the root (radix) or None
    sim.prepare_decode(reqs)
    with pytest.raises(KVTreeBuildError, match="has seq_len 0: a decode query attends at least its own token"):
        build_decode_kv_tree(reqs, sim.req_to_token, torch.tensor([0]))


@pytest.mark.parametrize("spare", [-1, 0])
def test_window_room_counts_the_private_nodes_against_max_kv_tokens(spare):
    """A window tree's room is laid out for its tails and its private nodes alike: counting the tails alone, the tree
    and its room passed max_kv_tokens, the scratch entry a steady update writes."""
    sim = RadixSim(kv_slots=4096)
    prompt = sim.tokens(150)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.fresh(n)) for n in (3, 4, 5, 6)])
    seq_lens = sim.prepare_decode(reqs)
    builder, slack = DecodeKVTreeBuilder(sim.req_to_token), 4
    plain = builder.build_window(reqs, seq_lens, 41)
    grown = builder.build_window(reqs, seq_lens, 41, tail_slack=slack)
    growing = len(grown.tails.req)
    assert growing == 7 and grown.tails.num_tails == 4  # 4 tails and 3 private nodes
    limit = plain.unique_tokens + slack * growing + spare
    d = builder.build_window(reqs, seq_lens, 41, tail_slack=slack, max_kv_tokens=limit)
    assert (d.tails is not None) == (spare >= 0) and d.tree.kv_indices.numel() <= limit


def test_one_other_request_in_a_finished_ones_row_and_node_makes_another_batch():
    """The kept shape is the same batch only if every request is: replacing the last one alone, in the row and at the
    node of the one it replaces, must not reuse the shape (a check of the first request let it through)."""
    sim, batch, seq_lens, builder = kept_shape(3)
    r = batch[2]
    other = SimpleNamespace(last_node=r.last_node, req_pool_idx=r.req_pool_idx,
                            retraction_count=r.retraction_count, rid="other")
    assert not builder.same_batch_as_last(batch[:2] + [other], seq_lens.numpy())
    assert not builder.build(batch[:2] + [other], seq_lens).reused_shape


def test_a_batch_without_private_tails_gets_no_room():
    """Every query ends on its radix node (seq_len = the cached prompt's 12 tokens): there is no tail to grow, so a
    build asked for room lays out none: ``tails`` None, the tree of a build without room (a mutation review: with
    ``tails >= 0`` it returned an entry of no tails, which the step planner then had to refuse itself)."""
    sim = RadixSim()
    prompt = sim.tokens(12)
    reqs = sim.prefill([sim.new_req(prompt) for _ in range(2)])
    sim.prepare_decode(reqs)
    lens = torch.tensor([12, 12])
    room = DecodeKVTreeBuilder(sim.req_to_token).build(reqs, lens, tail_slack=8)
    assert room.tails is None
    assert_same_tree(room, DecodeKVTreeBuilder(sim.req_to_token).build(reqs, lens))
