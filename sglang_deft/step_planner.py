"""Each decode step's plan, written into one set of fixed-capacity plan buffers; a steady step is
an update of the last plan on the device, with no host planning.

A *steady* step is the previous step's batch again (the same requests, in the same order, on the
same radix nodes) with every sequence one token longer: every request has a private tail and the
only change to its KV tree is that each tail gains its new token. The plan then stays what it was
except that the last work item of each tail covers one more KV position. So a full plan lays every
tail out with room to grow (``DecodeKVTreeBuilder.build(tail_slack=...)``: an unused node after each
tail holds the row's next positions, and unused nodes cost nothing at run time) once the batch has
stayed the same for a step, and each steady step after it runs four small device operations instead
of a KV-tree build and a plan on the host:

    kv_indices[tail_end] = req_to_token[row, seq - 1]   (gather + index_copy: the new tokens' slots)
    items[tail_last_item].kv_len += 1                  (index_add)
    tail_end += 1; next position += 1                  (add)

until a tail's room runs out (``SLACK_TOKENS`` steps) or the batch changes; then the next step is
planned in full. The chunking of a steady step is the full plan's with the tails' last chunks
longer: still exact attention (every query reads its whole path once), a slightly different split
of the work than a fresh plan. Graph replays and eager steps of the same batch sequence make the
same decisions, so their outputs stay bitwise equal (the backend keeps these buffers without CUDA
graphs too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from sglang_deft.kernels import TreeDecodePlan, TreeDecodePlanner
from sglang_deft.kernels.plan import ITEM_FIELDS
from sglang_deft.kernels.staging import PinnedStagingRing
from sglang_deft.kv_tree_builder import DecodeKVTree, DecodeKVTreeBuilder
from sglang_deft.tree_attention import with_padding_queries

SLACK_TOKENS = 32  # steady steps a full plan leaves room for (a full plan every 33 steps of one batch)


@dataclass(frozen=True)
class StepPlan:
    plan: TreeDecodePlan  # the buffers, holding this step's plan
    attended_tokens: int
    unique_tokens: int
    steady: bool  # an in-place update of the last plan
    built: DecodeKVTree | None  # the step's KV tree (full plans only)


@dataclass
class _SteadyState:
    reqs: list
    last_nodes: list
    seq: np.ndarray  # [B] the sequence lengths the buffers' plan is for
    num_queries: int  # rows planned (B plus graph padding)
    unique: int
    room: int  # steady steps left before a tail's slack runs out
    num_tails: int


class DecodeStepPlanner:
    """Plans decode steps into ``buffers`` (a fixed-capacity ``TreeDecodePlan``); see the module doc."""

    def __init__(self, builder: DecodeKVTreeBuilder, planner: TreeDecodePlanner, buffers: TreeDecodePlan,
                 kv_dtype: torch.dtype, slack: int = SLACK_TOKENS):
        self.builder, self.planner, self.buffers, self.kv_dtype, self.slack = builder, planner, buffers, kv_dtype, slack
        self.device = buffers.meta.device
        cap = buffers.qperm.numel()
        self._staging = PinnedStagingRing(self.device)
        self._tail_index = torch.zeros(3 * cap, dtype=torch.int64, device=self.device)  # next | end | kv_len entry
        self._ones = torch.ones(cap, dtype=torch.int32, device=self.device)
        self._items = buffers.items.view(-1)
        self._state: _SteadyState | None = None

    def invalidate(self) -> None:
        """Something else wrote the buffers: the next step is planned in full."""
        self._state = None

    def plan(self, reqs: Sequence, seq_lens_cpu: torch.Tensor, num_queries: int) -> StepPlan | None:
        """The step's plan in the buffers, for ``num_queries`` rows (the batch, plus a CUDA graph's
        padding rows); None, the buffers' plan unchanged, when the step does not fit them."""
        reqs = list(reqs)
        seq = seq_lens_cpu.numpy().astype(np.int64, copy=False)
        st = self._state
        if st is not None and self._is_steady(st, reqs, seq, num_queries):
            self._advance(st, seq)
            return StepPlan(self.buffers, int(seq.sum()), st.unique, True, None)
        self._state = None
        # Room costs a full plan ~1.6x the host time (twice the nodes), so it is laid out only for a
        # batch that already stayed the same for a step: a batch that changes every step (requests
        # joining and finishing all the time) plans as without steady steps.
        slack = self.slack if self.builder.same_batch_as_last(reqs, seq) else 0
        built = self.builder.build(reqs, seq_lens_cpu, kv_out=self.buffers.kv_indices, tail_slack=slack,
                                   max_kv_tokens=self.buffers.kv_indices.numel())
        try:
            plan = self.planner.plan(with_padding_queries(built.tree, num_queries), self.device, reuse=self.buffers)
        except ValueError:
            # Capacity (checked before anything is written): the caller runs the step eagerly with
            # a plan of its own. Any other error comes back from that plan.
            return None
        self._state = self._steady_state(built, reqs, seq, num_queries)
        return StepPlan(plan, built.attended_tokens, built.unique_tokens, False, built)

    def _is_steady(self, st: _SteadyState, reqs: list, seq: np.ndarray, num_queries: int) -> bool:
        return (st.room > 0 and num_queries == st.num_queries and len(reqs) == len(st.reqs) and reqs == st.reqs
                and [r.last_node for r in reqs] == st.last_nodes and np.array_equal(seq, st.seq + 1))

    def _advance(self, st: _SteadyState, seq: np.ndarray) -> None:
        n = st.num_tails
        index = self._tail_index[:3 * n]
        nxt, end, kv_len = index[:n], index[n:2 * n], index[2 * n:]
        new_slots = torch.index_select(self.builder.req_to_token.view(-1), 0, nxt)
        self.buffers.kv_indices.index_copy_(0, end, new_slots)
        self._items.index_add_(0, kv_len, self._ones[:n])
        index[:2 * n] += 1
        st.seq, st.room, st.unique = seq, st.room - 1, st.unique + n

    def _steady_state(self, built: DecodeKVTree, reqs: list, seq: np.ndarray, num_queries: int) -> _SteadyState | None:
        """What later steady steps need, set up on the device; None when they cannot follow this plan."""
        tails = built.tails
        if tails is None or len(tails.req) != len(reqs) or int(tails.slack.min()) <= 0:
            return None  # a request without a private tail (or without room) cannot grow in place
        items = self.planner.items_ending_at(tails.end)
        if items is None:
            return None
        n = len(tails.req)
        host = np.concatenate([tails.next_flat, tails.end, items * ITEM_FIELDS + 1]).astype(np.int64)
        self._staging.upload(host, self._tail_index)
        return _SteadyState(reqs=reqs, last_nodes=[r.last_node for r in reqs], seq=seq, num_queries=num_queries,
                            unique=built.unique_tokens, room=int(tails.slack.min()), num_tails=n)
