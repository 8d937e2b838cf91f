"""Tree decode attention in two Triton stages.

Stage 1, one program per (KV head, work item): a work item is a chunk of one node's KV and a tile
of the queries that attend it (TreeDecodePlan). The tile's rows are (query, GQA head) pairs, so one
load of a KV block feeds every query and every query head sharing that KV head through one
tensor-core product. It writes each row's output normalised by its own softmax sum and the base-2
log-sum-exp of its scores.

Stage 2, one program per (query, block of heads): folds the query's partials along its path in the
plan's fixed order with the online-softmax rule. Gathers only: no atomics, deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .plan import SMALL_ROWS, TreeDecodePlan

LOG2E = tl.constexpr(1.4426950408889634)  # scores move to base 2 so the kernels use exp2/log2


@triton.jit
def _soft_cap(scores, logit_cap):
    # SGLang's cap: logit_cap * tanh(scores / logit_cap); tanh from exp so the CPU interpreter
    # and every GPU back end agree. 2 / (1 + e^{2x}) saturates cleanly to 0 or 2.
    return logit_cap * (1.0 - 2.0 / (1.0 + tl.exp(2.0 * scores / logit_cap)))


@triton.jit
def _merge_head(b, head, lo, hi, partial_out, partial_lse, merge_slots, Out, stride_pp, stride_ph, stride_lp,
                stride_ob, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    # Folds query b's partials merge_slots[lo:hi] for one head in list order (so the result does not
    # depend on which program merges). BLOCK_P partials are loaded at once, so a query's merge costs
    # one or two memory round trips rather than one per partial along its path.
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_p = tl.arange(0, BLOCK_P)
    m = float("-inf")
    denom = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_P):
        p_ok = start + offs_p < hi
        slot = tl.load(merge_slots + start + offs_p, mask=p_ok, other=0).to(tl.int64)
        lse = tl.load(partial_lse + slot * stride_lp + head, mask=p_ok, other=float("-inf"))
        o = tl.load(partial_out + slot[:, None] * stride_pp + head * stride_ph + offs_d[None, :],
                    mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        w = tl.exp2(lse - m_new)
        alpha = tl.exp2(m - m_new)
        acc = acc * alpha + tl.sum(o * w[:, None], 0)
        denom = denom * alpha + tl.sum(w, 0)
        m = m_new
    # A query whose path holds no KV gets zeros (no partials: denom == 0).
    res = acc / tl.where(denom > 0, denom, 1.0)
    tl.store(Out + b.to(tl.int64) * stride_ob + head * stride_oh + offs_d, res.to(Out.dtype.element_ty), mask=d_ok)


@triton.jit
def _attend_item(
    Q, K, V, kv_indices, qperm, items, item, kv_head, partial_out, partial_lse, arrivals, sm_scale, logit_cap,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_pp, stride_ph, stride_lp, stride_ab,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, USE_CAP: tl.constexpr, IEEE: tl.constexpr, MERGE: tl.constexpr,
):
    kv_start = tl.load(items + item * 5)
    kv_len = tl.load(items + item * 5 + 1)
    q_start = tl.load(items + item * 5 + 2)
    q_count = tl.load(items + item * 5 + 3)
    slot = tl.load(items + item * 5 + 4)

    rows = tl.arange(0, BLOCK_M)
    q_local = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = q_local < q_count
    qid = tl.load(qperm + q_start + q_local, mask=row_ok, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + qid[:, None] * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    qk_scale = sm_scale * LOG2E  # without a cap, one multiply per score scales and moves it to base 2
    for start in range(0, kv_len, BLOCK_N):
        n_ok = start + offs_n < kv_len
        kv_slot = tl.load(kv_indices + kv_start + start + offs_n, mask=n_ok, other=0).to(tl.int64)
        k = tl.load(K + kv_slot[:, None] * stride_kn + kv_head * stride_kh + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        # fp32 inputs would run as TF32 on tensor cores by default; IEEE keeps fp32 exact.
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if USE_CAP:
            s = _soft_cap(s * sm_scale, logit_cap) * LOG2E
        else:
            s = s * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_slot[:, None] * stride_vn + kv_head * stride_vh + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # kv_len >= 1 for every item, so l_i > 0 on every row.
    out_row = (slot + q_local).to(tl.int64)
    tl.store(partial_out + out_row[:, None] * stride_pp + head[:, None] * stride_ph + offs_d[None, :],
             acc / l_i[:, None], mask=row_ok[:, None] & d_ok[None, :])
    tl.store(partial_lse + out_row * stride_lp + head, m_i + tl.log2(l_i), mask=row_ok)
    if MERGE:
        # Count the partials stored per (query, head) for the merge programs (_merge_program). The
        # barrier orders every thread's stores before the release adds, as CUTLASS's split-K
        # semaphore does (bar.sync, then a release per counter).
        qid = tl.load(qperm + q_start + q_local, mask=row_ok, other=0).to(tl.int64)
        tl.debug_barrier()
        tl.atomic_add(arrivals + qid * stride_ab + head, 1, mask=row_ok, sem="release", scope="gpu")


@triton.jit
def _merge_program(b, head, partial_out, partial_lse, merge_indptr, merge_slots, arrivals, Out,
                   stride_pp, stride_ph, stride_lp, stride_ob, stride_oh, stride_ab,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, SLEEP: tl.constexpr,
                   VARIANT: tl.constexpr):
    # Waits until every partial of (query b, head) is stored, then merges them. It waits only on
    # attention items, whose programs took their tickets before this one (see _tree_decode_stage1):
    # they are running or done, and never wait on anything.
    lo = tl.load(merge_indptr + b)
    hi = tl.load(merge_indptr + b + 1)
    counter = arrivals + b.to(tl.int64) * stride_ab + head
    if hi > lo and VARIANT == 0:
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        while seen < hi - lo:
            if SLEEP:
                tl.inline_asm_elementwise("nanosleep.u32 200; mov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                          is_pure=False, pack=1)
            seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # zero again for the next launch
    _merge_head(b, head, lo, hi, partial_out, partial_lse, merge_slots, Out, stride_pp, stride_ph, stride_lp,
                stride_ob, stride_oh, HEAD_DIM, BLOCK_D, BLOCK_P)


@triton.jit
def _tree_decode_stage1(
    Q, K, V, kv_indices, qperm, items, counts, partial_out, partial_lse, merge_indptr, merge_slots, tickets,
    arrivals, Out, sm_scale, logit_cap,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_pp, stride_ph, stride_lp,
    stride_ob, stride_oh, stride_ab,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, LARGE_M: tl.constexpr, SMALL_M: tl.constexpr, LARGE_N: tl.constexpr,
    SMALL_N: tl.constexpr, BLOCK_P: tl.constexpr,
    USE_CAP: tl.constexpr, IEEE: tl.constexpr, TILES: tl.constexpr, MERGE: tl.constexpr, SLEEP: tl.constexpr,
    VARIANT: tl.constexpr = 0,
):
    # TILES 0: one launch serves both tile sizes (a separate launch for the small tiles waits for
    # the large ones to drain); but then the kernel's shared memory is sized by the larger branch,
    # which limits how many small-tile programs an SM keeps resident. TILES 1 / 2: large / small
    # tiles only, for two launches each sized to its own tiles.
    #
    # MERGE (with TILES 0): the merge runs in this launch too. A program's work is not its program
    # id but a ticket taken from a counter when it starts: tickets hand out every attention item
    # (per KV head) first, then one merge per (query, KV head). A merge program waits for its
    # query's partials, but only attention items that running programs hold can still be missing,
    # so the launch finishes however the hardware (or a CUDA graph's replay) schedules the grid;
    # CUB's decoupled look-back rests on the same argument. The last ticket resets the counter.
    num_large = tl.load(counts)
    num_items = num_large + tl.load(counts + 1)
    if MERGE:
        ticket = tl.atomic_add(tickets, 1, sem="relaxed", scope="gpu")
        if ticket == tl.num_programs(0) - 1:
            tl.atomic_xchg(tickets, 0, sem="relaxed", scope="gpu")
        kv_head = ticket % NUM_KV_HEADS
        pid = ticket // NUM_KV_HEADS
    else:
        kv_head = tl.program_id(0)
        pid = tl.program_id(1)
    # Counts live on the device, so a captured launch covers whatever a later plan writes.
    if TILES == 2:
        item = num_large + pid
        is_large = False
        in_range = pid < tl.load(counts + 1)
    else:
        item = pid
        is_large = pid < num_large
        in_range = is_large if TILES == 1 else pid < num_items
    if in_range:
        if is_large:
            _attend_item(Q, K, V, kv_indices, qperm, items, item, kv_head, partial_out, partial_lse,
                         arrivals, sm_scale, logit_cap,
                         stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                         stride_pp, stride_ph, stride_lp, stride_ab,
                         GROUP, HEAD_DIM, BLOCK_D, LARGE_M, LARGE_N, USE_CAP, IEEE, MERGE)
        elif TILES != 1:
            _attend_item(Q, K, V, kv_indices, qperm, items, item, kv_head, partial_out, partial_lse,
                         arrivals, sm_scale, logit_cap,
                         stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                         stride_pp, stride_ph, stride_lp, stride_ab,
                         GROUP, HEAD_DIM, BLOCK_D, SMALL_M, SMALL_N, USE_CAP, IEEE, MERGE)
    elif MERGE:
        merge = ticket - num_items * NUM_KV_HEADS
        b = merge // (NUM_KV_HEADS * GROUP)
        if b < tl.load(counts + 2) and VARIANT != 1:
            _merge_program(b, merge % (NUM_KV_HEADS * GROUP), partial_out, partial_lse, merge_indptr, merge_slots,
                           arrivals, Out, stride_pp, stride_ph, stride_lp, stride_ob, stride_oh, stride_ab,
                           HEAD_DIM, BLOCK_D, BLOCK_P, SLEEP, VARIANT)


@triton.jit
def _tree_decode_stage2(
    partial_out, partial_lse, merge_indptr, merge_slots, counts, Out,
    stride_pp, stride_ph, stride_lp, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program per (query, head).
    b = tl.program_id(0)
    head = tl.program_id(1)
    if b >= tl.load(counts + 2):
        return
    _merge_head(b, head, tl.load(merge_indptr + b), tl.load(merge_indptr + b + 1), partial_out, partial_lse,
                merge_slots, Out, stride_pp, stride_ph, stride_lp, stride_ob, stride_oh, HEAD_DIM, BLOCK_D, BLOCK_P)


@dataclass(frozen=True)
class Stage1Config:
    block_n_large: int  # KV tokens per block for large tiles
    block_n_small: int  # KV tokens per block for small tiles
    num_warps: int
    num_stages: int
    separate_launches: bool = False  # large and small tiles in two launches (see _tree_decode_stage1)
    merge_in_stage1: bool = True  # the last program to store a query's partial merges them (no stage-2 launch)
    merge_variant: int = 0  # EXPERIMENT: 1 merge programs exit at once, 2 merge without waiting
    merge_block_p: int = 0


def stage1_config(head_dim: int, large_rows: int) -> Stage1Config:
    """KV block lengths, warps and pipeline depth of stage 1.

    Measured on the H200 (bf16, head_dim 128, L2 flushed, 2026-11-29; the planner at 4 programs per
    SM; `benchmarks/results/sweep_stage1_h200.md`): 32-token blocks for both tile sizes in one
    launch, 3 stages, was the best of 72 configurations over the benchmark's trees (geomean 0.84x the
    time of the earlier 64/32-token default). Mixing 64-token blocks for the large tiles with 32 for
    the small ones sized the kernel's shared memory by the large branch (80 KB against 48), and the
    latency-bound small-tile programs lost occupancy (no sharing 64 x 2k: 205 us against 152). Two
    launches (each sized to its tiles) lose more to the second launch waiting for the first to
    drain than they win back (geomean 0.99). Blocks shrink with head_dim so K and V, three stages
    deep, fit in shared memory; the accumulator (rows x head_dim fp32) needs 8 warps past 64 x 128.
    """
    block_n = 32 // max(1, head_dim // 128)
    return Stage1Config(block_n, block_n, 8 if large_rows * head_dim > 64 * 128 else 4, 3)


def tree_decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, plan: TreeDecodePlan,
                sm_scale: float, logit_cap: float = 0.0, out: torch.Tensor | None = None,
                config: Stage1Config | None = None) -> torch.Tensor:
    """Attention of every query over its KV-tree path. q [B, Hq, D]; k/v_buffer [S, Hkv, D].

    Never synchronises with the host: the plan's device tensors carry all the data-dependent sizes.
    """
    B, Hq, D = q.shape
    if (Hq, D) != (plan.num_qo_heads, plan.head_dim) or B > plan.qperm.numel():
        raise ValueError(f"q has shape {tuple(q.shape)} but the plan is for <= {plan.qperm.numel()} queries, "
                         f"{plan.num_qo_heads} heads of dim {plan.head_dim}")
    if k_buffer.shape[1:] != (plan.num_kv_heads, D) or v_buffer.shape[1:] != (plan.num_kv_heads, D):
        raise ValueError(f"k/v buffers {tuple(k_buffer.shape)}/{tuple(v_buffer.shape)} do not match the plan's "
                         f"{plan.num_kv_heads} KV heads of dim {D}")
    if q.stride(-1) != 1 or k_buffer.stride(-1) != 1 or v_buffer.stride(-1) != 1:
        raise ValueError("q, k_buffer and v_buffer need a contiguous last dimension")
    if out is None:
        out = torch.empty_like(q)
    cfg = config or stage1_config(D, plan.large_rows)
    launch_stage1(q, k_buffer, v_buffer, plan, sm_scale, logit_cap, cfg, out)
    if cfg.separate_launches or not cfg.merge_in_stage1:
        launch_stage2(plan, out)
    return out


def launch_stage1(q, k_buffer, v_buffer, plan: TreeDecodePlan, sm_scale: float, logit_cap: float,
                  cfg: Stage1Config, out: torch.Tensor):
    """Partial attention of every work item into the plan's partial buffers (and, with
    ``cfg.merge_in_stage1``, their merge into ``out``); returns Triton's compiled kernel of the
    (last) launch (its metadata tells shared memory and registers), or None when nothing ran."""
    merge = cfg.merge_in_stage1 and not cfg.separate_launches
    if not plan.grid_items and not (merge and plan.grid_queries):
        return None
    po, pl = plan.partial_out, plan.partial_lse
    D = q.shape[2]
    compiled = None
    for tiles in ((1, 2) if cfg.separate_launches else (0,)):
        H = plan.num_kv_heads
        grid = (H * plan.grid_items + plan.num_qo_heads * plan.grid_queries,) if merge else (H, plan.grid_items)
        compiled = _tree_decode_stage1[grid](
            q, k_buffer, v_buffer, plan.kv_indices, plan.qperm, plan.items, plan.counts, po, pl,
            plan.merge_indptr, plan.merge_slots, plan.tickets, plan.arrivals, out,
            sm_scale, logit_cap, q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
            v_buffer.stride(0), v_buffer.stride(1), po.stride(0), po.stride(1), pl.stride(0),
            out.stride(0), out.stride(1), plan.arrivals.stride(0),
            NUM_KV_HEADS=H, GROUP=plan.group_size, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),
            LARGE_M=plan.large_rows, SMALL_M=SMALL_ROWS, LARGE_N=cfg.block_n_large,
            SMALL_N=cfg.block_n_small, BLOCK_P=cfg.merge_block_p or 16,
            USE_CAP=logit_cap > 0, IEEE=q.dtype == torch.float32, TILES=tiles, MERGE=merge,
            SLEEP=q.is_cuda, VARIANT=cfg.merge_variant, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return compiled


def launch_stage2(plan: TreeDecodePlan, out: torch.Tensor) -> None:
    """Merge every query's partials into ``out``."""
    if not plan.grid_queries:
        return
    po, pl = plan.partial_out, plan.partial_lse
    D = out.shape[2]
    _tree_decode_stage2[(plan.grid_queries, out.shape[1])](
        po, pl, plan.merge_indptr, plan.merge_slots, plan.counts, out,
        po.stride(0), po.stride(1), pl.stride(0), out.stride(0), out.stride(1),
        HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_P=16, num_warps=2)
