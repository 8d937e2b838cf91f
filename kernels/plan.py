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
the stage-1 kernel sustains relative to HBM bandwidth on Hopper; ``fixed`` is the Q tile load, the
partial result written and read back by stage 2, and a per-program start-up latency. Chunks are
sized so that the whole step makes about ``PROGRAMS_PER_SM`` programs per SM (of all KV heads), and
never shorter than ``MIN_CHUNK_TOKENS``.

Merge. Every (chunk, query) produces one partial (output normalised by its own softmax sum, plus
its log-sum-exp in base 2). Query b's partials are listed in ``merge_slots[merge_indptr[b]:...]``
in a fixed order, which stage 2 folds sequentially: no atomics, bitwise deterministic.

Host cost. At decode sizes (hundreds of nodes) a numpy operation costs ~0.5 us whatever it computes,
so the host code keeps their number down (about a hundred per plan): the preorder by pointer
doubling rather than a Python walk over the nodes, one stable sort of one key for the item order,
16-bit radix sorts, one packed int32 buffer (one host-to-device copy). Measured on this repo's
2-core CPU box (medians, ``tests/test_plan.py``): ``plan_tree_decode`` for 256 queries on a 300-node
tree takes ~135 us (243 us before this layout); on the H200 host, device copies included, 230 us
(375 before); a one-node tree still takes ~90 us: the cost is the number of numpy and torch calls.

Incremental planning. Between decode steps the tree usually keeps its shape and only the private
tails grow. The schedule is computed in three stages, each a pure function of fewer inputs than the
next: the groups (of ``node_parent``, ``query_node``, which nodes are empty, and the head
configuration: preorder, ``qperm``, query tiles, cost terms), the work items (of the groups and the
number of chunks per group) and the merge lists (of the items and their order). ``TreeDecodePlanner``
keeps the last step's stage inputs and outputs and reuses each stage whose inputs are equal, so its
plan is exactly the plan ``plan_tree_decode`` would make. A step whose tails merely grew recomputes
only the chunk counts, the items' KV ranges and their order: ~50 us instead of ~135 us for the tree
above (``test_planner_cpu_time_per_decode_step``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .kv_tree import KVTree
from .staging import PinnedStagingRing, thread_staging_ring

SMALL_ROWS = 16  # rows of the small tile: tl.dot needs M >= 16
LARGE_ROWS = 64  # default rows of the large tile
# The cost model's two constants, refitted to the Hopper stage-1 kernel on the H200 (2026-11-30,
# benchmarks/results/plan_knobs_h200.json, session 10): against 100 and 16 KB (fitted to the Triton
# kernel), 200 and 64 KB made the five shared trees 2.4% faster (geomean; prefix 4k x 64 6%, 1k x 256
# 3%), no sharing 1.4%, the rest within 1%. Both agree with how the kernel spends its time
# (benchmarks/experiments/block_latency.py): a 64-row tile costs a program about what a 16-row one
# does per KV block (0.72 against 0.71 us alone on an SM), so the math term is small, and a program's
# start-up (item, indices, first K/V, Q, and the partials' store) costs several blocks' worth of loads.
FLOP_PER_BYTE = 200.0  # tensor-core FLOP rate / HBM bytes rate the stage-1 kernel reaches (bf16)
PROGRAM_LATENCY_BYTES = 64 * 1024  # a program's start-up cost, in bytes the SM could have moved
PROGRAMS_PER_SM = 4  # H200 sweeps over 1-8 (sweep_stage1_h200.md, plan_knobs_h200.json): 4 best overall
# H200, the Hopper stage-1 kernel, 2026-11-30 (benchmarks/results/plan_knobs_h200.json): 256 against 128
# made prefix 4k x 16 and the speculative tree 5% faster (fewer partials to merge for the same
# wave of programs), every other case within 1%; 64 and 512 were slower.
MIN_CHUNK_TOKENS = 256
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


# ---------------------------------------------------------------------------------------------------
# The schedule, in three stages, each a pure function of fewer inputs than the next: the groups of the
# tree's shape, the work items of a chunk count per group, and the merge lists of an item order.
# A planner that keeps a stage's inputs and output reuses the output while the inputs repeat.


class _Groups(NamedTuple):
    """The KV-guided groups of one tree shape (node_parent, query_node, which nodes are empty) and
    head configuration: everything planning needs that the node lengths do not change."""

    qperm: np.ndarray  # [B] queries in tree preorder
    node: np.ndarray  # [G] group g is node[g] (non-empty, with users); ascending
    q_lo: np.ndarray  # [G] its queries are qperm[q_lo[g]:q_hi[g]]
    q_hi: np.ndarray  # [G]
    small: np.ndarray  # [G] bool: its queries fit one small tile
    tiles: np.ndarray  # [G] query tiles (1 when small)
    tile_group: np.ndarray  # [n_tiles] every query tile's group, group after group
    cost_per_token: np.ndarray  # [G] float: the cost model's per-token term of the group's tiles
    fixed_cost: int  # the cost model's fixed terms, summed over all tiles


def _stable_argsort(keys: np.ndarray, bound: int) -> np.ndarray:
    """``keys.argsort(kind="stable")`` for keys in [0, bound]: numpy sorts 16-bit keys by radix,
    3-4x faster at a few hundred keys (a stable order is unique: the result is the same)."""
    return (keys.astype(np.uint16) if bound < 1 << 16 else keys).argsort(kind="stable")


def _preorder_ranges(node_parent: np.ndarray, query_node: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) per node: with queries stably sorted by their node's preorder (children in index
    order), node i's users (the queries ending in its subtree) are positions [lo[i], hi[i]).

    Vectorised by pointer doubling, O(N log depth): a Python walk over the nodes cost 44 us at
    300 nodes here, this 24 us (52 us on a 300-deep chain)."""
    n = len(node_parent)
    # Parent links plus a sentinel n, "above the roots", that points to itself and holds nothing.
    up = np.empty(n + 1, np.int64)
    up[:n] = node_parent
    up[n] = n
    up[up < 0] = n
    ends = np.bincount(query_node, minlength=n + 1)  # queries ending at each node
    # Subtree sizes: after round k, size[i] counts the queries ending less than 2^k levels below i;
    # round k adds, from every node exactly 2^k levels below i, its own such count (float weights:
    # exact for these counts). The sentinel's entry collects garbage and is never read.
    size = ends.astype(np.float64)
    jumps = []  # jumps[k][i]: i's ancestor 2^k levels up (or the sentinel)
    jump = up
    while jump.min() < n:
        size += np.bincount(jump, size, n + 1)
        jumps.append(jump)
        jump = jump[jump]
    size = size.astype(np.int64)
    # lo[i] - lo[parent]: the parent's own queries, then the subtrees of i's earlier siblings.
    sib = _stable_argsort(up[:n], n)  # siblings adjacent, in index order
    sib_parent, sib_size = up[sib], size[sib]
    before = np.add.accumulate(sib_size) - sib_size
    rel = ends[up]  # the sentinel's entry stays 0
    rel[sib] += before - before[sib_parent.searchsorted(sib_parent)]
    # lo: the sums of rel along the root paths, again by doubling.
    for jump in jumps:
        rel += rel[jump]
    lo = rel[:n]
    return lo, lo + size[:n]


def _tree_groups(node_parent: np.ndarray, query_node: np.ndarray, nonempty: np.ndarray, *, group_size: int,
                 head_dim: int, kv_elem_bytes: int, large_rows: int) -> _Groups:
    lo, hi = _preorder_ranges(node_parent, query_node)
    # Nodes holding queries get distinct lo, ordered like their preorder: sorting by lo is sorting by preorder.
    qperm = _stable_argsort(lo[query_node], len(query_node))
    node = ((hi > lo) & nonempty).nonzero()[0]
    q_lo, q_hi = lo[node], hi[node]
    q_n = q_hi - q_lo
    small = q_n <= SMALL_ROWS // group_size  # never when one query's heads overflow the small tile
    # A small group's queries fit one large tile too (large_rows >= SMALL_ROWS), so this is 1 for it.
    large_q = max(large_rows // group_size, 1)
    tiles = (q_n + (large_q - 1)) // large_q
    tile_group = np.arange(len(node)).repeat(tiles)
    # Cost model (module doc): per tile, tokens * (KV bytes + math) + fixed(rows).
    kv_bytes = 2 * head_dim * kv_elem_bytes
    cost_per_token = np.where(small, kv_bytes + SMALL_ROWS * 4 * head_dim / FLOP_PER_BYTE,
                              kv_bytes + large_rows * 4 * head_dim / FLOP_PER_BYTE)
    n_tiles, n_small = len(tile_group), int(np.count_nonzero(small))
    rows = n_small * SMALL_ROWS + (n_tiles - n_small) * large_rows
    fixed_cost = (n_tiles * PROGRAM_LATENCY_BYTES + rows * head_dim * kv_elem_bytes
                  + 2 * int(np.add.reduce(q_n)) * group_size * head_dim * 4)
    return _Groups(qperm, node, q_lo, q_hi, small, tiles, tile_group, cost_per_token, fixed_cost)


def _chunk_counts(groups: _Groups, g_len: np.ndarray, *, num_kv_heads: int, num_sms: int, programs_per_sm: int,
                  max_items: int | None) -> np.ndarray:
    """Chunks per group (every query tile of a group is cut alike), sized so that the step makes
    about programs_per_sm programs per SM; see the module doc."""
    n_tiles = len(groups.tile_group)
    if max_items is not None and n_tiles > max_items:
        raise ValueError(f"the tree needs {n_tiles} work items, more than the plan capacity {max_items}")
    cost = g_len * groups.cost_per_token
    target_items = max(1, (programs_per_sm * num_sms) // max(num_kv_heads, 1))
    # Summed over the tiles in tile order, not per group times its tiles: float addition is not
    # associative, and this total decides every chunk count.
    target = max(float(cost[groups.tile_group].sum() + groups.fixed_cost) / target_items, 1.0)
    max_chunks = np.maximum(g_len // MIN_CHUNK_TOKENS, 1)
    # cost > 0 (groups are non-empty), so every group gets at least one chunk.
    nchunks = np.minimum(np.ceil(cost / target).astype(np.int64), max_chunks)
    # Coarsen the chunks until the plan fits a fixed capacity.
    while max_items is not None and int(np.add.reduce(nchunks * groups.tiles)) > max_items:
        target *= 1.5
        nchunks = np.minimum(np.ceil(cost / target).astype(np.int64), max_chunks)
    return nchunks


class _Items(NamedTuple):
    """The work items of one chunking, group after group; in a group, chunk after chunk (in KV
    order), each chunk's query tiles in query order. That is (kv_start, q_start) order."""

    node: np.ndarray  # [I] the item's node
    chunk: np.ndarray  # [I] the item is chunk k
    chunk_end: np.ndarray  # [I] k + 1
    chunks: np.ndarray  # [I] of n
    q_start: np.ndarray  # [I]
    q_count: np.ndarray  # [I]
    small: np.ndarray  # [I] bool: small-tile item


def _work_items(groups: _Groups, nchunks: np.ndarray, *, group_size: int, large_rows: int) -> _Items:
    large_q = max(large_rows // group_size, 1)
    per_group = nchunks * groups.tiles
    item_group = np.arange(len(per_group)).repeat(per_group)
    j = np.arange(len(item_group)) - (np.add.accumulate(per_group) - per_group)[item_group]
    tiles = groups.tiles[item_group]
    chunk = j // tiles
    q_start = groups.q_lo[item_group] + (j - chunk * tiles) * large_q
    q_count = np.minimum(groups.q_hi[item_group] - q_start, large_q)
    return _Items(groups.node[item_group], chunk, chunk + 1, nchunks[item_group], q_start, q_count,
                  groups.small[item_group])


def _item_extents(items: _Items, node_indptr: np.ndarray, seg_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kv_start, kv_len) of every item: chunk k of n covers [len * k // n, len * (k + 1) // n)."""
    length = seg_len[items.node]
    start = (length * items.chunk) // items.chunks
    end = (length * items.chunk_end) // items.chunks
    return node_indptr[items.node] + start, end - start


def _item_order(items: _Items, kv_len: np.ndarray, num_kv_tokens: int) -> np.ndarray:
    """Large items first, longest first (a tail of short programs balances the SMs); ties keep the
    (kv_start, q_start) order, so query tiles of one chunk stay adjacent (they read the same KV, so
    the repeat reads hit L2); then small items, alike: one stable sort of one key (lengths lie in
    [1, num_kv_tokens], so large items' keys are negative, small items' positive)."""
    return (items.small * (num_kv_tokens + 1) - kv_len).argsort(kind="stable")


class _Merge(NamedTuple):
    """Everything an item order fixes: the items' query fields and the merge lists."""

    q_start: np.ndarray  # [I] of the items in order
    q_count: np.ndarray  # [I]
    slot: np.ndarray  # [I] the item's first partial
    num_large: int
    merge_indptr: np.ndarray  # [B + 1]
    merge_slots: np.ndarray  # [M]
    num_partials: int


def _merge_lists(qperm: np.ndarray, items: _Items, order: np.ndarray) -> _Merge:
    q_start, q_count = items.q_start[order], items.q_count[order]
    ends = np.add.accumulate(q_count)
    slot = ends - q_count
    num_partials = int(ends[-1]) if len(ends) else 0
    # Merge lists: query at qperm position p gets slot(item) + (p - q_start) from every item
    # covering p, in item order (fixed, so stage 2 is deterministic).
    query_of_slot = qperm[(q_start - slot).repeat(q_count) + np.arange(num_partials)]
    B = len(qperm)
    merge_slots = _stable_argsort(query_of_slot, B)
    merge_indptr = np.zeros(B + 1, dtype=np.int64)
    np.add.accumulate(np.bincount(query_of_slot, minlength=B), out=merge_indptr[1:])
    num_large = len(order) - int(np.count_nonzero(items.small))
    return _Merge(q_start, q_count, slot, num_large, merge_indptr, merge_slots, num_partials)


class _ScheduleCache:
    """One planner's memory of the last step: each stage's inputs and output. A stage whose inputs
    repeat returns its kept output, so a step plans exactly what a fresh build would."""

    def __init__(self) -> None:
        self._groups_key: tuple | None = None
        self._groups: _Groups | None = None
        self._nchunks: bytes | None = None
        self._items: _Items | None = None
        self._order: bytes | None = None
        self._merge: _Merge | None = None

    def schedule(self, node_indptr: np.ndarray, node_parent: np.ndarray, query_node: np.ndarray, *,
                 group_size: int, head_dim: int, kv_elem_bytes: int, num_kv_heads: int, num_sms: int,
                 large_rows: int, programs_per_sm: int, max_items: int | None):
        """(qperm, kv_start [I], kv_len [I], order [I], merge): items before ordering and their order."""
        seg_len = node_indptr[1:] - node_indptr[:-1]
        nonempty = seg_len > 0
        # Everything the groups are a function of (an array is its dtype and bytes).
        key = (node_parent.dtype, node_parent.tobytes(), query_node.dtype, query_node.tobytes(), nonempty.tobytes(),
               group_size, head_dim, kv_elem_bytes, large_rows)
        if key != self._groups_key:
            self._groups = _tree_groups(node_parent, query_node, nonempty, group_size=group_size,
                                        head_dim=head_dim, kv_elem_bytes=kv_elem_bytes, large_rows=large_rows)
            self._groups_key, self._nchunks = key, None
        groups = self._groups
        nchunks = _chunk_counts(groups, seg_len[groups.node], num_kv_heads=num_kv_heads, num_sms=num_sms,
                                programs_per_sm=programs_per_sm, max_items=max_items)
        nchunks_key = nchunks.tobytes()
        if nchunks_key != self._nchunks:
            self._items = _work_items(groups, nchunks, group_size=group_size, large_rows=large_rows)
            self._nchunks, self._order = nchunks_key, None
        items = self._items
        kv_start, kv_len = _item_extents(items, node_indptr, seg_len)
        order = _item_order(items, kv_len, int(node_indptr[-1]))
        order_key = order.tobytes()
        if order_key != self._order:
            self._merge = _merge_lists(groups.qperm, items, order)
            self._order = order_key
        return groups.qperm, kv_start, kv_len, order, self._merge


def _write_items(out: np.ndarray, kv_start: np.ndarray, kv_len: np.ndarray, merge: _Merge) -> None:
    """The items into ``out`` [I, 5] (of any integer dtype); kv_start and kv_len in item order."""
    out[:, 0] = kv_start
    out[:, 1] = kv_len
    out[:, 2] = merge.q_start
    out[:, 3] = merge.q_count
    out[:, 4] = merge.slot


def build_schedule(node_indptr: np.ndarray, node_parent: np.ndarray, query_node: np.ndarray, *,
                   group_size: int, head_dim: int, kv_elem_bytes: int, num_kv_heads: int, num_sms: int,
                   large_rows: int = LARGE_ROWS, programs_per_sm: int = PROGRAMS_PER_SM,
                   max_items: int | None = None):
    """The host half of planning: returns (qperm, items [I,5], num_large, merge_indptr, merge_slots,
    num_partials) as numpy int arrays. Pure; exposed for the planner-invariant tests."""
    qperm, kv_start, kv_len, order, merge = _ScheduleCache().schedule(
        node_indptr, node_parent, query_node, group_size=group_size, head_dim=head_dim,
        kv_elem_bytes=kv_elem_bytes, num_kv_heads=num_kv_heads, num_sms=num_sms, large_rows=large_rows,
        programs_per_sm=programs_per_sm, max_items=max_items)
    items = np.empty((len(order), ITEM_FIELDS), np.int64)
    _write_items(items, kv_start[order], kv_len[order], merge)
    return qperm, items, merge.num_large, merge.merge_indptr, merge.merge_slots, merge.num_partials


def _host_int32(t: torch.Tensor) -> np.ndarray:
    return np.asarray(t.numpy(force=True), np.int32)


def _aligned(offset: int) -> int:
    """``offset`` (in int32 elements) rounded up to 16 bytes."""
    return -(-offset // 4) * 4


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # CPU / interpreter: only the shape of the plan matters


class TreeDecodePlanner:
    """Plans the decode steps of one head configuration, remembering the last step.

    ``plan`` returns exactly what ``plan_tree_decode`` with the same arguments returns, but each
    stage of the schedule whose inputs equal the last step's is taken from that step (see
    "Incremental planning" in the module doc). Hold one per head configuration and call it every step.
    """

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, *,
                 kv_dtype: torch.dtype = torch.bfloat16, large_rows: int = LARGE_ROWS,
                 programs_per_sm: int = PROGRAMS_PER_SM, staging: PinnedStagingRing | None = None) -> None:
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads={num_qo_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        if large_rows < SMALL_ROWS or large_rows & (large_rows - 1):
            raise ValueError(f"large_rows must be a power of two >= {SMALL_ROWS}, got {large_rows}")
        if num_qo_heads // num_kv_heads > large_rows:
            raise ValueError(f"{num_qo_heads // num_kv_heads} query heads per KV head do not fit a tile of "
                             f"{large_rows} rows")
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.kv_dtype, self.large_rows, self.programs_per_sm = kv_dtype, large_rows, programs_per_sm
        self._cache = _ScheduleCache()
        # For the plan's device: the one given, else made at the first plan.
        self._staging: PinnedStagingRing | None = staging
        self._item_end: np.ndarray | None = None  # the last plan's items' KV ends, in item order

    def items_ending_at(self, positions: np.ndarray) -> np.ndarray | None:
        """For each KV position, the index (in the last plan's ``items``) of the one item whose KV
        range ends there; None when some position has no such item or several (a node split into
        query tiles). Lets a caller grow a node in place: its last item's ``kv_len`` + 1."""
        ends = self._item_end
        if ends is None:
            return None
        order = np.argsort(ends, kind="stable")
        sorted_ends = ends[order]
        lo = np.searchsorted(sorted_ends, positions, "left")
        hi = np.searchsorted(sorted_ends, positions, "right")
        if not np.all(hi - lo == 1):
            return None
        return order[lo]

    def _upload(self, host: np.ndarray, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
        if self._staging is None or self._staging.device != device:
            self._staging = PinnedStagingRing(device)
        return self._staging.upload(host, out)

    def plan(self, tree: KVTree, device: torch.device | str | None = None, *, capacity: PlanCapacity | None = None,
             reuse: TreeDecodePlan | None = None) -> TreeDecodePlan:
        """Plan one decode step over ``tree``; arguments as in ``plan_tree_decode``."""
        Hq, Hkv, D = self.num_qo_heads, self.num_kv_heads, self.head_dim
        device = torch.device(device) if device is not None else tree.kv_indices.device
        if reuse is not None:
            capacity = capacity or _capacity_of(reuse)
        query_node = _host_int32(tree.query_node)
        qperm, kv_start, kv_len, order, merge = self._cache.schedule(
            _host_int32(tree.node_indptr), _host_int32(tree.node_parent), query_node,
            group_size=Hq // Hkv, head_dim=D, kv_elem_bytes=self.kv_dtype.itemsize, num_kv_heads=Hkv,
            num_sms=_num_sms(device), large_rows=self.large_rows, programs_per_sm=self.programs_per_sm,
            max_items=capacity.max_items if capacity else None)
        B, T, I, M = len(query_node), tree.kv_indices.numel(), len(order), len(merge.merge_slots)
        if capacity is not None:
            _check_capacity(capacity, B, T, M, merge.num_partials)
            cap_b, cap_t, cap_i = capacity.max_queries, capacity.max_kv_tokens, capacity.max_items
            cap_p, cap_m = capacity.max_partials, capacity.max_merge
        else:
            cap_b, cap_t, cap_i, cap_p, cap_m = B, T, I, merge.num_partials, M

        # Field offsets inside the packed metadata buffer (fixed by the capacity, so views stay put
        # across steps when a plan is written into an earlier plan's buffers). Each field starts on
        # 16 bytes: Triton specialises a kernel on whether each pointer argument is 16-byte aligned,
        # so offsets that follow the batch size would compile new kernel variants as batches change
        # (seconds each, in the middle of serving).
        o_items = _aligned(cap_b)
        o_counts = _aligned(o_items + cap_i * ITEM_FIELDS)
        o_indptr = _aligned(o_counts + 3)
        o_slots = _aligned(o_indptr + cap_b + 1)
        # Every field in one host buffer, in its place: one host-to-device copy moves them all.
        host = np.zeros(o_slots + M, np.int32)
        host[:B] = qperm
        kv_start, kv_len = kv_start[order], kv_len[order]
        _write_items(host[o_items:o_items + I * ITEM_FIELDS].reshape(I, ITEM_FIELDS), kv_start, kv_len, merge)
        self._item_end = kv_start + kv_len
        host[o_counts:o_counts + 3] = (merge.num_large, I - merge.num_large, B)
        host[o_indptr:o_indptr + B + 1] = merge.merge_indptr
        host[o_indptr + B + 1:o_indptr + cap_b + 1] = merge.merge_indptr[-1]  # queries past B merge nothing
        host[o_slots:] = merge.merge_slots
        if capacity is None:
            meta = self._upload(host, device)
            kv_indices = tree.kv_indices.to(device=device, dtype=torch.int32)
            partial_out = torch.empty(max(cap_p, 1), Hq, D, dtype=torch.float32, device=device)
            partial_lse = torch.empty(max(cap_p, 1), Hq, dtype=torch.float32, device=device)
        else:
            if reuse is None:
                meta = torch.zeros(o_slots + cap_m, dtype=torch.int32, device=device)
                kv_indices = torch.empty(cap_t, dtype=torch.int32, device=device)
                partial_out = torch.empty(cap_p, Hq, D, dtype=torch.float32, device=device)
                partial_lse = torch.empty(cap_p, Hq, dtype=torch.float32, device=device)
            else:
                if (reuse.num_qo_heads, reuse.num_kv_heads, reuse.head_dim) != (Hq, Hkv, D):
                    raise ValueError("reuse= plan was made for another head configuration")
                meta, kv_indices = reuse.meta, reuse.kv_indices
                partial_out, partial_lse = reuse.partial_out, reuse.partial_lse
            if tree.kv_indices.data_ptr() != kv_indices.data_ptr():
                kv_indices[:T].copy_(tree.kv_indices, non_blocking=True)
            # else the tree was built in place (DecodeKVTreeBuilder's kv_out)
            # The gaps between the fields (entries past this step's sizes) are never read.
            self._upload(host, device, meta)
        # The fields as views of meta, cut by one split (each torch call costs microseconds of host time).
        ends = (cap_b, o_items, o_items + cap_i * ITEM_FIELDS, o_counts, o_counts + 3, o_indptr,
                o_indptr + cap_b + 1, o_slots, meta.numel())
        parts = meta.split([b - a for a, b in zip((0,) + ends[:-1], ends)])
        return TreeDecodePlan(
            meta=meta, kv_indices=kv_indices, qperm=parts[0], items=parts[2].view(cap_i, ITEM_FIELDS),
            counts=parts[4], merge_indptr=parts[6], merge_slots=parts[8], partial_out=partial_out,
            partial_lse=partial_lse, num_qo_heads=Hq, num_kv_heads=Hkv, head_dim=D, large_rows=self.large_rows,
            grid_items=cap_i, grid_queries=cap_b, num_queries=B)


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
    device = torch.device(device) if device is not None else tree.kv_indices.device
    # A fresh planner (no memory of earlier steps: this plans from scratch) with this thread's staging
    # ring, so that a call allocates no page-locked memory and no event (with the ring's cached views,
    # 249 -> 242 and 318 -> 304 us a plan on two H200 hosts: benchmarks/experiments/plan_host_time.py).
    planner = TreeDecodePlanner(num_qo_heads, num_kv_heads, head_dim, kv_dtype=kv_dtype, large_rows=large_rows,
                                programs_per_sm=programs_per_sm, staging=thread_staging_ring(device))
    return planner.plan(tree, device, capacity=capacity, reuse=reuse)


def _capacity_of(plan: TreeDecodePlan) -> PlanCapacity:
    return PlanCapacity(max_queries=plan.qperm.numel(), max_kv_tokens=plan.kv_indices.numel(),
                        max_items=plan.items.shape[0], max_partials=plan.partial_out.shape[0],
                        max_merge=plan.merge_slots.numel())


def _check_capacity(cap: PlanCapacity, B: int, T: int, M: int, P: int) -> None:
    for what, need, have in (("queries", B, cap.max_queries), ("KV tokens", T, cap.max_kv_tokens),
                             ("merge entries", M, cap.max_merge), ("partials", P, cap.max_partials)):
        if need > have:
            raise ValueError(f"the tree needs {need} {what}, more than the plan capacity {have}")
