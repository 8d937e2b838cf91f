"""Tree cases for the kernel benchmark, and the index arrays each provider takes.

Pure torch on the host (no CUDA, no FlashInfer, no SGLang): ``tests/test_bench_trees.py`` checks on
CPU that every case is a valid ``KVTree`` of the size its name says, and that the arrays built for
each baseline expand to exactly the KV slots of each query's root-to-node path.

KV slot layout. SGLang's token pool hands out slots from a free list: a fresh request's prefill gets
mostly one contiguous run, decode tokens of a batch are interleaved (one slot per request per step),
and after some churn the free list is fragmented. We model that as *runs*: the pool is cut into runs
of ``run`` slots (32 by default), the runs are shuffled, and every node takes the next
``ceil(len / run)`` runs of the shuffled list (its tokens are contiguous inside a run, runs are
scattered over the pool, the tail of a node's last run stays unused). No provider gets a contiguous
KV range it could stream, and none pays a per-token scatter that a real pool would not have either.
``run=1`` gives a fully random per-token layout.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

try:
    from sglang_deft.kernels import KVTree
    from sglang_deft.kernels.reference import path_nodes
except ImportError:  # running from a checkout that is not pip-installed: kernels/ is the package
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kernels import KVTree  # type: ignore[no-redef]
    from kernels.reference import path_nodes  # type: ignore[no-redef]

DEFAULT_RUN = 32


@dataclass(frozen=True)
class TreeShape:
    """A tree without KV slots: node lengths, parents (parent < child) and the node each query ends at."""

    node_len: tuple[int, ...]
    node_parent: tuple[int, ...]
    query_node: tuple[int, ...]

    @property
    def num_nodes(self) -> int:
        return len(self.node_len)

    @property
    def num_queries(self) -> int:
        return len(self.query_node)

    def path(self, node: int) -> list[int]:
        out = []
        while node != -1:
            out.append(node)
            node = self.node_parent[node]
        return out[::-1]

    def depth(self) -> list[int]:
        d = []
        for p in self.node_parent:
            d.append(0 if p == -1 else d[p] + 1)
        return d

    @property
    def unique_tokens(self) -> int:
        """KV tokens of the nodes some query attends (what a tree-aware kernel must read once)."""
        used = set()
        for n in self.query_node:
            used.update(self.path(n))
        return sum(self.node_len[n] for n in used)

    @property
    def path_tokens(self) -> int:
        """KV tokens summed over queries (what a one-sequence-at-a-time kernel reads)."""
        return sum(sum(self.node_len[n] for n in self.path(q)) for q in self.query_node)


def fork_tree(levels: list[tuple[int, int]]) -> TreeShape:
    """A uniform fork tree: ``levels[i] = (fan-out, tokens per node)``; one query per leaf.

    ``[(1, 4096), (16, 256)]`` is a 4096-token prefix with 16 branches of 256 tokens. Nodes are
    numbered breadth-first, so queries (leaves) under one parent are consecutive.
    """
    node_len: list[int] = []
    node_parent: list[int] = []
    frontier = [-1]
    for fanout, length in levels:
        nxt = []
        for parent in frontier:
            for _ in range(fanout):
                node_parent.append(parent)
                node_len.append(length)
                nxt.append(len(node_len) - 1)
        frontier = nxt
    return TreeShape(tuple(node_len), tuple(node_parent), tuple(frontier))


def no_sharing(num_queries: int, length: int) -> TreeShape:
    """A forest of independent sequences: plain batched decode."""
    return TreeShape((length,) * num_queries, (-1,) * num_queries, tuple(range(num_queries)))


def spec_tree(prefix: int, level_sizes: tuple[int, ...], seed: int = 0) -> TreeShape:
    """A speculative-decoding token tree under a shared prefix.

    Node 0 is the prefix; below it ``len(level_sizes)`` levels of one-token draft nodes. Each node
    of level l picks its parent among level l-1 with weight 1/(rank+1) (likelier draft tokens get
    more children, as in EAGLE-style top-k trees; unlucky ones stay leaves at any depth). Every
    draft node is a query, so queries end at inner nodes as well as at leaves: query b attends the
    prefix and its own ancestors only.
    """
    rng = random.Random(seed)
    node_len = [prefix]
    node_parent = [-1]
    prev = [0]
    for size in level_sizes:
        weights = [1.0 / (r + 1) for r in range(len(prev))]
        parents = sorted(rng.choices(prev, weights=weights, k=size))
        cur = []
        for p in parents:
            node_parent.append(p)
            node_len.append(1)
            cur.append(len(node_len) - 1)
        prev = cur
    return TreeShape(tuple(node_len), tuple(node_parent), tuple(range(1, len(node_len))))


def plan_tree_300() -> TreeShape:
    """256 queries on a 300-node tree (issue 3's planning-cost target): 1k root, 43 mid nodes, 256 leaves."""
    node_len = [1024] + [128] * 43
    node_parent = [-1] + [0] * 43
    for i in range(256):
        node_parent.append(1 + i % 43)
        node_len.append(64)
    # parent < child holds: mid nodes are 1..43, leaves 44..299.
    return TreeShape(tuple(node_len), tuple(node_parent), tuple(range(44, 300)))


@dataclass(frozen=True)
class Case:
    key: str  # short id for --cases
    name: str  # the row label (the DESIGN.md wording for its six trees)
    shape: TreeShape
    num_qo_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    design_shared: bool = False  # one of DESIGN.md's five shared trees: enters the geomean
    note: str = ""
    tags: tuple[str, ...] = field(default=())


def all_cases() -> list[Case]:
    """Every benchmark case, in the order they run (the spec tree last: FlashInfer's cascade is
    tried with empty levels there, see bench_kernels.py)."""
    p16k = fork_tree([(1, 16384), (64, 256)])
    p1k = fork_tree([(1, 1024), (256, 128)])
    return [
        Case("p4k_16", "prefix 4k, 16 x 256", fork_tree([(1, 4096), (16, 256)]), design_shared=True),
        Case("p4k_64", "prefix 4k, 64 x 256", fork_tree([(1, 4096), (64, 256)]), design_shared=True),
        Case("p16k_64", "prefix 16k, 64 x 256", p16k, design_shared=True),
        Case("p1k_256", "prefix 1k, 256 x 128", p1k, design_shared=True),
        Case("tree3", "2k -> 4 x 1k -> 16 x 256 each", fork_tree([(1, 2048), (4, 1024), (16, 256)]),
             design_shared=True),
        Case("nosharing", "no sharing, 64 x 2k", no_sharing(64, 2048)),
        Case("tree4", "4-level: 1k -> 4 x 512 -> 4 x 256 -> 4 x 128 each",
             fork_tree([(1, 1024), (4, 512), (4, 256), (4, 128)])),
        Case("p16k_64_h64", "prefix 16k, 64 x 256 (64 q / 8 kv heads)", p16k, num_qo_heads=64),
        Case("p1k_256_h64", "prefix 1k, 256 x 128 (64 q / 8 kv heads)", p1k, num_qo_heads=64),
        Case("spec", "spec: prefix 2k + 64-token draft tree (4 levels: 8/16/20/20)",
             spec_tree(2048, (8, 16, 20, 20)),
             note="every draft node holds 1 token and is a query; 30 of the 64 end at inner nodes"),
    ]


def low_concurrency_cases() -> list[Case]:
    """Small batches a single-user or lightly loaded server decodes (``--cases low_concurrency``, not
    in ``all``): the README's "always deft" rule was measured at 64 requests; these check it where
    a step has too few queries to fill the GPU without splitting each request's KV."""
    return [
        Case("b1_4k", "1 request, 4k", no_sharing(1, 4096)),
        Case("b1_32k", "1 request, 32k", no_sharing(1, 32768)),
        Case("b4_8k", "no sharing, 4 x 8k", no_sharing(4, 8192)),
        Case("b8_8k", "no sharing, 8 x 8k", no_sharing(8, 8192)),
        Case("b16_2k", "no sharing, 16 x 2k", no_sharing(16, 2048)),
        Case("b16_8k", "no sharing, 16 x 8k", no_sharing(16, 8192)),
        Case("n4_p2k", "n = 4: prefix 2k, 4 x 256", fork_tree([(1, 2048), (4, 256)])),
        Case("n8_p8k", "n = 8: prefix 8k, 8 x 128", fork_tree([(1, 8192), (8, 128)])),
    ]


def head_dim_cases() -> list[Case]:
    """Other models' head shapes (``--cases head_dims``, not in ``all``): Llama-3.2-1B's 32 q / 8 kv heads
    of 64, Phi-3-mini's 32 / 32 of 96 (padded to 128), Gemma-7B's 16 / 16 of 256 and 16 / 8 of 256, each
    on the 4k prefix shared by 64 requests and without sharing."""
    p4k = fork_tree([(1, 4096), (64, 256)])
    flat = no_sharing(64, 2048)
    return [case for hq, hkv, d, tag in [(32, 8, 64, ""), (32, 32, 96, ""), (16, 16, 256, ""), (16, 8, 256, "_g2")]
            for case in (
        Case(f"p4k_64_d{d}{tag}", f"prefix 4k, 64 x 256 ({hq} q / {hkv} kv heads of {d})", p4k, hq, hkv, d),
        Case(f"nosharing_d{d}{tag}", f"no sharing, 64 x 2k ({hq} q / {hkv} kv heads of {d})", flat, hq, hkv, d))]


def every_case() -> list[Case]:
    """All cases any script can name: ``all_cases`` and the sets outside it."""
    return all_cases() + low_concurrency_cases() + head_dim_cases()


def quick_cases() -> list[str]:
    return ["p4k_16", "tree3", "spec"]


def runs_needed(shape: TreeShape, run: int = DEFAULT_RUN) -> int:
    return sum(math.ceil(n / run) for n in shape.node_len)


def assign_slots(shape: TreeShape, pool_slots: int, run: int = DEFAULT_RUN, seed: int = 0) -> torch.Tensor:
    """KV slots of every node, node after node (int32 [sum(node_len)]), laid out as the module doc says."""
    num_runs = pool_slots // run
    need = runs_needed(shape, run)
    if need > num_runs:
        raise ValueError(f"pool of {pool_slots} slots has {num_runs} runs of {run}; the tree needs {need}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_runs, generator=g)
    parts = []
    r = 0
    for length in shape.node_len:
        k = math.ceil(length / run)
        starts = order[r:r + k] * run
        r += k
        slots = (starts[:, None] + torch.arange(run)[None, :]).reshape(-1)[:length]
        parts.append(slots)
    kv = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    return kv.to(torch.int32)


def build_tree(shape: TreeShape, pool_slots: int, run: int = DEFAULT_RUN, seed: int = 0) -> KVTree:
    """The case as a ``KVTree`` of CPU int32 tensors."""
    kv = assign_slots(shape, pool_slots, run, seed)
    indptr = torch.zeros(shape.num_nodes + 1, dtype=torch.int64)
    indptr[1:] = torch.tensor(shape.node_len, dtype=torch.int64).cumsum(0)
    return KVTree(kv, indptr.to(torch.int32), torch.tensor(shape.node_parent, dtype=torch.int32),
                  torch.tensor(shape.query_node, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# Index arrays of the baselines (all CPU int32; the benchmark moves them to the GPU).


def query_slots(tree: KVTree) -> list[torch.Tensor]:
    """Each query's KV slots, root first: the ground truth every provider's arrays must expand to."""
    indptr = tree.node_indptr.tolist()
    kv = tree.kv_indices
    empty = kv[:0]
    return [torch.cat([kv[indptr[n]:indptr[n + 1]] for n in path]) if path else empty
            for path in path_nodes(tree)]


def paged_arrays(tree: KVTree) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kv_indptr [B+1], kv_indices)`` with page_size 1: each query's whole path as its page list.

    The format of FlashInfer's ``BatchDecodeWithPagedKVCacheWrapper.plan`` (page_size 1, every
    last_page_len 1) and of SGLang's ``decode_attention_fwd`` (kv_indptr/kv_indices per request).
    """
    slots = query_slots(tree)
    indptr = torch.zeros(len(slots) + 1, dtype=torch.int64)
    indptr[1:] = torch.tensor([s.numel() for s in slots], dtype=torch.int64).cumsum(0)
    kv = torch.cat(slots) if slots else tree.kv_indices[:0]
    return indptr.to(torch.int32), kv.to(torch.int32)


@dataclass(frozen=True)
class CascadeLevel:
    qo_indptr: torch.Tensor  # [R+1] int32: request r = permuted queries qo_indptr[r]:qo_indptr[r+1]
    kv_indptr: torch.Tensor  # [R+1] int32: request r's pages (page_size 1 -> slots)
    kv_indices: torch.Tensor  # [kv_indptr[-1]] int32
    last_page_len: torch.Tensor  # [R] int32: 1, or 0 for a request with no pages (kv_len 0)


@dataclass(frozen=True)
class CascadeLayout:
    """FlashInfer ``MultiLevelCascadeAttentionWrapper`` arrays, one level per tree depth.

    Level l holds the nodes at depth l: each is one "request" whose queries (a contiguous range of
    the permuted batch: every query in the node's subtree) attend the node's KV. Queries are
    permuted into tree preorder (``perm``: permuted position i holds original query perm[i]) so that
    every subtree's queries are contiguous at every level. A query whose path ends above depth l
    (an inner-node query of a speculative tree, or a shallow leaf) has no node at level l: it gets
    request with no KV (consecutive such queries share one; ``empty_requests`` counts them).
    """

    perm: torch.Tensor  # [B] int64
    levels: list[CascadeLevel]
    empty_requests: int
    inner_queries: int  # queries whose end node has a child on some other query's path


def cascade_layout(tree: KVTree) -> CascadeLayout:
    parent = tree.node_parent.tolist()
    indptr = tree.node_indptr.tolist()
    kv = tree.kv_indices
    paths = path_nodes(tree)
    n = len(parent)
    # Preorder rank of every node (children in index order) so subtrees are contiguous.
    children: list[list[int]] = [[] for _ in range(n)]
    for i, p in enumerate(parent):
        if p != -1:
            children[p].append(i)
    rank = [0] * n
    counter = 0
    stack = [i for i in range(n) if parent[i] == -1][::-1]
    while stack:
        v = stack.pop()
        rank[v] = counter
        counter += 1
        stack.extend(children[v][::-1])
    # A query at node v precedes the queries below v: its own range is then a prefix of the
    # subtree's range, and deeper levels see the subtree's remaining queries still contiguous.
    order = sorted(range(len(paths)), key=lambda b: (rank[paths[b][-1]] if paths[b] else -1, b))
    num_levels = max((len(p) for p in paths), default=0)
    on_path = set()
    for p in paths:
        on_path.update(p[:-1])
    inner = sum(1 for p in paths if p and p[-1] in on_path)
    levels = []
    empty = 0
    for lvl in range(num_levels):
        qo = [0]
        kvp = [0]
        idx = []
        last = []
        prev: object = ()  # matches no node and not None
        for pos, b in enumerate(order):
            node = paths[b][lvl] if lvl < len(paths[b]) else None
            if node == prev:
                # Same node as the previous query (or consecutive queries with nothing at this
                # level): one request, its queries share the KV.
                qo[-1] = pos + 1
                continue
            qo.append(pos + 1)
            if node is None:
                kvp.append(kvp[-1])
                last.append(0)
                empty += 1
            else:
                seg = kv[indptr[node]:indptr[node + 1]]
                idx.append(seg)
                kvp.append(kvp[-1] + seg.numel())
                last.append(1 if seg.numel() else 0)
            prev = node
        levels.append(CascadeLevel(
            qo_indptr=torch.tensor(qo, dtype=torch.int32),
            kv_indptr=torch.tensor(kvp, dtype=torch.int32),
            kv_indices=(torch.cat(idx) if idx else kv[:0]).to(torch.int32),
            last_page_len=torch.tensor(last, dtype=torch.int32),
        ))
    return CascadeLayout(torch.tensor(order, dtype=torch.int64), levels, empty, inner)


def cascade_query_slots(layout: CascadeLayout) -> list[torch.Tensor]:
    """What the cascade arrays make each *original* query attend, levels concatenated in order."""
    B = layout.perm.numel()
    per_pos: list[list[torch.Tensor]] = [[] for _ in range(B)]
    for lv in layout.levels:
        qo = lv.qo_indptr.tolist()
        kvp = lv.kv_indptr.tolist()
        for r in range(len(qo) - 1):
            seg = lv.kv_indices[kvp[r]:kvp[r + 1]]
            for pos in range(qo[r], qo[r + 1]):
                per_pos[pos].append(seg)
    out: list[torch.Tensor] = [torch.zeros(0, dtype=torch.int32)] * B
    for pos, b in enumerate(layout.perm.tolist()):
        out[b] = torch.cat(per_pos[pos]) if per_pos[pos] else torch.zeros(0, dtype=torch.int32)
    return out


def sglang_num_kv_splits(seq_lens: list[int], num_qo_heads: int, num_kv_heads: int, max_kv_splits: int,
                         device_core_count: int) -> list[int]:
    """Host copy of SGLang 0.5.10.post1's ``get_num_kv_splits_triton`` (triton_backend.py) for one
    decode token per request: how many KV splits its triton decode kernel uses per request.

    The benchmark prefers the real kernel and checks this copy against it when SGLang imports.
    """
    if not seq_lens:
        return []
    max_len, min_len = max(seq_lens), min(seq_lens)
    if max_len * 8 < min_len * 10:
        min_len = max_len
    splits1 = min(-(-max_len // min_len), max_kv_splits)
    chunk1 = -(-max_len // splits1)
    ext_seq_len = float(max_len) / 64.0
    ext_cores = int(device_core_count * max(math.log2(ext_seq_len) if ext_seq_len > 0 else -math.inf, 1.0))
    group = num_qo_heads // num_kv_heads
    if group == 1:
        token_grid = len(seq_lens) * num_qo_heads
    else:
        block_h = min(16, group)
        token_grid = len(seq_lens) * -(-num_qo_heads // block_h)
    splits2 = min(-(-ext_cores // token_grid), max_kv_splits)
    chunk2 = -(-max_len // splits2)
    return [max(-(-s // chunk1), -(-s // chunk2)) for s in seq_lens]


def byte_flop_model(shape: TreeShape, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                    elem_bytes: int = 2, qo_elem_bytes: int | None = None) -> dict:
    """The byte and FLOP model next to every timing.

    unique_bytes: K and V of every attended node once, plus q read and out written (the floor).
    path_bytes: K and V summed over queries' paths (a per-sequence kernel with no L2 reuse), plus q/out.
    flops: 2 (QK^T) + 2 (PV) multiply-adds per (query head, path token, head dim element).
    ``elem_bytes``: the KV cache's element size; ``qo_elem_bytes``: q's and out's (the model's dtype; default
    ``elem_bytes``), which differ over an fp8 cache.
    """
    kv_per_token = 2 * num_kv_heads * head_dim * elem_bytes
    qo = 2 * shape.num_queries * num_qo_heads * head_dim * (elem_bytes if qo_elem_bytes is None else qo_elem_bytes)
    return {
        "num_queries": shape.num_queries,
        "num_nodes": shape.num_nodes,
        "unique_kv_tokens": shape.unique_tokens,
        "path_kv_tokens": shape.path_tokens,
        "unique_bytes": shape.unique_tokens * kv_per_token + qo,
        "path_bytes": shape.path_tokens * kv_per_token + qo,
        "flops": 4 * num_qo_heads * head_dim * shape.path_tokens,
    }


# ---------------------------------------------------------------------------------------------
# Plain-PyTorch attention over the baselines' arrays (fp32). They check that the arrays mean what
# the tree means -- including the cascade's query permutation, its log-sum-exp merge across levels
# and its empty requests -- on CPU in the tests, and in the benchmark's debug providers.


def _segment_attention(q, k_buffer, v_buffer, slots, sm_scale):
    """q [n, Hq, D] attending the same KV slots; returns (out [n, Hq, D] fp32, lse [n, Hq] fp32)."""
    n, Hq, D = q.shape
    if slots.numel() == 0:
        return (torch.zeros(n, Hq, D, dtype=torch.float32, device=q.device),
                torch.full((n, Hq), float("-inf"), dtype=torch.float32, device=q.device))
    group = Hq // k_buffer.shape[1]
    slots = slots.to(k_buffer.device).long()
    k = k_buffer[slots].float().repeat_interleave(group, dim=1)  # [L, Hq, D]
    v = v_buffer[slots].float().repeat_interleave(group, dim=1)
    s = torch.einsum("nhd,lhd->nhl", q.float(), k) * sm_scale
    lse = torch.logsumexp(s, dim=-1)
    return torch.einsum("nhl,lhd->nhd", torch.exp(s - lse[..., None]), v), lse


def paged_attention_torch(q, k_buffer, v_buffer, kv_indptr, kv_indices, sm_scale):
    """What FlashInfer decode / SGLang triton compute from ``paged_arrays``: fp32 [B, Hq, D]."""
    ip = kv_indptr.tolist()
    outs = [_segment_attention(q[b:b + 1], k_buffer, v_buffer, kv_indices[ip[b]:ip[b + 1]], sm_scale)[0]
            for b in range(q.shape[0])]
    return torch.cat(outs) if outs else q.float()


def cascade_attention_torch(q, k_buffer, v_buffer, layout: CascadeLayout, sm_scale):
    """What FlashInfer's multi-level cascade computes from ``cascade_layout``, in original query order."""
    perm = layout.perm.to(q.device)
    qp = q[perm]
    B, Hq, D = q.shape
    out = torch.zeros(B, Hq, D, dtype=torch.float32, device=q.device)
    lse = torch.full((B, Hq), float("-inf"), dtype=torch.float32, device=q.device)
    for lv in layout.levels:
        qo = lv.qo_indptr.tolist()
        kvp = lv.kv_indptr.tolist()
        for r in range(len(qo) - 1):
            a, b = qo[r], qo[r + 1]
            o_r, l_r = _segment_attention(qp[a:b], k_buffer, v_buffer, lv.kv_indices[kvp[r]:kvp[r + 1]], sm_scale)
            # merge_state: exact online-softmax combination of two partial results.
            m = torch.maximum(lse[a:b], l_r)
            m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            w0, w1 = torch.exp(lse[a:b] - m_safe), torch.exp(l_r - m_safe)
            tot = (w0 + w1).clamp_min(1e-30)
            out[a:b] = (out[a:b] * w0[..., None] + o_r * w1[..., None]) / tot[..., None]
            lse[a:b] = torch.where(w0 + w1 > 0, m_safe + torch.log(tot), lse[a:b])
    result = torch.empty_like(out)
    result[perm] = out
    return result
