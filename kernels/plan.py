"""Planning a tree decode step: KV-guided groups cut into cost-balanced chunks, and merge lists.

The plan is a pure function of the tree's shape and the head configuration. It is built once per
decode step on the host (the KV slot ids themselves never leave the device) and reused by every
layer.

Groups. A group is one node's KV segment plus every query whose path contains the node. Queries
are ordered by the tree's preorder (``qperm``), which makes every group's queries one contiguous
range of ``qperm``: a node's users are exactly the queries ending in its subtree.

Tiles. Stage 1 packs a group's queries x the GQA heads of one KV head as the rows of a tensor-core
tile. Groups with at most ``SMALL_ROWS`` rows (a private tail: one query) use the small tile;
bigger groups use the large tile and, past ``large_rows`` rows, are split into several query tiles.
Each query tile reads the group's KV again: the cost is that KV's bytes once more per extra tile.
Tiles of one chunk are launched next to each other so the repeat reads mostly hit L2.

Chunks. Each (group, query tile) segment is cut into chunks of near-equal cost, from the model
    cost(tile) = tokens * (KV_BYTES + padded_rows * 4 * head_dim / FLOP_PER_BYTE)
in "bytes of HBM traffic" units: KV_BYTES is a token's K and V for one head; the math term
converts the tile's tensor-core FLOPs (padded rows count: the hardware computes them) at the rate
the stage-1 kernel sustains relative to HBM bandwidth on Hopper. The step's cost adds, once per tile,
``fixed(rows)``: the Q tile load, the partial result written and read back by stage 2, and a per-program
start-up latency. The target cost per chunk is the step's cost over about ``PROGRAMS_PER_SM`` programs per
SM (of all KV heads); a tile is cut by its own cost over that target, so a chunk's fixed cost is paid in the
target, not per chunk, and chunks are never shorter than ``MIN_CHUNK_TOKENS``. Each segment's chunk count is its cost over the target,
rounded up; when that passes one wave (``PROGRAMS_PER_SM`` x SMs programs) but rounding down fits,
the segments with the largest remainders get the spare chunks instead, so that the step does not
end with a few programs in a second wave (4 requests of 8k tokens: 68 items per KV head where 66
fit; measured in ``benchmarks/results/kernels_h200_low_concurrency.md``).

Merge. Every (chunk, query) produces one partial (output normalised by its own softmax sum, plus
its log-sum-exp in base 2). Query b's partials are listed in ``merge_slots[merge_indptr[b]:...]``
in a fixed order, which stage 2 folds sequentially: no atomics, bitwise deterministic.

Host cost. The schedule (everything above, into the packed metadata layout) is computed by
``schedule.c``, built at first use with the system C compiler and called through ctypes; its
specification is the numpy implementation in ``tests/test_plan_reference.py``, which it equals bit for
bit. At decode sizes a numpy operation costs ~0.5-2 us whatever it computes, and the vectorised numpy
schedule this replaced needed about a hundred: 130-240 us of a 230-620 us plan on the H200 hosts. In C
every pass is a linear loop (counting and radix sorts) but one sort of the groups' remainders (qsort).
Measured on this repo's 2-core CPU box (medians, ``tests/test_plan.py``): ``plan_tree_decode`` for 256
queries on a 300-node tree takes ~50 us, against ~170 us with the numpy schedule; the rest is the torch
calls that allocate and upload.
"""
from __future__ import annotations

import operator
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .kv_tree import KVTree
from .schedule import PlanCapacityError, Schedule, ScheduleSizes
from .staging import PinnedStagingRing, thread_staging_ring

SMALL_ROWS = 16  # rows of the small tile: tl.dot needs M >= 16
# The largest head dim the kernels serve: the Triton kernel's KV blocks shrink with head_dim (padded to a power
# of two) to fit shared memory (32 tokens up to 128, 16 up to 256) and must stay a power of two of at least 16
# tokens (tl.arange, tl.dot); the Hopper kernel serves head dims 64, 80, 96, 128 and 256 (stage1_hopper.HEAD_DIMS).
MAX_HEAD_DIM = 256
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
# Stage 1 launches a (KV heads, work items) grid, and CUDA holds at most this many programs on a grid's
# second axis: ~22-30k queries of private tails in one step at most, far past a server's decode batches.
MAX_GRID_ITEMS = 65535


class PlanBuffers:
    """What a set of fixed-capacity plan buffers holds now, shared by every plan written into them. A CUDA
    graph captured with one plan replays whatever plan was written into its buffers last, so an earlier
    plan object stays valid for the buffers, but its host fields may no longer describe their step:
    ``tree_decode`` sizes its checks of q and out by the step the buffers hold."""

    __slots__ = ("num_queries", "max_kv_slot")

    def __init__(self) -> None:
        # The queries of the plan written last (its device-side counts[2]); None while one is being written,
        # and after a write that failed.
        self.num_queries: int | None = 0
        self.max_kv_slot: int | None = None  # and its TreeDecodePlan.max_kv_slot


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
    num_queries: int  # B of this step (host copy of counts[2] when planned; buffered_queries: what they hold now)
    few_merges_max_queries: int  # stage 2 takes its shape for few merges on grids of at most this many
    #                              queries (few_merges_max_queries below; 0: never)
    fixed_buffers: bool  # made with a capacity: buffers a later plan may be written into (reuse=)
    buffers: PlanBuffers | None = None  # fixed buffers: the step they hold now (a later plan's, after reuse=)
    # The largest KV slot id of the tree, when its kv_indices came on the host (tree_decode checks it against
    # the buffers without a sync); None when they came on the device, where checking would need one.
    max_kv_slot: int | None = None

    @property
    def buffered_queries(self) -> int:
        """The queries of the step this plan's buffers hold now: what its kernels read and write."""
        return self.num_queries if self.buffers is None else self.buffers.num_queries

    @property
    def buffered_max_kv_slot(self) -> int | None:
        """``max_kv_slot`` of the step this plan's buffers hold now."""
        return self.max_kv_slot if self.buffers is None else self.buffers.max_kv_slot

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

    def __post_init__(self) -> None:
        for name, value in vars(self).items():  # ints (numpy's too): a float reached schedule.c's ctypes call
            object.__setattr__(self, name, operator.index(value))
        bad = {name: value for name, value in vars(self).items() if value < 0}
        if bad:
            raise ValueError(f"PlanCapacity sizes must be >= 0, got {bad}")


def _plan_schedule(schedule: Schedule, tree: KVTree, *, group_size: int, head_dim: int, kv_elem_bytes: int,
                   num_kv_heads: int, num_sms: int, large_rows: int, programs_per_sm: int, cap_queries: int | None,
                   cap_items: int | None, kv_tokens: int | None) -> ScheduleSizes:
    """The tree's schedule into ``schedule.out`` (the packed layout), by schedule.c with this module's
    cost-model constants (read at each call: experiments and tests set them). ``kv_tokens``: the
    length of the tree's ``kv_indices``, which its ``node_indptr`` must end at (None: not checked)."""
    indptr, parent, qnode = (_host_int32(tree, name) for name in ("node_indptr", "node_parent", "query_node"))
    num_nodes = parent.numel()
    if indptr.numel() != num_nodes + 1:
        raise ValueError(f"KVTree.node_indptr has {indptr.numel()} entries for {num_nodes} nodes "
                         f"(needs {num_nodes + 1})")
    # Items index kv_indices up to indptr[-1]: past its end the kernels would gather from wild slot ids.
    if kv_tokens is not None and int(indptr[-1]) != kv_tokens:
        raise ValueError(f"KVTree.node_indptr ends at {int(indptr[-1])} but kv_indices has {kv_tokens} slots")
    return schedule.run(indptr.data_ptr(), parent.data_ptr(), num_nodes, qnode.data_ptr(), qnode.numel(),
                        group_size=group_size, head_dim=head_dim, kv_elem_bytes=kv_elem_bytes,
                        num_kv_heads=num_kv_heads, num_sms=num_sms, large_rows=large_rows,
                        programs_per_sm=programs_per_sm, small_rows=SMALL_ROWS, min_chunk_tokens=MIN_CHUNK_TOKENS,
                        flop_per_byte=FLOP_PER_BYTE, program_latency_bytes=PROGRAM_LATENCY_BYTES,
                        cap_queries=cap_queries, cap_items=cap_items)


def build_schedule(node_indptr: np.ndarray, node_parent: np.ndarray, query_node: np.ndarray, *,
                   group_size: int, head_dim: int, kv_elem_bytes: int, num_kv_heads: int, num_sms: int,
                   large_rows: int = LARGE_ROWS, programs_per_sm: int = PROGRAMS_PER_SM,
                   max_items: int | None = None):
    """The host half of planning, unpacked: returns (qperm, items [I,5], num_large, merge_indptr,
    merge_slots, num_partials), the arrays as int64. For tests and experiments: the planner itself
    uploads the packed layout."""
    tree = KVTree(torch.empty(0, dtype=torch.int32), *(torch.from_numpy(_int32_array(a, name)) for a, name in (
        (node_indptr, "node_indptr"), (node_parent, "node_parent"), (query_node, "query_node"))))
    schedule = Schedule()
    s = _plan_schedule(schedule, tree, group_size=group_size, head_dim=head_dim, kv_elem_bytes=kv_elem_bytes,
                       num_kv_heads=num_kv_heads, num_sms=num_sms, large_rows=large_rows,
                       programs_per_sm=programs_per_sm, cap_queries=None, cap_items=max_items, kv_tokens=None)
    out, B = schedule.out.astype(np.int64), len(query_node)
    items = out[s.o_items:s.o_items + s.items * ITEM_FIELDS].reshape(s.items, ITEM_FIELDS)
    return (out[:B], items, s.large_items, out[s.o_indptr:s.o_indptr + B + 1], out[s.o_slots:s.o_slots + s.partials],
            s.partials)


def _int32_array(a, name: str) -> np.ndarray:
    """``a`` as int32, refusing values int32 cannot hold (a cast would wrap them into other, valid-looking ids)."""
    a = np.asarray(a)
    if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name} holds values past int32's range")
    return a.astype(np.int32)


_THREAD_SCHEDULES = threading.local()


def _thread_schedule() -> Schedule:
    """This thread's schedule buffers, for ``plan_tree_decode`` (a fresh planner per call): so that a call
    allocates no host buffers. Per thread because a schedule's buffer is rewritten by each plan."""
    schedule = getattr(_THREAD_SCHEDULES, "schedule", None)
    if schedule is None:
        schedule = _THREAD_SCHEDULES.schedule = Schedule()
    return schedule


def _check_int32_vector(tree: KVTree, name: str) -> torch.Tensor:
    """``tree.<name>``, refused unless a 1-D int32 tensor (checked without reading it). A cast would be
    wrong, not lenient: an int64 slot or node id past 2**31 would wrap into another, valid one."""
    t = getattr(tree, name)
    if t.dtype != torch.int32 or t.dim() != 1:
        raise ValueError(f"KVTree.{name} must be a 1-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    return t


def _host_int32(tree: KVTree, name: str) -> torch.Tensor:
    """``tree.<name>`` as a contiguous host tensor (a copy from the device synchronises: pass host tensors)."""
    return _check_int32_vector(tree, name).cpu().contiguous()


_SMS: dict[torch.device, int] = {}


def named_device(device: torch.device) -> torch.device:
    """``device`` with its index: "cuda" means the current device, which a process may change."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _plan_device(device: torch.device | str | None, tree: KVTree, reuse: TreeDecodePlan | None) -> torch.device:
    """The device a plan is made for: the one given, else the buffers' when writing into ``reuse``'s (the
    tree's metadata may well be on the host), else that of ``tree.kv_indices``; with its index (``named_device``), so
    that "cuda" and "cuda:0" find the same staging ring instead of a new one each (page-locked memory and events)."""
    if device is not None:
        return named_device(torch.device(device))
    return reuse.meta.device if reuse is not None else tree.kv_indices.device


def sm_count(device: torch.device) -> int:
    """The SMs the planner balances its items over (``plan_limits`` sizes a server's plan buffers by the same)."""
    if device.type != "cuda":
        return 8  # CPU / interpreter: only the shape of the plan matters
    device = named_device(device)
    sms = _SMS.get(device)
    if sms is None:  # per device once: the properties call costs microseconds of every plan
        sms = _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return sms


def few_merges_max_queries(num_sms: int, num_qo_heads: int, graph_batch_sizes: Sequence[int] | None = None) -> int:
    """The largest grid of queries whose stage 2 takes its shape for few merges: at most one (query,
    head) merge per SM (``tree_decode.stage2_shape``), and one of ``graph_batch_sizes``, the batch
    sizes a CUDA-graph runner captures and pads every batch up to (default: every power of two, all of
    which are among SGLang's default sizes 1, 2, 4, 8, 12, 16, 24, ...). Because the threshold is itself
    a captured size, a batch of B queries and the graph it replays in (padded to the smallest captured
    size >= B) fall on the same side of it, so an eager step and a graph replay merge bitwise alike. On
    132 SMs at 40 heads per rank one merge per SM allows 3 queries, but a batch of 3 replays in the graph
    of 4; the threshold is then 2. 0 when not even one query fits."""
    fit = num_sms // num_qo_heads
    if graph_batch_sizes is None:
        return 1 << (fit.bit_length() - 1) if fit else 0
    return max((size for size in graph_batch_sizes if size <= fit), default=0)


class TreeDecodePlanner:
    """Plans the decode steps of one head configuration into device buffers.

    Holds the host buffers a plan is built in (the schedule's packed layout, page-locked staging for
    its upload) and the last plan's item ends (``items_ending_at``); ``plan`` returns exactly what
    ``plan_tree_decode`` with the same arguments returns. Hold one per head configuration and call it
    every step; not thread-safe.
    """

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, *,
                 kv_dtype: torch.dtype = torch.bfloat16, large_rows: int = LARGE_ROWS,
                 programs_per_sm: int = PROGRAMS_PER_SM, staging: PinnedStagingRing | None = None,
                 schedule: Schedule | None = None, graph_batch_sizes: Sequence[int] | None = None) -> None:
        # Python ints (operator.index takes numpy's and refuses floats): they reach the C schedule and int methods.
        num_qo_heads, num_kv_heads, head_dim = map(operator.index, (num_qo_heads, num_kv_heads, head_dim))
        large_rows, programs_per_sm = operator.index(large_rows), operator.index(programs_per_sm)
        if min(num_qo_heads, num_kv_heads, head_dim) < 1:
            raise ValueError(f"heads and head_dim must be >= 1, got num_qo_heads={num_qo_heads}, "
                             f"num_kv_heads={num_kv_heads}, head_dim={head_dim}")
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads={num_qo_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        if head_dim > MAX_HEAD_DIM:
            raise ValueError(f"head_dim={head_dim} is above the {MAX_HEAD_DIM} deft's kernels serve")
        if large_rows < SMALL_ROWS or large_rows & (large_rows - 1):
            raise ValueError(f"large_rows must be a power of two >= {SMALL_ROWS}, got {large_rows}")
        if num_qo_heads // num_kv_heads > large_rows:
            raise ValueError(f"{num_qo_heads // num_kv_heads} query heads per KV head do not fit a tile of "
                             f"{large_rows} rows")
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.kv_dtype, self.large_rows, self.programs_per_sm = kv_dtype, large_rows, programs_per_sm
        self._schedule = schedule or Schedule()
        # For the plan's device: the one given, else made at the first plan.
        self._staging: PinnedStagingRing | None = staging
        self._item_start: np.ndarray | None = None  # the last plan's items' KV starts and ends, in item order
        self._item_end: np.ndarray | None = None
        self.graph_batch_sizes = None if graph_batch_sizes is None else sorted(set(graph_batch_sizes))
        self._few_merges: dict[int, int] = {}  # few_merges_max_queries by SM count

    def _few_merges_max_queries(self, num_sms: int) -> int:
        few = self._few_merges.get(num_sms)
        if few is None:
            few = self._few_merges[num_sms] = few_merges_max_queries(num_sms, self.num_qo_heads,
                                                                     self.graph_batch_sizes)
        return few

    def items_ending_at(self, positions: np.ndarray) -> np.ndarray | None:
        """For each KV position, the index (in the last plan's ``items``) of the one item whose KV
        range ends there; None when some position has no such item or several (a node split into
        query tiles). Lets a caller grow a node in place: its last item's ``kv_len`` + 1. Empty nodes
        have no items: the end of an empty node is answered with the item of whichever node ends
        there (its parent's), so ask only for nodes that hold tokens (the step planner's tails do)."""
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

    def items_starting_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Every item (index in the last plan's ``items``) whose KV range starts at one of ``positions``, and its
        kv_len; None when some position has none. A node split into query tiles starts one item per tile there.
        Lets a caller move a node's start in place: each such item's ``kv_start`` + 1, ``kv_len`` - 1. Ask only
        for nodes that hold tokens (an empty node has no items; another node's may start where it does)."""
        starts = self._item_start
        if starts is None:
            return None
        hit = np.isin(starts, positions)
        if not np.isin(positions, starts[hit]).all():
            return None
        items = np.flatnonzero(hit)
        return items, self._item_end[items] - starts[items]

    def _upload(self, host: np.ndarray, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
        if self._staging is None or self._staging.device != device:
            self._staging = PinnedStagingRing(device)
        return self._staging.upload(host, out)

    def _upload_host_kv(self, kv_indices: torch.Tensor, device: torch.device,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """Host slot ids copied for the plan, never held by reference: the plan's slot bound is checked on these
        values, which the caller may change once ``plan`` returns. To a GPU through the staging ring, because a
        plain ``.to()`` waits for the stream (a copy from pageable memory) and an asynchronous copy from the
        caller's memory would read it after ``plan`` returned."""
        if device.type == "cpu":  # (a plan of its own; fixed buffers on the CPU are written by a plain copy)
            # numpy's copy, not torch's: past 32K elements torch splits a copy over its OpenMP threads, which beside
            # another busy process (two pytest workers on two cores) took 11.5 ms a plan instead of 0.2
            return torch.from_numpy(np.array(kv_indices.numpy(), order="C"))
        return self._upload(kv_indices.numpy(), device, out)

    def plan(self, tree: KVTree, device: torch.device | str | None = None, *, capacity: PlanCapacity | None = None,
             reuse: TreeDecodePlan | None = None) -> TreeDecodePlan:
        """Plan one decode step over ``tree``; arguments as in ``plan_tree_decode``."""
        Hq, Hkv, D = self.num_qo_heads, self.num_kv_heads, self.head_dim
        device = _plan_device(device, tree, reuse)
        _check_int32_vector(tree, "kv_indices")
        if reuse is not None:
            if reuse.meta.device != device:
                raise ValueError(f"reuse= plan's buffers are on {reuse.meta.device}, not on {device}")
            # Its buffers are written in place: they must be a plan's own (not a caller's device kv_indices,
            # which a plan made without capacity holds), and their sizes are the capacity.
            if not reuse.fixed_buffers:
                raise ValueError("reuse= takes a plan made with capacity= (one without holds a caller's "
                                 "device kv_indices, which would be overwritten)")
            # A graph captured with reuse's buffers keeps its tile shape: a plan cut for other tiles
            # would leave rows uncomputed.
            if (reuse.num_qo_heads, reuse.num_kv_heads, reuse.head_dim, reuse.large_rows) != (
                    Hq, Hkv, D, self.large_rows):
                raise ValueError("reuse= plan was made for another head configuration or tile size")
            own = _capacity_of(reuse)
            if capacity is not None and capacity != own:
                raise ValueError(f"capacity={capacity} differs from the reused plan's buffers {own}; pass one of them")
            capacity = own
            src = tree.kv_indices
            if src.device == reuse.kv_indices.device and (
                    src.untyped_storage().data_ptr() == reuse.kv_indices.untyped_storage().data_ptr()):
                # The caller built this step's slots into the buffers themselves: from here on they hold no
                # whole step, even if this plan is refused below (the last step's counts over these slots
                # would gather K/V rows at ids its slot bound never saw).
                reuse.buffers.num_queries = reuse.buffers.max_kv_slot = None
        if capacity is not None:  # before the schedule lays out host buffers of that many items
            _check_grid(capacity.max_items, "give the capacity fewer max_items")
        sms = sm_count(device)

        def schedule(cap_items: int | None) -> ScheduleSizes:
            return _plan_schedule(self._schedule, tree, group_size=Hq // Hkv, head_dim=D,
                                  kv_elem_bytes=self.kv_dtype.itemsize, num_kv_heads=Hkv, num_sms=sms,
                                  large_rows=self.large_rows, programs_per_sm=self.programs_per_sm,
                                  cap_queries=capacity.max_queries if capacity else None, cap_items=cap_items,
                                  kv_tokens=tree.kv_indices.numel())

        s = schedule(capacity.max_items if capacity else None)
        if capacity is None and s.items > MAX_GRID_ITEMS >= s.tiles:
            # Split chunks took the step past the launch grid, but its query tiles fit: plan it again with
            # the grid as the cap, which coarsens the chunks (as for a fixed capacity) instead of refusing.
            s = schedule(MAX_GRID_ITEMS)
        B, T, I, P = tree.num_queries, tree.kv_indices.numel(), s.items, s.partials
        max_kv_slot = _host_max_slot(tree.kv_indices)
        if capacity is not None:
            _check_capacity(capacity, B, T, P, P)
            cap_b, cap_t, cap_i = capacity.max_queries, capacity.max_kv_tokens, capacity.max_items
            cap_p, cap_m = capacity.max_partials, capacity.max_merge
        else:
            cap_b, cap_t, cap_i, cap_p, cap_m = B, T, I, P, P
            _check_grid(I, "plan fewer queries per step")
        # Every field in one host buffer, in its place (schedule.c's layout): one copy moves them all.
        host = self._schedule.out[:s.packed_len]
        items = host[s.o_items:s.o_items + I * ITEM_FIELDS].reshape(I, ITEM_FIELDS)
        self._item_start, self._item_end = items[:, 0].copy(), items[:, 0] + items[:, 1]
        if capacity is None:
            meta = self._upload(host, device)
            if tree.kv_indices.device.type == "cpu":
                kv_indices = self._upload_host_kv(tree.kv_indices, device)
            else:  # held where it is (the kernels index it as contiguous int32)
                kv_indices = tree.kv_indices.to(device=device).contiguous()
            partial_out = torch.empty(max(cap_p, 1), Hq, D, dtype=torch.float32, device=device)
            partial_lse = torch.empty(max(cap_p, 1), Hq, dtype=torch.float32, device=device)
        else:
            if reuse is None:
                meta = torch.zeros(s.o_slots + cap_m, dtype=torch.int32, device=device)
                kv_indices = torch.empty(cap_t, dtype=torch.int32, device=device)
                partial_out = torch.empty(cap_p, Hq, D, dtype=torch.float32, device=device)
                partial_lse = torch.empty(cap_p, Hq, dtype=torch.float32, device=device)
                buffers = PlanBuffers()
            else:
                meta, kv_indices = reuse.meta, reuse.kv_indices
                partial_out, partial_lse = reuse.partial_out, reuse.partial_lse
                buffers = reuse.buffers
            # Until this step is written whole, the buffers hold no step: a write that fails half-way leaves
            # every plan of these buffers refused by tree_decode, not reading one step's slots by another's counts.
            buffers.num_queries = buffers.max_kv_slot = None
            src = tree.kv_indices
            if src.data_ptr() != kv_indices.data_ptr() or not src.is_contiguous():  # else built in place (the
                # DecodeKVTreeBuilder's kv_out); a view of these buffers laid out otherwise is copied out first
                if src.device == kv_indices.device and (
                        src.untyped_storage().data_ptr() == kv_indices.untyped_storage().data_ptr()):
                    src = src.clone()
                if src.device.type == "cpu" and kv_indices.device.type != "cpu":
                    self._upload_host_kv(src, kv_indices.device, kv_indices)
                else:
                    kv_indices[:T].copy_(src, non_blocking=True)
            # The gaps between the fields (entries past this step's sizes) are never read.
            self._upload(host, device, meta)
            buffers.num_queries, buffers.max_kv_slot = B, max_kv_slot
        # The fields as views of meta, cut by one split (each torch call costs microseconds of host time).
        ends = (cap_b, s.o_items, s.o_items + cap_i * ITEM_FIELDS, s.o_counts, s.o_counts + 3, s.o_indptr,
                s.o_indptr + cap_b + 1, s.o_slots, meta.numel())
        parts = meta.split([b - a for a, b in zip((0,) + ends[:-1], ends)])
        return TreeDecodePlan(
            meta=meta, kv_indices=kv_indices, qperm=parts[0], items=parts[2].view(cap_i, ITEM_FIELDS),
            counts=parts[4], merge_indptr=parts[6], merge_slots=parts[8], partial_out=partial_out,
            partial_lse=partial_lse, num_qo_heads=Hq, num_kv_heads=Hkv, head_dim=D, large_rows=self.large_rows,
            grid_items=cap_i, grid_queries=cap_b, num_queries=B,
            # Written into reuse's buffers, the plan keeps their threshold too: a graph captured with
            # them merges in that shape whatever graph sizes this planner was given.
            few_merges_max_queries=(reuse.few_merges_max_queries if reuse is not None
                                    else self._few_merges_max_queries(sms)),
            fixed_buffers=capacity is not None, buffers=buffers if capacity is not None else None,
            max_kv_slot=max_kv_slot)


def plan_tree_decode(tree: KVTree, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                     device: torch.device | str | None = None, *, kv_dtype: torch.dtype = torch.bfloat16,
                     large_rows: int = LARGE_ROWS, programs_per_sm: int = PROGRAMS_PER_SM,
                     capacity: PlanCapacity | None = None, reuse: TreeDecodePlan | None = None,
                     graph_batch_sizes: Sequence[int] | None = None) -> TreeDecodePlan:
    """Plan one decode step over ``tree``.

    ``device`` defaults to the device of ``reuse``'s buffers, else of ``tree.kv_indices``. Node and
    query metadata are read on the host (pass them as CPU tensors to avoid a device sync);
    ``kv_indices`` on the plan's device is used where it is (without ``capacity`` the plan holds the caller's
    tensor if it is contiguous int32 there: change it and the plan reads the new ids; otherwise a copy); host ``kv_indices`` are checked (slot ids >= 0, the
    largest against the KV buffer at each ``tree_decode``) and copied, without waiting for the device.
    With ``capacity``, buffers have fixed sizes and launch grids cover the capacity (programs past
    the device-side counts exit at once), so a CUDA graph captured with the plan replays with any
    later plan written into the same buffers via ``reuse=plan`` (which keeps that plan's capacity and
    stage-2 threshold; ``plan`` must have been made with a capacity). ``graph_batch_sizes``: the batch
    sizes a CUDA-graph runner pads batches to, if not every power of two (``few_merges_max_queries``).
    """
    device = _plan_device(device, tree, reuse)
    # A fresh planner with this thread's staging ring and schedule buffers, so that a call allocates no
    # page-locked memory, event or host buffer (with the ring's cached views, 249 -> 242 and 318 -> 304 us
    # a plan on two H200 hosts: benchmarks/experiments/plan_host_time.py).
    planner = TreeDecodePlanner(num_qo_heads, num_kv_heads, head_dim, kv_dtype=kv_dtype, large_rows=large_rows,
                                programs_per_sm=programs_per_sm, staging=thread_staging_ring(device),
                                schedule=_thread_schedule(), graph_batch_sizes=graph_batch_sizes)
    return planner.plan(tree, device, capacity=capacity, reuse=reuse)


def _capacity_of(plan: TreeDecodePlan) -> PlanCapacity:
    return PlanCapacity(max_queries=plan.qperm.numel(), max_kv_tokens=plan.kv_indices.numel(),
                        max_items=plan.items.shape[0], max_partials=plan.partial_out.shape[0],
                        max_merge=plan.merge_slots.numel())


def _host_max_slot(kv_indices: torch.Tensor) -> int | None:
    """The largest slot id of host ``kv_indices`` (-1 when empty), refusing negative ones; None on a device.

    The kernels gather K/V rows at these ids unchecked (a per-layer check would need a sync), so on the
    host, where it costs one pass and no sync, a wrong id becomes an error instead of a read out of bounds."""
    if kv_indices.device.type != "cpu":
        return None
    if not kv_indices.numel():
        return -1
    ids = kv_indices.numpy()
    low = int(ids.min())
    if low < 0:
        raise ValueError(f"KVTree.kv_indices holds slot {low}: KV slot ids must be >= 0")
    return int(ids.max())


def _check_grid(items: int, fix: str) -> None:
    if items > MAX_GRID_ITEMS:
        raise ValueError(f"{items} work items per KV head: stage 1's launch grid holds at most {MAX_GRID_ITEMS} "
                         f"(CUDA's limit on a grid's second axis); {fix}")


def _check_capacity(cap: PlanCapacity, B: int, T: int, M: int, P: int) -> None:
    for what, need, have in (("queries", B, cap.max_queries), ("KV tokens", T, cap.max_kv_tokens),
                             ("merge entries", M, cap.max_merge), ("partials", P, cap.max_partials)):
        if need > have:
            raise PlanCapacityError(f"the tree needs {need} {what}, more than the plan capacity {have}")
