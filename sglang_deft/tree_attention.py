"""Which implementation computes decode attention over the KV tree: the one switch point.

The backend plans once per decode step (``sglang_deft.step_planner.DecodeStepPlanner``, into its
fixed plan buffers; :func:`plan_step` for a step they do not take) and runs every layer with that
plan (:func:`run_layer`). With the reference path the plan is a ``ReferencePlan`` (the tree's node groups, KV
slots and query indices on the device, made once per step), and each layer runs ``tree_decode_reference`` (grouped
PyTorch, fp32 math). With the Triton kernels it is a ``TreeDecodePlan``.

Triton plans are held to the server's :class:`PlanLimits` (work items, partial results) in every
step a graph could replay (batches up to the plan buffers' size), eager or replayed. The limit on work
items is also how the planner chunks: it coarsens chunks until they fit ``max_items``, and the chunking
fixes the order in which each query's partials are merged. Eager steps and graph replays planned under
the same limits therefore launch the same work items with the same merge lists, and their outputs are
bitwise equal. Stage 2's launch shape is chosen against a threshold that is one of the captured batch
sizes (:func:`graph_batch_sizes`), so it is the same for a batch and the graph size it is padded to.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from sglang_deft.config_checks import decode_impl
from sglang_deft.kernels import (KVTree, PlanCapacity, PlanCapacityError, ReferencePlan, TreeDecodePlan,
                                 TreeDecodePlanner, plan_reference, plan_tree_decode, tree_decode,
                                 tree_decode_reference)
from sglang_deft.kernels import plan as kernel_plan
from sglang_deft.kernels.plan import LARGE_ROWS, PROGRAMS_PER_SM

logger = logging.getLogger(__name__)

# Tree nodes on a query's path that the partial-result buffer provides for, averaged over the batch
# (a prompt, two levels of forks and the private tail make 4).
PATH_NODES = 8


def use_triton_kernels(device: torch.device) -> bool:
    """True where the Triton tree-decode kernels replace the PyTorch reference: on CUDA devices.

    ``SGLANG_DEFT_DECODE_IMPL=reference`` forces the reference on a GPU too (to compare the two
    paths in one setup); ``=triton`` forces the kernels (on CPU they need TRITON_INTERPRET=1).
    """
    impl = decode_impl()
    if impl == "auto":
        return device.type == "cuda"
    return impl == "triton"


@dataclass(frozen=True)
class PlanLimits:
    """Work items and partial results every Triton plan of one server is held to."""

    max_items: int  # stage-1 programs per KV head; the planner coarsens chunks to stay within it
    max_partials: int  # (chunk, query) partial results; also the merge entries (one per partial)

    def capacity(self, max_queries: int, max_kv_tokens: int) -> PlanCapacity:
        return PlanCapacity(max_queries=max_queries, max_kv_tokens=max_kv_tokens, max_items=self.max_items,
                            max_partials=self.max_partials, max_merge=self.max_partials)

    def partial_bytes(self, num_qo_heads: int, head_dim: int) -> int:
        """Device memory of one plan's partial results: output [P, Hq, D] and log-sum-exp [P, Hq], fp32."""
        return self.max_partials * num_qo_heads * (head_dim + 1) * 4


def plan_limits(max_batch: int, num_qo_heads: int, num_kv_heads: int, device: torch.device) -> PlanLimits:
    """Limits for batches of up to B = ``max_batch`` requests (one query token each).

    Partials: a query gets one per query tile on its path (one tile of every node on it; a tile
    holds up to ``tile = LARGE_ROWS / GQA group`` of a node's users), plus one per extra chunk of
    those tiles. Chunking adds at most the planner's target, ``PROGRAMS_PER_SM * SMs / KV heads``,
    items (each tile gets ceil(its share of the cost) chunks), each with at most ``tile`` queries.
    Paths of at most ``PATH_NODES`` nodes on average thus need at most
    ``max_partials = PATH_NODES * B + tile * target``.
    Items: the builder's tree of B queries has at most 2B - 1 nodes (each ends a query or branches),
    and a node with n users makes ceil(n / tile) <= 1 + n / tile tiles; within the same path budget
    that is at most ``2B + PATH_NODES * B / tile`` tiles, plus the target's chunks: ``max_items``.
    So the planner never has to coarsen the chunks of such a step. (A sliding-window layer's trees have a
    private node per query more: ``window_plan_limits``.)

    A step past either limit (its paths averaging more than ``PATH_NODES`` nodes) is refused by the
    planner before it writes anything: :func:`plan_step` then plans it without limits, and a
    CUDA-graph replay hands it to an eager step (see the backend).

    Memory: Llama-3-8B heads (32 q / 8 kv, head_dim 128) on an H200 (132 SMs) with B = 256, SGLang's
    default ``--cuda-graph-max-bs`` there: target 66, max_items 706, max_partials 3104, which is
    51.3 MB of partial results per plan.
    """
    # The planner's own SM count, looked up through its module, so that limits and plans agree wherever it is set.
    target = max(1, PROGRAMS_PER_SM * kernel_plan.sm_count(device) // num_kv_heads)  # build_schedule's item target
    tile = max(LARGE_ROWS // (num_qo_heads // num_kv_heads), 1)  # queries per large query tile
    return PlanLimits(max_items=2 * max_batch + -(-PATH_NODES * max_batch // tile) + target,
                      max_partials=PATH_NODES * max_batch + tile * target)


def window_plan_limits(limits: PlanLimits, max_batch: int) -> PlanLimits:
    """``limits`` (``plan_limits``) for a sliding-window layer's plans: a window tree is a tree of the builder's
    (at most 2B - 1 nodes) plus a private node per query at most (``DecodeKVTreeBuilder.build_window``), each
    with one user, so one more tile and one more node on that query's path: B more items and partials."""
    return PlanLimits(max_items=limits.max_items + max_batch, max_partials=limits.max_partials + max_batch)


def graph_batch_sizes(cuda_graph_bs: list[int] | None, max_requests: int, multiple: int = 1) -> list[int] | None:
    """The batch sizes SGLang 0.5.10 captures decode graphs for, each batch padded up to the smallest
    that holds it (``cuda_graph_runner.get_batch_sizes_to_capture``): ``--cuda-graph-bs`` (or its
    defaults; ServerArgs fills them in with or without --disable-cuda-graph) with the request pool's
    size rounded up to ``multiple`` added when the largest passes it, then those that are multiples of
    ``multiple`` (the attention-TP size where SGLang gathers attention inputs) and within the pool's
    size. None when unset."""
    if not cuda_graph_bs:
        return None
    max_requests = -(-max_requests // multiple) * multiple
    sizes = set(cuda_graph_bs)
    if max(sizes) > max_requests:
        sizes.add(max_requests)
    return sorted(size for size in sizes if size % multiple == 0 and size <= max_requests)


# The plans whose past-limits warning was logged (once each per process: "full layers", "sliding-window layers").
_warned_unlimited: set[str] = set()


def plan_step(tree: KVTree, num_qo_heads: int, num_kv_heads: int, head_dim: int, kv_dtype: torch.dtype,
              device: torch.device, limits: PlanLimits | None, planner: TreeDecodePlanner | None = None,
              refused: str | None = None, kind: str = "full layers", warn: bool = True, kernels: bool | None = None):
    """A decode step's plan in buffers of its own (steps the backend's fixed plan buffers do not
    take: a batch past their size, a tree past the limits), or its ``ReferencePlan`` on the reference
    path. ``tree``: node/query metadata on the host. ``planner``: the server's
    ``TreeDecodePlanner`` (it reuses its host buffers; same result as a fresh plan). ``limits``: the server's,
    None for a batch larger than the plan buffers (no graph replays it, so no graph's chunking to keep: it is
    planned as it comes, without a warning). ``refused``: why the caller already knows the tree is past
    ``limits`` (its CUDA-graph plan or the plan buffers refused it). ``kind``: which layers' plan, for the
    warning, logged once per kind and process; ``warn``: whether this process logs it (one TP rank does).
    ``kernels``: the decode path, the backend's choice at its setup (None: :func:`use_triton_kernels` now; read per
    step, a process that changed ``SGLANG_DEFT_DECODE_IMPL`` after making a backend got reference plans for the
    kernels' buffers)."""
    if not (use_triton_kernels(device) if kernels is None else kernels):
        return plan_reference(tree, device)
    planner = planner or TreeDecodePlanner(num_qo_heads, num_kv_heads, head_dim, kv_dtype=kv_dtype)
    if limits is not None:
        reason = refused
        if refused is None:
            try:
                # Under the server's limits: the chunking is the one the fixed buffers would get.
                return planner.plan(tree, device, capacity=limits.capacity(tree.num_queries, tree.kv_indices.numel()))
            except PlanCapacityError as exc:
                reason = str(exc)
        if warn and kind not in _warned_unlimited:
            _warned_unlimited.add(kind)
            logger.warning("deft: a decode step of %d rows exceeds the %s' plan limits %s (%s); such steps are "
                           "planned without limits (and run without CUDA graphs)", tree.num_queries, kind, limits,
                           reason)
    return plan_tree_decode(tree, num_qo_heads, num_kv_heads, head_dim, device, kv_dtype=kv_dtype,
                            graph_batch_sizes=planner.graph_batch_sizes)


def empty_tree(device: torch.device) -> KVTree:
    """No nodes, no queries (metadata on the host, like a builder's planning tree)."""
    none = torch.zeros(0, dtype=torch.int32)
    return KVTree(torch.zeros(0, dtype=torch.int32, device=device), torch.zeros(1, dtype=torch.int32), none, none)


def with_padding_queries(tree: KVTree, num_queries: int) -> KVTree:
    """``tree`` plus queries up to ``num_queries`` that end at a new, empty root: the rows of a
    CUDA graph's padded batch. They attend nothing, so stage 2 writes zeros for them. The new root
    comes last in preorder, which leaves the real queries' work items, merge lists and their order
    exactly as in ``tree``'s own plan. ``tree``'s node and query metadata must be on the host."""
    pad = num_queries - tree.num_queries
    if pad < 0:
        raise ValueError(f"cannot pad a tree of {tree.num_queries} queries to {num_queries}")
    if pad == 0:
        return tree
    root = tree.num_nodes
    return KVTree(
        tree.kv_indices,
        torch.cat([tree.node_indptr, tree.node_indptr[-1:]]),
        torch.cat([tree.node_parent, torch.tensor([-1], dtype=torch.int32)]),
        torch.cat([tree.query_node, torch.full((pad,), root, dtype=torch.int32)]),
    )


def new_graph_plan(limits: PlanLimits, max_queries: int, max_kv_tokens: int, num_qo_heads: int, num_kv_heads: int,
                   head_dim: int, kv_dtype: torch.dtype, device: torch.device,
                   graph_batch_sizes: list[int] | None = None) -> TreeDecodePlan:
    """Fixed-capacity plan buffers for CUDA graphs: stage 1's launch grid covers the capacity, and
    programs past the device-side counts of the plan written last exit at once. Holds a plan of
    ``max_queries`` padding queries (valid for any captured batch size up to it)."""
    return plan_tree_decode(with_padding_queries(empty_tree(device), max_queries), num_qo_heads, num_kv_heads,
                            head_dim, device, kv_dtype=kv_dtype, capacity=limits.capacity(max_queries, max_kv_tokens),
                            graph_batch_sizes=graph_batch_sizes)


def plan_graph_step(plan: TreeDecodePlan, tree: KVTree, num_queries: int, kv_dtype: torch.dtype,
                    planner: TreeDecodePlanner | None = None) -> TreeDecodePlan | None:
    """Plan ``tree``, padded to ``num_queries``, into ``plan``'s fixed buffers (those a CUDA graph
    was captured with); None, with the buffers untouched, when it does not fit them.

    Stage 2 is launched over the ``num_queries`` rows only, not over the buffers' capacity: a graph
    captured with this plan replays at its own batch size, always planned to exactly that many rows
    (``init_forward_metadata_replay_cuda_graph`` checks it), so a larger grid would only add programs
    that exit at once. On the H200 those cost 1.4-2.8 us a layer on the benchmark's trees of 16-64
    queries in buffers for 256 (benchmarks/results/ab_launch_grids_h200.json). Stage 1's grid stays at
    the capacity: how many work items a step has depends on its tree, and exiting stage-1 programs
    measured no cost there. The plan keeps the buffers' stage-2 threshold (``plan_tree_decode``'s
    ``reuse``), so stage 2's shape is the captured one whichever planner writes the step."""
    padded = with_padding_queries(tree, num_queries)
    planner = planner or TreeDecodePlanner(plan.num_qo_heads, plan.num_kv_heads, plan.head_dim, kv_dtype=kv_dtype)
    try:
        planned = planner.plan(padded, plan.meta.device, reuse=plan)
    except PlanCapacityError:  # checked before anything is written
        return None
    return dataclasses.replace(planned, grid_queries=num_queries)


def run_layer(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, plan, sm_scale: float,
              logit_cap: float, out: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """q, out [B, Hq, D]; k/v_buffer [S, Hkv, D] (one layer's KV pool; an fp8 pool with its K/V scales)."""
    if isinstance(plan, ReferencePlan):
        return tree_decode_reference(q, k_buffer, v_buffer, plan, sm_scale, logit_cap, out=out, k_scale=k_scale,
                                     v_scale=v_scale)
    return tree_decode(q, k_buffer, v_buffer, plan, sm_scale, logit_cap, out=out, k_scale=k_scale, v_scale=v_scale)
