"""Each decode step's plan, written into one set of fixed-capacity plan buffers; a steady step is
an update of the last plan on the device, with no host planning.

A *steady* step is the previous step's batch again (the same requests, in the same order, on the
same radix nodes) with every sequence one token longer: every request has a private tail and the
only change to its KV tree is that each tail gains its new token. The plan then stays what it was
except that the last work item of each tail covers one more KV position. So a full plan lays every
tail out with room to grow (``DecodeKVTreeBuilder.build(tail_slack=...)``: an unused node after each
tail holds the row's next positions, and unused nodes cost nothing at run time) once the batch has
stayed the same for a step, and each steady step after it runs a few small device operations instead
of a KV-tree build and a plan on the host:

    kv_indices[tail_end] = req_to_token[row, seq - 1]   (the new tokens' slots)
    items[tail_last_item].kv_len += 1
    tail_end += 1; next position += 1

until a tail's room runs out (``SLACK_TOKENS`` steps; ``SGLANG_DEFT_STEADY_STEPS`` for a server) or the
batch changes; then the next step is planned in full. The update has a fixed shape (one entry per
possible request; unused entries add zero and write a scratch position past the plan's KV) and is one kernel launch
(``kernels/tail_update.py``; as four eager tensor ops it cost ~100-200 us of Python and launches
per step on the H200 host). The chunking of a steady step is the full plan's with the tails' last
chunks longer: still exact attention (every query reads its whole path once), a slightly different
split of the work than a fresh plan. Graph replays and eager steps of the same batch sequence make the
same decisions, so their outputs stay bitwise equal (the backend keeps these buffers without CUDA
graphs too).

A sliding-window layer's plan (``window``: each query attends its last ``window`` tokens,
``DecodeKVTreeBuilder.build_window``) takes steady steps too. One token on, every query's window starts one
position further: in the window tree that moves the first position of each root a window run starts in and of
each query's private node of earlier positions, and grows those private nodes and the tails by one (the
private nodes have room after them as the tails do: up to two growing nodes per query). So the update also
moves those nodes' first items on (``kv_start += 1; kv_len -= 1``, ``kernels/tail_update.advance_starts``),
for as long as each of those items keeps a token and no query whose window still covers its whole path
reaches its window's length (``MovingStarts``); then the step is planned in full. Steady steps keep the full
plan's runs (``kv_tree_builder._run_skips``) while each run's shared part shrinks a position a step, so a fresh tree
may choose more runs and read less: exact either way. Over 130 steps of the forks of
``benchmarks/bench_window_tree.py --steps 130`` (256 and 64 branches, windows of 512 and 1024) the plans read at most
0.005% more than fresh trees would have (351 positions of 8.02 million); on a 100-token prompt under 53-token windows,
1.4% more.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from sglang_deft.env_numbers import env_number
from sglang_deft.kernels import TreeDecodePlan, TreeDecodePlanner
from sglang_deft.kernels.plan import ITEM_FIELDS
from sglang_deft.kernels.staging import PinnedStagingRing
from sglang_deft.kernels.tail_update import advance_starts, advance_tails
from sglang_deft.kv_tree_builder import DecodeKVTree, DecodeKVTreeBuilder
from sglang_deft.tree_attention import plan_graph_step

# Steady steps a full plan leaves room for: a full plan every 65 steps of one batch. More room
# amortises the full plans (~1.2 ms each on the H200 host, with room) over more steps; the cost is
# B x SLACK_TOKENS unused entries in the plan's KV buffer and tails' last chunks up to that much
# longer than a fresh plan would cut them. SGLANG_DEFT_STEADY_STEPS sets it for a server (steady_steps).
SLACK_TOKENS = 64
STEADY_ENV = "SGLANG_DEFT_STEADY_STEPS"
# Its largest value: the sliding-window layers' plan buffers hold two rooms per request (max_bs x (window +
# 2 x room) KV entries), and past a few hundred steps the full plans it saves are a few per thousand steps.
MAX_STEADY_STEPS = 1024


def steady_steps() -> int:
    """Steady steps a full plan leaves room for, from ``SGLANG_DEFT_STEADY_STEPS`` (``SLACK_TOKENS`` by default;
    0: every decode step planned in full, a diagnostic that takes the steady update out of the way)."""
    return env_number(STEADY_ENV, str(SLACK_TOKENS), int, lambda n: 0 <= n <= MAX_STEADY_STEPS,
                      f"a number of decode steps from 0 to {MAX_STEADY_STEPS} that a full plan leaves room for "
                      f"(default {SLACK_TOKENS}; 0 plans every step in full)")


@dataclass(frozen=True)
class StepPlan:
    plan: TreeDecodePlan  # the buffers, holding this step's plan (stage 2's grid: this step's rows)
    attended_tokens: int
    unique_tokens: int
    steady: bool  # an in-place update of the last plan


@dataclass
class _SteadyState:
    # The batch itself (its requests on their radix nodes) is the builder's last build, which is this
    # plan's: steady steps build nothing, so DecodeKVTreeBuilder.same_batch_as_last tells whether a
    # step is still that batch.
    seq: np.ndarray  # [B] the sequence lengths the buffers' plan is for
    plan: TreeDecodePlan  # the full step's plan, which steady steps update in place; its
    #                       num_queries: the rows planned (B plus graph padding)
    unique: int
    room: int  # steady steps left before a tail's slack runs out (or a window plan's shape changes)
    num_tails: int
    num_moving: int  # a window plan's roots and private nodes that move one position a step (MovingStarts)


@dataclass(frozen=True)
class _RefusedBatch:
    # A batch whose tree the buffers refused (past the plan limits or their KV capacity, not past their rows): its
    # next steps grow every tail and keep every path's nodes, so they would be refused too. They are not built and
    # scheduled here to find that out (the caller plans each in buffers of its own, a second build and schedule)
    # for up to ``skips`` steps, then tried again: chunking changes as tails grow, and a tree on the limit may fit.
    seq: np.ndarray  # [B] the lengths of the last step refused (or skipped)
    skips: int


class DecodeStepPlanner:
    """Plans decode steps into ``buffers`` (a fixed-capacity ``TreeDecodePlan``); see the module doc.
    ``window``: the plan of a sliding-window layer whose queries attend their last ``window`` tokens."""

    def __init__(self, builder: DecodeKVTreeBuilder, planner: TreeDecodePlanner, buffers: TreeDecodePlan,
                 slack: int = SLACK_TOKENS, window: int | None = None):
        self.builder, self.planner, self.buffers, self.slack = builder, planner, buffers, slack
        self.window = window
        self.device = buffers.meta.device
        # Nodes that grow in a steady step: a tail per query row at most, and in a window plan a private node
        # per query too (TailSlack).
        cap = buffers.qperm.numel() * (1 if window is None else 2)
        self._staging = PinnedStagingRing(self.device)
        # The update's operands, one entry per possible growing node:
        # next (req_to_token flat index of the tail's next token) | end (its kv_indices position) |
        # its last item's kv_len field | 1 for a tail, 0 for an unused entry. Unused entries point
        # at scratch: next 0, end the kv buffer's last entry (plans leave it free: ``plan``), kv_len
        # any field (+0).
        self._scratch = buffers.kv_indices.numel() - 1
        self._cap = cap
        self._operands = torch.zeros(4 * cap, dtype=torch.int64, device=self.device)
        self._idle_operands = np.concatenate([np.zeros(cap), np.full(cap, self._scratch), np.ones(cap),
                                              np.zeros(cap)]).astype(np.int64)
        self._staging.upload(self._idle_operands, self._operands)
        self._items = buffers.items.view(-1)
        # A window plan's moving items: field (flat index of an item's kv_start) | 1 for a moving item, 0 for an
        # unused entry (field 0, + 0). One entry per item the buffers hold (a root split into query tiles moves
        # each tile's item).
        self._start_cap = buffers.items.shape[0]
        self._start_operands = torch.zeros(2 * self._start_cap, dtype=torch.int64, device=self.device)
        self._state: _SteadyState | None = None
        self._refused: _RefusedBatch | None = None
        # Compiled here (Triton's JIT: about a second on a fresh host) rather than at a server's first
        # steady step; on the idle operands the updates write only the scratch entry and add zeros.
        self._advance_tails()
        if window is not None:
            advance_starts(self._start_operands, self._items)

    def _advance_tails(self) -> None:
        advance_tails(self.builder.req_to_token, self._operands, self.buffers.kv_indices, self._items)

    def invalidate(self) -> None:
        """Something else wrote the buffers: the next step is planned in full. A refused batch stays refused
        (``_RefusedBatch`` is about its tree, not what the buffers hold): the backend invalidates after every step
        the buffers refused, and clearing it there had every such step built and scheduled twice again."""
        self._state = None

    def plan(self, reqs: Sequence, seq_lens_cpu: torch.Tensor, num_queries: int) -> StepPlan | None:
        """The step's plan in the buffers, for ``num_queries`` rows (the batch, plus a CUDA graph's
        padding rows; a steady step may have other rows than the last, ``_with_rows``); None when the step does
        not fit them. Then the buffers hold no valid plan (the
        tree's KV slots may already be written into them) and no steady state is kept: the step runs
        eagerly with a plan of its own, and whatever step comes next is planned in full before any
        replay reads the buffers. The next steps of a batch whose tree they refused are refused without a build
        (``_RefusedBatch``)."""
        reqs = list(reqs)
        # A copy: the steady state keeps these lengths, and SGLang without the overlap scheduler
        # advances the batch's seq_lens_cpu in place (a view would already hold the next step's).
        seq = np.array(seq_lens_cpu.numpy(), dtype=np.int64)
        same_batch = self.builder.same_batch_as_last(reqs, seq)
        fits_rows = num_queries <= self.buffers.qperm.numel()
        refused = self._refused
        if (refused is not None and refused.skips > 0 and same_batch and fits_rows
                and np.array_equal(seq, refused.seq + 1)):
            self._refused = _RefusedBatch(seq, refused.skips - 1)
            return None
        self._refused = None
        st = self._state
        if st is not None and same_batch and st.room > 0 and np.array_equal(seq, st.seq + 1) and fits_rows:
            if num_queries != st.plan.num_queries:
                st.plan = _with_rows(st.plan, len(reqs), num_queries)
            self._advance(st, seq)
            attended = seq if self.window is None else np.minimum(seq, self.window)
            return StepPlan(st.plan, int(attended.sum()), st.unique, True)
        self._state = None
        # Room costs a full plan ~1.6x the host time (twice the nodes), so it is laid out only for a
        # batch that already stayed the same for a step: a batch that changes every step (requests
        # joining and finishing all the time) plans as without steady steps.
        slack = self.slack if same_batch else 0
        # Room stops one short of the buffer's end: the steady update's unused entries write there.
        if self.window is None:
            built = self.builder.build(reqs, seq_lens_cpu, kv_out=self.buffers.kv_indices, tail_slack=slack,
                                       max_kv_tokens=self._scratch)
        else:
            built = self.builder.build_window(reqs, seq_lens_cpu, self.window, kv_out=self.buffers.kv_indices,
                                              tail_slack=slack, max_kv_tokens=self._scratch)
        # None past the buffers' capacity (checked before the plan's metadata is written; the KV
        # slots above may be): the caller runs the step eagerly with a plan of its own.
        plan = plan_graph_step(self.buffers, built.tree, num_queries, self.planner.kv_dtype, self.planner)
        if plan is None:  # the buffers' KV slots are this tree's, their counts the last step's: no step to run
            self.buffers.buffers.num_queries = self.buffers.buffers.max_kv_slot = None
            if fits_rows:
                self._refused = _RefusedBatch(seq, self.slack)
            return None
        self._state = self._steady_state(built, plan, len(reqs), seq)
        return StepPlan(plan, built.attended_tokens, built.unique_tokens, False)

    def _advance(self, st: _SteadyState, seq: np.ndarray) -> None:
        self._advance_tails()
        if st.num_moving:
            advance_starts(self._start_operands, self._items)
        st.seq, st.room, st.unique = seq, st.room - 1, st.unique + st.num_tails - st.num_moving

    def _steady_state(self, built: DecodeKVTree, plan: TreeDecodePlan, batch_size: int,
                      seq: np.ndarray) -> _SteadyState | None:
        """What later steady steps need, set up on the device; None when they cannot follow this plan."""
        tails = built.tails
        if (tails is None or not np.array_equal(np.sort(tails.req[:tails.num_tails]), np.arange(batch_size))
                or int(tails.slack.min()) <= 0):
            return None  # a request without a private tail (or without room) cannot grow in place
        if len(tails.req) > self._cap:  # not from a builder's tree (at most 2 growing nodes a query): no update
            return None
        items = self.planner.items_ending_at(tails.end)
        if items is None:
            return None
        room, moving = int(tails.slack.min()), None
        if self.window is not None:
            moving = self._moving_items(built)
            if moving is None:
                return None
            # Each moved item must keep a token, unless it is also a tail's last item (a window inside a tail of
            # one item), which grows by the token it loses.
            shrinking = moving[1][~np.isin(moving[0], items)]
            room = min(room, built.moving.room, int(shrinking.min(initial=room + 1)) - 1)
            if room <= 0:
                return None
        n, cap = len(tails.req), self._cap
        host = self._idle_operands.copy()
        for k, column in enumerate((tails.next_flat, tails.end, items * ITEM_FIELDS + 1, 1)):
            host[k * cap:k * cap + n] = column
        self._staging.upload(host, self._operands)
        num_moving = 0
        if moving is not None and len(moving[0]):
            num_moving = len(built.moving.start)
            starts = np.zeros(2 * self._start_cap, np.int64)
            starts[:len(moving[0])] = moving[0] * ITEM_FIELDS
            starts[self._start_cap:self._start_cap + len(moving[0])] = 1
            self._staging.upload(starts, self._start_operands)
        return _SteadyState(seq=seq, plan=plan, unique=built.unique_tokens, room=room, num_tails=n,
                            num_moving=num_moving)

    def _moving_items(self, built: DecodeKVTree) -> tuple[np.ndarray, np.ndarray] | None:
        """The window plan's items that start at a moving root, and their lengths (none when no root moves)."""
        if built.moving is None:
            return None
        if not len(built.moving.start):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return self.planner.items_starting_at(built.moving.start)


def _with_rows(plan: TreeDecodePlan, batch_size: int, rows: int) -> TreeDecodePlan:
    """``plan`` (in the buffers) for ``rows`` rows instead of its own: only its padding rows change, queries of an
    empty node past the batch's (``tree_attention.with_padding_queries``) with no work items and no partials, so its
    items and every real query's merge list stay what a plan for these rows would hold. That happens when a batch
    that replays a CUDA graph at its padded size runs a step eagerly (a graph plan refused past its limits, e.g.
    the sliding-window layers'), or back: the step stays steady there as in a server without graphs, so both
    chunk it alike. Two small device writes, no host sync: the padding rows' merge ranges (empty, where the
    real queries' end) and the query count stage 2 reads."""
    merge_end = plan.merge_indptr[batch_size]  # a view: the device's value, copied on the device
    plan.merge_indptr[batch_size + 1:rows + 1].copy_(merge_end.expand(rows - batch_size))
    plan.counts[2].fill_(rows)
    plan.buffers.num_queries = rows
    return dataclasses.replace(plan, num_queries=rows, grid_queries=rows)
