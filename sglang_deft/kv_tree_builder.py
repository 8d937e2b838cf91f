"""Radix tree -> KV tree, once per decode step.

A decode batch's requests attend ``req_to_token[row_b, :seq_len_b]``. The radix tree says which of
those KV slots are shared: every node on the path root -> ``req.last_node`` holds the same slot ids
in the row of every request whose path contains it (``match_prefix`` copies the node values into the
row, and ``cache_unfinished_req`` rewrites the row with the tree's values after deduplicating).
Positions ``[prefix_len, seq_len)`` are the request's own (decoded tokens enter the radix tree only
when the request finishes). So the KV tree is: the radix nodes on the batch's paths, plus one
private-tail node per request under its last radix node.

Facts this relies on (SGLang 0.5.10.post1, any ``--page-size``, no speculative decoding):

* ``req.last_node`` is the root when nothing matched. With ``--disable-radix-cache`` (chunked prefill on
  or off: the scheduler builds a ``ChunkCache`` for any ``--chunked-prefill-size``) it is ``None``; a
  ``RadixCache(disable=True)`` (the root) serves only a multimodal model under ``--model-impl
  transformers``, which deft refuses. No sharing then.
  A streaming session's later turns (``--enable-streaming-session``) carry a ``_VirtualNode`` and
  continue in the session's own row: no sharing for them either.
* Every running request's ``req_to_token`` row holds its whole context (SGLang's own decode
  backends read nothing else), so treating a request as sharing less than it could is always correct.
* During decode the path covers at most ``seq_len - 1`` tokens: matching stops one token short of
  the prompt (``init_next_round_input``), ``cache_unfinished_req`` inserts ``fill_ids`` (the tokens
  prefilled so far), and the decode step's new token is always private. With the overlap scheduler
  the decode step after a prefill is built before that prefill's ``cache_unfinished_req`` runs, so
  new requests may still carry ``last_node`` from ``match_prefix`` (a shorter path, a longer private
  tail): still a correct tree, it merely shares less for one step.
* With ``--page-size`` > 1 the radix tree holds whole pages only: ``match_prefix`` and
  ``cache_unfinished_req`` stop at the last whole page (``page_align_keys``), and a request's partial
  last page stays its own (in ``prefix_indices`` past ``cache_protected_len``, never in a node). So a
  path is page-aligned and everything after it in the row is private, as with page size 1; the paged
  allocator only decides which slots the row holds, and the tree is built from the row's token slots.
  Sharing is whole pages: a fork's branches each hold their own copy of the prompt's partial page.
* ``_split_node`` inserts the new node *above* the split one, which keeps its identity, its key's
  end and its place in every row: a request holding it sees a longer path of the same total length.
* Nodes on a locked path (every running request locks its ``last_node``) are never evicted. With
  ``--enable-hierarchical-cache`` an unlocked node may lose its device KV to the host pool (``value``
  None); a request whose prefix is there gets it loaded back (new device slots in ``value`` and its
  row) before its prefill, so a decoding request's path is on the device as without it.

Host cost. The radix part of the tree (which nodes, who shares them) changes only when requests
join, leave or move to another radix node; between those steps only the private tails grow.
:class:`DecodeKVTreeBuilder` keeps the last step's radix part (:class:`_BatchShape`) and reuses it
when the batch is the same requests on the same ``last_node`` objects (compared by identity) in the
same ``req_to_token`` rows, each with a private tail as before: the step then costs a few numpy
operations on arrays of B and N entries, not a Python walk per request. Reuse is exact: with the
same requests on the same nodes the only radix change possible is a split of a node on a path by a
request outside the batch (``_split_node``), which changes no batch request's shared prefix; locked
nodes are never evicted.
The rows are compared too: a batch retracted as a whole (``/pause_generation`` with ``mode=retract``)
comes back, after its re-prefill, as the same requests on the same nodes in new rows, and with the
overlap scheduler its first decode step is built before ``cache_unfinished_req`` moves the nodes.
And so are the requests' ``retraction_count``: with a request pool no larger than the batch, a batch
preempted as a whole (``--enable-priority-scheduling``: a prefill-only request of higher priority)
comes back in the same rows, one token on (the overlap scheduler drops the in-flight step's token),
but with new KV slots in those rows, which a steady step (``step_planner``) would not read.
A full build is O(B + R) Python steps, R = radix nodes first reached this step (a request's upward
walk stops at the first node another request already reached).
KV slot ids never leave the device: the host plans (row, start, length) segments and the device
gathers them from ``req_to_token`` (one upload of two int32 arrays through page-locked staging,
``repeat_interleave``, an add, one ``index_select``, written straight into the caller's buffer).
Node and query metadata stay on the host, where the planner reads them (no device sync).
Speculative decoding (bigram keys, several new tokens) is not handled.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from sglang_deft.kernels import KVTree
from sglang_deft.kernels.staging import PinnedStagingRing


class KVTreeBuildError(ValueError):
    """A request's radix path disagrees with its sequence length or with the other requests."""


@dataclass(frozen=True)
class TailSlack:
    """Where each private tail may grow in place: an unused node of ``slack`` KV positions follows
    every tail node (its child, next in node order), holding the row's next positions. In a window tree the
    queries' private nodes (``_WindowExtras``) grow the same way, after the tails."""

    req: np.ndarray  # [Bt] int64: the request (batch index) in whose row it grows: one per request with a tail, first
    end: np.ndarray  # [Bt] int64: kv position just past the tail = the first slack position
    next_flat: np.ndarray  # [Bt] int64: req_to_token flat index of the node's next token
    slack: np.ndarray  # [Bt] int64: slack positions (the row's width may leave fewer than asked)
    num_tails: int  # the first num_tails entries are private tails; a window tree's private nodes follow them


@dataclass(frozen=True)
class MovingStarts:
    """How a window tree (``build_window``) follows its windows for the next steps of the same batch: each query
    whose window starts past its path's first token has one root node, where its run shares its top node from
    (the queries of a run share it), and maybe a private node of its earlier positions; one step later each of
    those roots and private nodes starts one position further on, and the private nodes and the tails grow by
    one (``tails``); every other node stays as it is. That holds for ``room`` steps (at most the slack asked for):
    until a query whose window covers its whole sequence reaches its window's length (then its window starts
    moving too, at a place no other query's root starts), or a moving root that does not grow would lose its
    last position (a plan's first chunk of it may run out sooner: ``step_planner`` checks its items)."""

    start: np.ndarray  # [R] int64: kv position of each moving root's and private node's first token
    room: int  # steps of one more token each for which the tree's shape stays this one


@dataclass(frozen=True)
class DecodeKVTree:
    """The KV tree of one decode batch and its sharing counts."""

    tree: KVTree  # kv_indices on req_to_token's device; node/query metadata int32 on the host; query b = reqs[b]
    attended_tokens: int  # sum over requests of seq_len: KV tokens a per-request kernel reads
    unique_tokens: int  # KV tokens read once each: tree.kv_indices.numel() less the tails' unused room (tails)
    reused_shape: bool  # the radix part came from the previous step (DecodeKVTreeBuilder)
    tails: TailSlack | None = None  # build(tail_slack=...): the unused nodes after the tails
    moving: MovingStarts | None = None  # build_window(tail_slack=...): the nodes that move with their windows


@dataclass(frozen=True)
class _BatchShape:
    """A batch's KV tree without its tails' lengths: what stays while only the private tails grow."""

    req_refs: list  # weak references to the requests, in batch order (identity; see matches)
    last_nodes: list  # each request's req.last_node (identity)
    placement: list  # each request's (req_pool_idx, retraction_count): where its KV slots are (_placement)
    end: np.ndarray  # [B] int64: radix path length of each request
    has_tail: np.ndarray  # [B] bool: seq_len > end (a private tail node)
    parent: np.ndarray  # [N] int32: node parents (-1: root), parents first
    query_node: np.ndarray  # [B] int32
    start: np.ndarray  # [N] int64: the node's first position in its row
    row: np.ndarray  # [N] int64: req_to_token row of one request whose path holds the node
    fixed_len: np.ndarray  # [N] int64: the node's length without the private tail it may end with
    tail_node: np.ndarray  # [Bt] int64: the node holding request tail_req[j]'s tail (each node holds <= 1)
    tail_req: np.ndarray  # [Bt] int64

    def matches(self, reqs: list, last_nodes: list, seq: np.ndarray) -> bool:
        """This shape describes a step of ``reqs`` with these ``seq`` lengths (see the module doc).

        The requests are held weakly: a builder must not keep a finished batch's requests (their token
        lists, their ``prefix_indices`` on the device) alive while the server idles or only prefills, as
        SGLang itself does not. A dead reference gives None, which no request equals, so an id reused by
        a new request can never match. (Their last nodes are held: a few small radix nodes.)"""
        return ([ref() for ref in self.req_refs] == reqs and last_nodes == self.last_nodes
                and _placement(reqs) == self.placement
                and bool(np.array_equal(seq > self.end, self.has_tail)) and bool((seq >= self.end).all()))


class DecodeKVTreeBuilder:
    """Builds each decode step's KV tree over one ``req_to_token`` table, reusing the last step's
    radix part when it still holds (module doc). Hold one per server and call :meth:`build` per step."""

    def __init__(self, req_to_token: torch.Tensor):
        if req_to_token.dtype != torch.int32 or req_to_token.dim() != 2:
            raise ValueError(f"req_to_token must be a 2-D int32 tensor, got {req_to_token.dtype} "
                             f"{tuple(req_to_token.shape)}")
        if req_to_token.numel() >= 1 << 31:  # the gather's flat positions are int32
            raise ValueError(f"req_to_token has {req_to_token.numel()} entries; deft indexes it with int32 "
                             "(at most 2^31 - 1): lower --max-running-requests or --context-length")
        self.req_to_token = req_to_token
        self.device = req_to_token.device
        self._flat = req_to_token.view(-1)
        self._staging = PinnedStagingRing(self.device)
        self._arange = torch.zeros(0, dtype=torch.int32, device=self.device)
        self._shape: _BatchShape | None = None

    def same_batch_as_last(self, reqs: list, seq_lens: np.ndarray) -> bool:
        """The last build's requests, in the same order on the same radix nodes, tails only grown:
        a build of this batch would reuse the last radix part."""
        return self._shape is not None and self._shape.matches(reqs, [r.last_node for r in reqs], seq_lens)

    def build(self, reqs: Sequence, seq_lens_cpu: torch.Tensor | Sequence[int],
              kv_out: torch.Tensor | None = None, tail_slack: int = 0,
              max_kv_tokens: int | None = None) -> DecodeKVTree:
        """The KV tree of a decode batch.

        Args:
            reqs: the batch's ``Req`` objects in batch order (``ModelWorkerBatch.reqs``); read:
                ``req.last_node`` (a radix ``TreeNode``, the root, or ``None``) and ``req.req_pool_idx``
                (its ``req_to_token`` row, as in ``ForwardBatch.req_pool_indices``).
            seq_lens_cpu: ``[B]`` host sequence lengths, the new token included (its slot is already
                written at position ``seq_len - 1``).
            kv_out: optional int32 device buffer the KV slots are written into (``kv_out[:T]``; the
                tree's ``kv_indices`` is then that view), e.g. a CUDA graph's plan buffer; one that
                is too small is not used.
            tail_slack: up to this many positions of room after every private tail, as an unused
                node (see :class:`TailSlack`; ``unique_tokens`` does not count them); none when the
                tree would then hold more than ``max_kv_tokens`` positions.

        Query b attends its whole path, whose KV concatenated is ``req_to_token[row_b, :seq_len_b]``.
        Nodes are the radix nodes on the batch's paths and each request's non-empty private tail; a
        chain of nodes that serve the same queries is one node (so a request that shares nothing is a
        single node). ``node_parent[i] < i``.

        Raises:
            KVTreeBuildError: a path longer than its request's sequence, an evicted node on a path, or
                paths from two different radix trees.
        """
        reqs, seq, shape, reused = self._batch_shape(reqs, seq_lens_cpu)
        lens = _node_lengths(shape, seq)
        unique = int(lens.sum())
        tails = None
        nodes = (shape.parent, shape.query_node, shape.start, shape.row, lens)
        if self._room_for(tail_slack, len(shape.tail_node), unique, max_kv_tokens):
            tails, nodes, _ = _with_slack_nodes(nodes, shape.tail_node, shape.tail_req, seq[shape.tail_req],
                                                tail_slack, self.req_to_token.shape[1], num_tails=len(shape.tail_node))
        tree = self._gather(*nodes, kv_out)
        return DecodeKVTree(tree=tree, attended_tokens=int(seq.sum()), unique_tokens=unique, reused_shape=reused,
                            tails=tails)

    def build_window(self, reqs: Sequence, seq_lens_cpu: torch.Tensor | Sequence[int], window: int,
                     kv_out: torch.Tensor | None = None, tail_slack: int = 0,
                     max_kv_tokens: int | None = None) -> DecodeKVTree:
        """The KV tree of a sliding-window layer: query b attends only the last ``window`` tokens of its
        path, ``req_to_token[row_b, max(seq_len_b - window, 0):seq_len_b]``.

        Queries whose windows start at the same position of a node (a fork's branches, which grow in step)
        share it from there and everything below it. Queries whose windows start at different positions of
        one node (branches of different lengths) share it from the latest start of their run and each reads
        its positions before that as a private node at the end of its path; different runs of one node part,
        and what lies below it is repeated under each run (``_window_nodes``, ``_run_skips``: exact either
        way). Every query whose window covers its whole path keeps the tree of :meth:`build`. Arguments and
        errors as :meth:`build`; the radix part is :meth:`build`'s (reused, or kept for the next step, the same
        way). With ``tail_slack`` (and room
        for it) the tails and the private nodes get their unused nodes as in :meth:`build`, and ``moving``
        says which roots and private nodes move with their windows (:class:`MovingStarts`)."""
        if window < 1:
            raise ValueError(f"a sliding window of {window} tokens; a decode query attends at least its own token")
        reqs, seq, shape, reused = self._batch_shape(reqs, seq_lens_cpu)
        lens = _node_lengths(shape, seq)
        cut = np.maximum(seq - window, 0)
        if cut.any():
            nodes, extras = _window_nodes(shape, lens, cut)
        else:
            nodes = (shape.parent, shape.query_node, shape.start, shape.row, lens)
            extras = _WindowExtras(*(np.zeros(0, np.int64) for _ in range(3)), leaf=shape.query_node)
        unique = int(nodes[4].sum())
        tails = moving = None
        if self._room_for(tail_slack, len(shape.tail_node) + len(extras.node), unique, max_kv_tokens):
            parent, query_node = nodes[0], nodes[1]
            # What grows by a position a step: each tail (the node its query's path ends with but for a private
            # node: what a chain merge joined the tail to ends with it), and each private node, whose start moves
            # on too (a step later its query's window starts a position later, and its run's too).
            grown = (np.concatenate([extras.leaf[shape.tail_req], extras.node]),
                     np.concatenate([shape.tail_req, extras.req]), np.concatenate([seq[shape.tail_req], extras.end]))
            lens_before = nodes[4]
            tails, nodes, new_id = _with_slack_nodes(nodes, *grown, tail_slack, self.req_to_token.shape[1],
                                                     num_tails=len(shape.tail_node))
            roots = np.unique(_roots(parent)[query_node[cut > 0]])
            first = np.cumsum(nodes[4]) - nodes[4]  # each node's first kv position
            # The shape holds while each query that still attends its whole sequence stays within its window and
            # each moving root that does not grow (a root that is its query's tail loses and gains a position a
            # step) keeps a position.
            covered = seq[cut == 0]
            shrinking = lens_before[np.setdiff1d(roots, grown[0])]
            room = min(int((window - covered).min(initial=tail_slack)), int(shrinking.min(initial=tail_slack + 1)) - 1)
            moving = MovingStarts(start=first[new_id[np.concatenate([roots, extras.node])]], room=room)
        tree = self._gather(*nodes, kv_out)
        return DecodeKVTree(tree=tree, attended_tokens=int(np.minimum(seq, window).sum()), unique_tokens=unique,
                            reused_shape=reused, tails=tails, moving=moving)

    @staticmethod
    def _room_for(tail_slack: int, tails: int, unique: int, max_kv_tokens: int | None) -> bool:
        """Whether a tree of ``unique`` tokens gets ``tail_slack`` positions of room after each of its tails."""
        return (tail_slack > 0 and tails > 0
                and (max_kv_tokens is None or unique + tail_slack * tails <= max_kv_tokens))

    def _batch_shape(self, reqs: Sequence, seq_lens_cpu) -> tuple[list, np.ndarray, _BatchShape, bool]:
        """The batch's requests, int64 lengths and radix part (the last one when it still holds)."""
        reqs = list(reqs)
        seq = (seq_lens_cpu.numpy() if isinstance(seq_lens_cpu, torch.Tensor) else np.asarray(seq_lens_cpu))
        seq = seq.astype(np.int64, copy=False)
        if len(seq) != len(reqs):
            raise KVTreeBuildError(f"batch mismatch: {len(reqs)} reqs, {len(seq)} seq_lens")
        last_nodes = [r.last_node for r in reqs]
        shape = self._shape
        reused = shape is not None and shape.matches(reqs, last_nodes, seq)
        if not reused:
            shape = self._shape = _batch_shape(reqs, last_nodes, seq)
        return reqs, seq, shape, reused

    def _gather(self, parent: np.ndarray, query_node: np.ndarray, start: np.ndarray, row: np.ndarray,
                lens: np.ndarray, kv_out: torch.Tensor | None) -> KVTree:
        """The tree whose node o holds ``req_to_token[row[o], start[o]:start[o] + lens[o]]``."""
        indptr = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=indptr[1:])
        T = int(indptr[-1])
        # Token t of node o is flat[row[o] * width + start[o] + (t - indptr[o])]: base[o] + t.
        base = row * self.req_to_token.shape[1] + start - indptr[:-1]
        host = np.concatenate([base, lens]).astype(np.int32)
        N = len(lens)
        dev = self._staging.upload(host)
        if self._arange.numel() < T:
            self._arange = torch.arange(max(T, 2 * self._arange.numel()), dtype=torch.int32, device=self.device)
        flat = torch.repeat_interleave(dev[:N], dev[N:], output_size=T)
        flat += self._arange[:T]
        if kv_out is not None and kv_out.numel() >= T:
            kv_indices = torch.index_select(self._flat, 0, flat, out=kv_out[:T])
        else:
            kv_indices = torch.index_select(self._flat, 0, flat)
        return KVTree(kv_indices, torch.from_numpy(indptr.astype(np.int32)), torch.from_numpy(parent),
                      torch.from_numpy(query_node))


def _node_lengths(shape: _BatchShape, seq: np.ndarray) -> np.ndarray:
    """The shape's node lengths at these sequence lengths (its private tails grown to them)."""
    lens = shape.fixed_len.copy()
    lens[shape.tail_node] += seq[shape.tail_req] - shape.end[shape.tail_req]
    return lens


@dataclass(frozen=True)
class _WindowExtras:
    """The private nodes of a window tree (``_window_nodes``): query ``req[e]`` reads positions
    ``[its cut, end[e])`` of its top node on its own, as node ``node[e]``, the last of its path."""

    node: np.ndarray  # [E] int64 node ids (the tree's last E nodes)
    req: np.ndarray  # [E] int64 the query (batch index)
    end: np.ndarray  # [E] int64 the row position just past it: where the query's run starts to share its top node
    leaf: np.ndarray  # [B] int64 each query's last node but its extra one (its private tail, where it has one)


def _window_nodes(shape: _BatchShape, lens: np.ndarray, cut: np.ndarray):
    """((parent, query_node, start, row, lens), extras) of the tree in which query b attends its path from
    position ``cut[b]`` on (``build_window``), in numpy (a walk per query cost ~1 ms a step at 256 queries).

    Query b keeps the nodes of its path that end past its cut (all of them when it has none): the top one
    from the cut on, the rest whole (the positions below a window's start are all in it). The queries whose
    windows start in one top node at different places (a fork's branches of different lengths) would share
    nothing if each read the top node from its own start. So they share it from the latest start of a *run*
    of them (``_run_skips``), and each query that starts earlier reads the positions up to there as a private
    node at the end of its path (attention is a softmax over a set of positions: their order on the path does
    not matter): its node n is identified by (its top kept node, its run's start in it, n), so the queries of
    a run share the top node from the run's start and everything below it, and different runs part. Queries
    whose windows cover their whole sequence (cut 0) never join a run whose windows start later (their
    windows do not move with the others'). Then, as in a full build, a node with one child and no query
    ending there is one segment with that child (a window that starts at its own place would otherwise leave
    a chain of nodes serving one query); the private nodes come after that, one per query at most."""
    parent = shape.parent.astype(np.int64)
    start, row = shape.start, shape.row
    end = start + lens
    # Each query's path, leaf first: column j holds its j-th node above its own (-1 past the root).
    cols = [shape.query_node.astype(np.int64)]
    while (cols[-1] >= 0).any():
        c = cols[-1]
        cols.append(np.where(c >= 0, parent[np.maximum(c, 0)], -1))
    path = np.stack(cols[:-1], axis=1)
    kept = (path >= 0) & ((cut[:, None] == 0) | (end[np.maximum(path, 0)] > cut[:, None]))
    depth = kept.sum(1)  # a query's kept nodes are its path's first `depth` (an ancestor ends before its child)
    top = path[np.arange(len(cut)), depth - 1]
    top_skip = np.maximum(cut - start[top], 0)
    moving = cut > 0
    run_skip = top_skip.copy()
    mq = np.flatnonzero(moving)
    has_tail = np.zeros(len(cut), bool)
    has_tail[shape.tail_req] = True

    def below():
        """The nodes below each moving query's top node (its kept path but the top): each run of the top node
        repeats those its queries use, so parting a node's users between runs reads the node once more. Not the
        private tails, which have one user each."""
        under = kept[mq]
        under[np.arange(len(mq)), depth[mq] - 1] = False
        under[:, 0] &= ~has_tail[mq]  # a query's tail is its leaf (column 0)
        bq, bj = np.nonzero(under)
        node = path[mq[bq], bj]
        return bq, node, lens[node]

    run_skip[mq] = _run_skips(top[mq], top_skip[mq], lens[top[mq]], below)
    qb, qj = np.nonzero(kept)
    node, first, skip = path[qb, qj], top[qb], run_skip[qb]
    # Parents first: within one (top node, skip), an ancestor is fewer levels below the top.
    order = np.lexsort((node, depth[qb] - qj, skip, first))
    keys = np.stack([first[order], skip[order], node[order]])
    fresh = np.ones(len(order), bool)
    fresh[1:] = (np.diff(keys, axis=1) != 0).any(0)
    ids = np.empty(len(order), np.int64)
    ids[order] = np.cumsum(fresh) - 1
    entry = np.full(path.shape, -1, np.int64)
    entry[qb, qj] = ids
    up = np.full(path.shape, -1, np.int64)  # each entry's parent: the kept entry one column up
    up[:, :-1] = entry[:, 1:]
    n_nodes = int(ids.max()) + 1
    o_parent = np.empty(n_nodes, np.int64)
    o_parent[ids] = up[qb, qj]
    o_node = np.empty(n_nodes, np.int64)
    o_node[ids] = node
    o_skip = np.empty(n_nodes, np.int64)
    o_skip[ids] = np.where(node == first, skip, 0)
    o_start, o_len, o_row = start[o_node] + o_skip, lens[o_node] - o_skip, row[o_node]
    query_node = entry[:, 0]

    # The positions of a chain's nodes follow each other in the row of its deepest node (the largest id: parents
    # first), which holds every position above it too.
    heads, merged, m_parent, last = _merge_chains(o_parent, query_node)
    leaf = merged[query_node]
    m_start, m_row, m_len = o_start[heads], o_row[last], np.bincount(merged, weights=o_len).astype(np.int64)

    # Each query that starts before its run: its positions up to the run's start, in its own row, under its leaf.
    req = np.flatnonzero(run_skip > top_skip)
    ids = len(m_start) + np.arange(len(req))
    query = leaf.copy()
    query[req] = ids
    extra_start = start[top[req]] + top_skip[req]
    extra_end = start[top[req]] + run_skip[req]
    nodes = (np.concatenate([m_parent, leaf[req]]).astype(np.int32), query.astype(np.int32),
             np.concatenate([m_start, extra_start]), np.concatenate([m_row, row[shape.query_node[req]]]),
             np.concatenate([m_len, extra_end - extra_start]))
    return nodes, _WindowExtras(node=ids, req=req, end=extra_end, leaf=leaf)


def _merge_chains(parent: np.ndarray, query_node: np.ndarray):
    """Chains of nodes as single segments: a node whose parent has it as its only child and no query ending there
    serves exactly its parent's queries, so it continues its parent's segment (a request that shares nothing is
    one node, and a tree has at most 2B - 1 segments). ``parent`` [N] int64, parents first (-1: a root);
    ``query_node`` [B]. Returns (heads [N] bool: the nodes that start a segment, each node's segment [N] int64,
    the segments' parents [M] int64 (-1: a root), each segment's deepest node [M] int64); segments are numbered
    in their heads' order, so parents first too."""
    n = len(parent)
    has_parent = parent >= 0
    up = np.maximum(parent, 0)
    children = np.bincount(parent[has_parent], minlength=n)
    ending = np.bincount(query_node, minlength=n)
    joins = has_parent & (children[up] == 1) & (ending[up] == 0)
    head = np.where(joins, parent, np.arange(n))
    while True:  # each node's chain head: pointer jumping, a few rounds for any chain length
        nxt = head[head]
        if np.array_equal(nxt, head):
            break
        head = nxt
    heads = ~joins
    merged = (np.cumsum(heads) - 1)[head]
    last = np.zeros(int(heads.sum()), np.int64)
    np.maximum.at(last, merged, np.arange(n))
    return heads, merged, np.where(has_parent[heads], merged[up[heads]], -1), last


def _run_skips(top: np.ndarray, skip: np.ndarray, top_len: np.ndarray,
               below: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """For queries whose windows start ``skip`` positions into their top node ``top`` (of ``top_len``
    positions), where each one's run starts sharing that node (``_window_nodes``). A run is a range of one
    top node's distinct starts, shared from its latest: it reads the node from there once, and each of its
    queries reads its positions before that privately, and the nodes below the top node that its queries use
    (``below()``: entries (query, node, node length); asked for only where some top node has two starts). The
    runs are chosen to read few positions. Over a node's starts s_0 < s_1 < ... with m_l queries each, Q and P
    the prefix sums of m_l and m_l s_l, and C[i] what a run starting at s_i reads again below the top node (the
    nodes whose users' starts lie on both sides of it; C[0] = 0),

        best[j + 1] = (len - s_j) + s_j Q[j + 1] - P[j + 1] + min over i <= j of (best[i] + C[i] + P[i] - s_j Q[i]),

    the minimum of lines of falling slope -Q[i] at rising s_j: a monotone convex-hull walk, linear in the
    starts (a Python loop over at most one entry per query: ~0.36 ms for 256 starts in one node on the 2-core
    box, against several ms for a numpy minimum per start). C counts a node below the top once per run that
    overlaps the range of its users' starts: exact when no other start lies among them (a nested fork's
    groups each spanning the same lengths, or each its own). Else it may count a node for a run that holds none
    of its users, so where C is not zero the runs without it are found too, and whichever reads fewer positions
    (counted exactly) is kept. Full plans only: steady steps keep the runs."""
    run = skip.copy()
    if len(skip) < 2:
        return run
    width = int(skip.max()) + 1
    keys, inverse, counts = np.unique(top * width + skip, return_inverse=True, return_counts=True)
    if not (keys[1:] // width == keys[:-1] // width).any():
        return run  # one start per top node: every run is one start
    length = np.zeros(len(keys), np.int64)
    length[inverse] = top_len
    # C of every start: a node below a top node adds its length to the starts after the first of its users' and
    # up to the last (a run starting there parts them). The ranges' ends by (top node, node) pair, as a difference
    # array over the keys, which are sorted by top node: each range stays within its top node's starts.
    again = [0] * len(keys)
    shared: list[tuple[int, int, int]] = []  # (start index, pair, length) of every node below a top node, by user
    entries = below() if below is not None else None
    if entries is not None and len(entries[0]):
        q, node, node_len = entries
        pair = top[q] * (int(node.max()) + 1) + node
        k = inverse[q]
        order = np.lexsort((k, pair))
        pair, k, node_len = pair[order], k[order], node_len[order]
        first = np.ones(len(pair), bool)
        first[1:] = pair[1:] != pair[:-1]
        last = np.ones(len(pair), bool)
        last[:-1] = first[1:]
        diff = (np.bincount(k[first] + 1, weights=node_len[first], minlength=len(keys) + 1)
                - np.bincount(k[last] + 1, weights=node_len[last], minlength=len(keys) + 1))
        again = np.cumsum(diff[:-1]).astype(np.int64).tolist()
        shared = sorted(zip(k.tolist(), pair.tolist(), node_len.tolist()))
    tops, starts = (keys // width).tolist(), (keys % width).tolist()
    counts, length = counts.tolist(), length.tolist()
    run_of = list(starts)
    lo = e = 0
    while lo < len(keys):
        hi = lo + 1
        while hi < len(keys) and tops[hi] == tops[lo]:
            hi += 1
        e0 = e
        while e < len(shared) and shared[e][0] < hi:
            e += 1
        if hi - lo > 1:
            s, m = starts[lo:hi], counts[lo:hi]
            runs = _runs_of_one_node(s, m, again[lo:hi], length[lo])
            if any(again[lo + 1:hi]):
                # C overcounts a node whose users' starts have another's among them: keep whichever of the runs
                # with and without C reads fewer positions, counted exactly (never more than without C).
                below_here = [(k - lo, pair, size) for k, pair, size in shared[e0:e]]
                plain = _runs_of_one_node(s, m, [0] * (hi - lo), length[lo])
                if _positions(s, m, plain, length[lo], below_here) < _positions(s, m, runs, length[lo], below_here):
                    runs = plain
            run_of[lo:hi] = runs
        lo = hi
    return np.asarray(run_of, np.int64)[inverse]


def _positions(s: list[int], m: list[int], runs: list[int], top_length: int, below: list[tuple[int, int, int]]) -> int:
    """The positions one top node's runs read: the node from each run's start, each query's private positions before
    its run's, and each node below it once per run that holds one of its users (``below``: (start index, node,
    length) per user start)."""
    top = sum(top_length - r for r in set(runs)) + sum(c * (r - x) for x, c, r in zip(s, m, runs))
    return top + sum({(node, runs[k]): size for k, node, size in below}.values())


def _runs_of_one_node(s: list[int], m: list[int], again: list[int], top_length: int) -> list[int]:
    """``_run_skips``' programme for one top node's starts ``s`` (ascending) with ``m`` queries each and ``again``
    (C) each: each start's run start."""
    n = len(s)
    best, first = [0] * (n + 1), [0] * n
    # The lower envelope of the lines so far (slopes falling), as parallel lists; `head`: the best at s_j
    slope, intercept, index = [], [], []
    head = q = p = 0  # q, p: Q[j], P[j]
    for j in range(n):
        k3, b3 = -q, best[j] + again[j] + p  # the line of i = j
        while len(slope) - head >= 2:  # drop the last line where it is nowhere below both neighbours
            k1, b1, k2, b2 = slope[-2], intercept[-2], slope[-1], intercept[-1]
            if (b3 - b1) * (k1 - k2) > (b2 - b1) * (k1 - k3):
                break
            slope.pop(), intercept.pop(), index.pop()
        slope.append(k3), intercept.append(b3), index.append(j)
        x = s[j]
        while len(slope) - head >= 2 and slope[head + 1] * x + intercept[head + 1] <= slope[head] * x + intercept[head]:
            head += 1
        q, p = q + m[j], p + m[j] * x
        best[j + 1] = (top_length - x) + x * q - p + slope[head] * x + intercept[head]
        first[j] = index[head]
    run_of = list(s)
    j = n - 1
    while j >= 0:
        for l in range(first[j], j + 1):
            run_of[l] = s[j]
        j = first[j] - 1
    return run_of


def _with_slack_nodes(nodes: tuple, tail_node: np.ndarray, tail_req: np.ndarray, tail_end: np.ndarray,
                      tail_slack: int, width: int, num_tails: int):
    """Insert an unused child after every tail node (``nodes``: parent, query_node, start, row, lens; node
    ``tail_node[j]`` grows in request ``tail_req[j]``'s row, where it ends at position ``tail_end[j]``): its
    positions are the row's next ones, so the steps that follow can write their new token there (no query
    reads an unused node). Returns the tails, the new nodes and each old node's new id."""
    old_parent, query_node, old_start, old_row, lens = nodes
    N = len(lens)
    is_tail = np.zeros(N, np.int64)
    is_tail[tail_node] = 1
    new_id = np.arange(N) + np.cumsum(is_tail) - is_tail  # one slack node after each earlier tail
    slack_id = new_id[tail_node] + 1
    total = N + len(tail_node)
    slack = np.minimum(tail_slack, width - tail_end)
    parent = np.empty(total, np.int32)
    parent[new_id] = np.where(old_parent >= 0, new_id[old_parent], -1)
    parent[slack_id] = new_id[tail_node]
    start, row, new_lens = (np.empty(total, np.int64) for _ in range(3))
    start[new_id], start[slack_id] = old_start, tail_end
    row[new_id], row[slack_id] = old_row, old_row[tail_node]
    new_lens[new_id], new_lens[slack_id] = lens, slack
    indptr_end = np.cumsum(new_lens)
    tails = TailSlack(req=tail_req, end=indptr_end[new_id[tail_node]],
                      next_flat=old_row[tail_node] * width + tail_end, slack=slack, num_tails=num_tails)
    return tails, (parent, new_id[query_node].astype(np.int32), start, row, new_lens), new_id


def _roots(parent: np.ndarray) -> np.ndarray:
    """Each node's root (``parent`` -1 at a root), by pointer jumping: a few rounds for any depth."""
    up = np.where(parent >= 0, parent, np.arange(len(parent))).astype(np.int64)
    while True:
        nxt = up[up]
        if np.array_equal(nxt, up):
            return up
        up = nxt


def build_decode_kv_tree(reqs: Sequence, req_to_token: torch.Tensor,
                         seq_lens_cpu: torch.Tensor | Sequence[int]) -> DecodeKVTree:
    """One decode step's KV tree, built from scratch (:meth:`DecodeKVTreeBuilder.build`)."""
    return DecodeKVTreeBuilder(req_to_token).build(reqs, seq_lens_cpu)


def _batch_shape(reqs: list, last_nodes: list, seq: np.ndarray) -> _BatchShape:
    """The radix part of the batch's KV tree (a full build); ``seq`` [B] int64."""
    try:
        l_parent, l_start, l_len, l_req, q_local, end, tail_local = _radix_paths(reqs, seq.tolist())
    except AttributeError as e:  # a node with .parent but not .key/.value
        raise KVTreeBuildError(f"req.last_node must be a radix TreeNode (.parent, .key, .value) or None: {e}") from e

    # A chain's segment is read from its deepest node's request's row, which holds every position above it too.
    q_local = np.array(q_local, np.int64)
    heads, out_of, o_parent, last = _merge_chains(np.array(l_parent, np.int64), q_local)
    fixed_len = np.bincount(out_of, weights=np.array(l_len, np.int64)).astype(np.int64)
    end_arr = np.array(end, np.int64)
    has_tail = seq > end_arr  # exactly the requests _radix_paths gave a tail node
    tail_req_arr = np.flatnonzero(has_tail)
    tail_node_arr = out_of[np.array(tail_local, np.int64)[tail_req_arr]]
    fixed_len[tail_node_arr] -= seq[tail_req_arr] - end_arr[tail_req_arr]
    try:
        placement = _placement(reqs)
    except AttributeError as e:
        raise KVTreeBuildError(f"a request without req_pool_idx (its req_to_token row) or retraction_count: {e}") from e
    rows = np.array([placement[r][0] for r in np.array(l_req, np.int64)[last].tolist()], np.int64)
    return _BatchShape(
        req_refs=[_weak(r) for r in reqs], last_nodes=last_nodes, placement=placement, end=end_arr, has_tail=has_tail,
        parent=o_parent.astype(np.int32), query_node=out_of[q_local].astype(np.int32),
        start=np.array(l_start, np.int64)[heads], row=rows, fixed_len=fixed_len,
        tail_node=tail_node_arr, tail_req=tail_req_arr)


def _weak(obj):
    """A weak reference to ``obj``, or a strong one where it takes none (test stubs, e.g. SimpleNamespace)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def _placement(reqs) -> list[tuple[int, int]]:
    """Each request's ``req_to_token`` row and how often it was retracted or preempted
    (``Req.reset_for_retract`` counts them). Either changes when its KV slots do: a retracted request
    comes back in another row, or in the same one (a request pool no larger than the batch) with new
    slots written by its re-prefill."""
    return [(r.req_pool_idx, r.retraction_count) for r in reqs]


def _radix_paths(reqs, seq_lens):
    """The radix nodes on the batch's paths plus the private tails, as parallel lists (local ids,
    parents first), the local node each query ends at, each request's radix path length and its
    private tail's local id (-1: none). O(B + radix nodes first reached)."""
    # Radix nodes reached this step, in discovery order (parents first). Per local node:
    # parent local id (-1: child of the root), start position along the path, length, one request
    # whose path contains it.
    local_of: dict = {}
    l_parent: list[int] = []
    l_start: list[int] = []
    l_len: list[int] = []
    l_req: list[int] = []
    q_local: list[int] = []  # the local node query b ends at
    ends: list[int] = []  # request b's radix path length
    tails: list[int] = []  # request b's private tail node (-1: none)
    root = None
    chain: list = []
    for b, req in enumerate(reqs):
        seq_len = seq_lens[b]
        node = req.last_node
        if node is not None and not hasattr(node, "parent"):
            # Not a radix node: a streaming session's later turns continue from the session's own
            # req_to_token row (SessionAwareCache's _VirtualNode). The row holds the whole context,
            # so the request is one private node: correct, it just shares nothing.
            node = None
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
                                       "was evicted from the device (value None: the hierarchical cache moved its KV "
                                       "to the host); a running request's path must stay on the device")
            n = len(x.key)
            i = len(l_parent)
            local_of[x] = i
            l_parent.append(above)
            l_start.append(end)
            l_len.append(n)
            l_req.append(b)
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
            q_local.append(i)
            tails.append(i)
        else:  # empty tail: the query ends at its last radix node (or has no KV at all)
            if above < 0:
                raise KVTreeBuildError(f"request {b} (rid={getattr(req, 'rid', '?')}) has seq_len {seq_len}: "
                                       "a decode query attends at least its own token")
            q_local.append(above)
            tails.append(-1)
        ends.append(end)

    return l_parent, l_start, l_len, l_req, q_local, ends, tails
