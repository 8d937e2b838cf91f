"""Radix tree -> KV tree, once per decode step.

A decode batch's requests attend ``req_to_token[row_b, :seq_len_b]``. The radix tree says which of
those KV slots are shared: every node on the path root -> ``req.last_node`` holds the same slot ids
in the row of every request whose path contains it (``match_prefix`` copies the node values into the
row, and ``cache_unfinished_req`` rewrites the row with the tree's values after deduplicating).
Positions ``[prefix_len, seq_len)`` are the request's own (decoded tokens enter the radix tree only
when the request finishes). So the KV tree is: the radix nodes on the batch's paths, plus one
private-tail node per request under its last radix node.

Facts this relies on (SGLang 0.5.10.post1, page_size 1, no speculative decoding):

* ``req.last_node`` is the root when nothing matched, and stays the root with
  ``--disable-radix-cache --chunked-prefill-size -1`` (``RadixCache(disable=True)``); it is ``None``
  with ``--disable-radix-cache`` and chunked prefill on, the default (``ChunkCache``). No sharing then.
* During decode the path covers at most ``seq_len - 1`` tokens: matching stops one token short of
  the prompt (``init_next_round_input``), ``cache_unfinished_req`` inserts ``fill_ids`` (the tokens
  prefilled so far), and the decode step's new token is always private. With the overlap scheduler
  the decode step after a prefill is built before that prefill's ``cache_unfinished_req`` runs, so
  new requests may still carry ``last_node`` from ``match_prefix`` (a shorter path, a longer private
  tail): still a correct tree, it merely shares less for one step.
* ``_split_node`` inserts the new node *above* the split one, which keeps its identity, its key's
  end and its place in every row: a request holding it sees a longer path of the same total length.
* Nodes on a locked path (every running request locks its ``last_node``) are never evicted.

Host cost: O(B + R) Python steps, R = radix nodes first reached this step (a request's upward walk
stops at the first node another request already reached), plus one small host->device copy. Measured
on this repo's 2-core CPU box (tests/test_kv_tree_builder.py::test_build_cpu_time, medians): 130-140 us
at B = 64 and 350 us at B = 256, for a fork batch (a shared path of three radix nodes, each request's
own node and decoded token below it) and for a 3-level batch: ~1 us per request in Python (radix walk,
chain merge, host buffer), and ~60 us at B = 256 for the device gathers (run on the CPU here).
KV slot ids never leave the device: the host plans (request, start, length) segments and the device
gathers them from ``req_to_token`` with a few indexing kernels whose output size is known on the host
(no sync).
Page size 1 only; speculative decoding (bigram keys, several new tokens) is not handled.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

import torch

from sglang_deft.kernels import KVTree


class KVTreeBuildError(ValueError):
    """A request's radix path disagrees with its sequence length or with the other requests."""


@dataclass(frozen=True)
class DecodeKVTree:
    """The KV tree of one decode batch and its sharing counts.

    ``tree``'s tensors live on ``req_to_token``'s device; the ``*_cpu`` fields are the same node and
    query metadata on the host (they are built there first), for planners that must not sync.
    """

    tree: KVTree  # int32 tensors on req_to_token's device; query b = reqs[b]
    attended_tokens: int  # sum over requests of seq_len: KV tokens a per-request kernel reads
    unique_tokens: int  # tree.kv_indices.numel(): KV tokens read once each
    node_indptr_cpu: torch.Tensor  # [N + 1] int32, cpu: == tree.node_indptr
    node_parent_cpu: torch.Tensor  # [N] int32, cpu: == tree.node_parent
    query_node_cpu: torch.Tensor  # [B] int32, cpu: == tree.query_node
    segment_req_cpu: torch.Tensor  # [N] int32, cpu: node i's KV is reqs[segment_req[i]]'s row
    segment_start_cpu: torch.Tensor  # [N] int32, cpu: from position segment_start[i] (node_indptr gives the length)

    @property
    def planning_tree(self) -> KVTree:
        """``tree`` with its node and query metadata on the host (``kv_indices`` stays on the device):
        what ``plan_tree_decode`` reads without a device sync."""
        return KVTree(self.tree.kv_indices, self.node_indptr_cpu, self.node_parent_cpu, self.query_node_cpu)


def build_decode_kv_tree(
    reqs: Sequence,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens_cpu: torch.Tensor | Sequence[int],
) -> DecodeKVTree:
    """Build the KV tree of a decode batch.

    Args:
        reqs: the batch's ``Req`` objects in batch order (``ModelWorkerBatch.reqs``); only
            ``req.last_node`` is read (a radix ``TreeNode``, the root, or ``None``).
        req_to_token: ``[pool_size, max_context_len]`` int32, ``ReqToTokenPool.req_to_token``.
        req_pool_indices: ``[B]`` integer tensor (any device): request b's row.
        seq_lens_cpu: ``[B]`` host sequence lengths, the new token included (its slot is already
            written at position ``seq_len - 1``).

    Query b attends its whole path, whose KV concatenated is ``req_to_token[row_b, :seq_len_b]``.
    Nodes are the radix nodes on the batch's paths and each request's non-empty private tail; a
    chain of nodes that serve the same queries is one node (so a request that shares nothing is a
    single node). ``node_parent[i] < i``.

    Raises:
        KVTreeBuildError: a path longer than its request's sequence, an evicted node on a path, or
            paths from two different radix trees.
    """
    B = len(reqs)
    seq_lens = seq_lens_cpu.tolist() if isinstance(seq_lens_cpu, torch.Tensor) else [int(s) for s in seq_lens_cpu]
    if len(seq_lens) != B or req_pool_indices.numel() != B:
        raise KVTreeBuildError(
            f"batch mismatch: {B} reqs, {len(seq_lens)} seq_lens, {req_pool_indices.numel()} req_pool_indices")

    try:
        l_parent, l_start, l_len, l_req, l_nchild, l_nend, q_local = _radix_paths(reqs, seq_lens)
    except AttributeError as e:  # e.g. RadixCacheCpp (SGLANG_EXPERIMENTAL_CPP_RADIX_TREE): opaque nodes
        raise KVTreeBuildError(f"req.last_node must be a radix TreeNode (.parent, .key, .value) or None: {e}") from e

    # Merge: a node with one child and no query ending on it serves exactly its child's queries, so
    # the child's segment continues it in the same row. Local ids are parents-first, so out ids are too.
    # Sentinels make a root's parent (-1) index the extra last entries: never absorbing, out id -1.
    l_nchild.append(0)
    out_of = [0] * len(l_parent) + [-1]
    o_parent: list[int] = []
    o_start: list[int] = []
    o_len: list[int] = []
    o_req: list[int] = []
    for i, p in enumerate(l_parent):
        if l_nchild[p] == 1 and l_nend[p] == 0:
            o = out_of[p]
            o_len[o] += l_len[i]
            out_of[i] = o
        else:
            out_of[i] = len(o_parent)
            o_parent.append(out_of[p])
            o_start.append(l_start[i])
            o_len.append(l_len[i])
            o_req.append(l_req[i])
    N = len(o_parent)
    indptr = [0, *accumulate(o_len)]
    T = indptr[N]

    # One host buffer, one copy: [indptr | parent | query_node | seg_req | seg_start].
    # (array -> frombuffer is ~3x cheaper than torch.tensor(list); the tensor keeps the array alive.)
    host = torch.frombuffer(array("i", indptr + o_parent + [out_of[i] for i in q_local] + o_req + o_start),
                            dtype=torch.int32)
    s_par, s_q, s_req, s_start = N + 1, 2 * N + 1, 2 * N + 1 + B, 3 * N + 1 + B
    device = req_to_token.device
    dev = host.to(device, non_blocking=True) if device.type != "cpu" else host
    d_indptr = dev[:s_par]
    # Token t of node o is req_to_token[row[o], start[o] + (t - indptr[o])]: flat index base[o] + t.
    # (One gather by flat index: fewer device ops than indexing rows and columns per token.)
    rows = req_pool_indices.to(device=device, dtype=torch.int64, non_blocking=True)[dev[s_req:s_start].long()]
    base = rows * req_to_token.shape[1] + (dev[s_start:] - d_indptr[:-1])
    flat = torch.repeat_interleave(base, d_indptr[1:] - d_indptr[:-1], output_size=T)
    kv_indices = torch.take(req_to_token, flat + torch.arange(T, device=device)).to(torch.int32)

    tree = KVTree(kv_indices, d_indptr, dev[s_par:s_q], dev[s_q:s_req])
    return DecodeKVTree(
        tree=tree,
        attended_tokens=sum(seq_lens),
        unique_tokens=T,
        node_indptr_cpu=host[:s_par],
        node_parent_cpu=host[s_par:s_q],
        query_node_cpu=host[s_q:s_req],
        segment_req_cpu=host[s_req:s_start],
        segment_start_cpu=host[s_start:],
    )


def _radix_paths(reqs, seq_lens):
    """The radix nodes on the batch's paths plus the private tails, as parallel lists (local ids,
    parents first), and the local node each query ends at. O(B + radix nodes first reached)."""
    # Radix nodes reached this step, in discovery order (parents first). Per local node:
    # parent local id (-1: child of the root), start position along the path, length, one request
    # whose path contains it, number of children in this batch (tails included), queries ending there.
    local_of: dict = {}
    l_parent: list[int] = []
    l_start: list[int] = []
    l_len: list[int] = []
    l_req: list[int] = []
    l_nchild: list[int] = []
    l_nend: list[int] = []
    q_local: list[int] = []  # the local node query b ends at
    root = None
    chain: list = []
    for b, req in enumerate(reqs):
        seq_len = seq_lens[b]
        node = req.last_node
        # Walk up to the root or to a node another request already reached.
        chain.clear()
        while node is not None and node.parent is not None and node not in local_of:
            chain.append(node)
            node = node.parent
        if node is None or node.parent is None:  # no radix cache, or reached the root
            if node is not None:
                if root is None:
                    root = node
                elif node is not root:
                    raise KVTreeBuildError(f"request {b} (rid={getattr(req, 'rid', '?')}) holds a node of another radix tree")
            above, end = -1, 0
        else:
            above = local_of[node]
            end = l_start[above] + l_len[above]
        for x in reversed(chain):
            if x.value is None:
                raise KVTreeBuildError(f"request {b} (rid={getattr(req, 'rid', '?')}): a node on its radix path "
                                       "is evicted (value None); a running request's path must stay on the device")
            n = len(x.key)
            i = len(l_parent)
            local_of[x] = i
            l_parent.append(above)
            l_start.append(end)
            l_len.append(n)
            l_req.append(b)
            l_nchild.append(0)
            l_nend.append(0)
            if above >= 0:
                l_nchild[above] += 1
            above, end = i, end + n
        # `above` is now req.last_node's local id (-1: nothing shared), `end` its path length.
        if end > seq_len:
            raise KVTreeBuildError(
                f"request {b} (rid={getattr(req, 'rid', '?')}): its radix path holds {end} tokens but its sequence "
                f"has {seq_len}; req.last_node does not describe req_to_token[req_pool_idx, :seq_len]")
        if end < seq_len:  # private tail
            i = len(l_parent)
            l_parent.append(above)
            l_start.append(end)
            l_len.append(seq_len - end)
            l_req.append(b)
            l_nchild.append(0)
            l_nend.append(1)
            if above >= 0:
                l_nchild[above] += 1
            q_local.append(i)
        else:  # empty tail: the query ends at its last radix node (or has no KV at all)
            if above < 0:
                raise KVTreeBuildError(f"request {b} (rid={getattr(req, 'rid', '?')}) has seq_len {seq_len}: "
                                       "a decode query attends at least its own token")
            l_nend[above] += 1
            q_local.append(above)

    return l_parent, l_start, l_len, l_req, l_nchild, l_nend, q_local
