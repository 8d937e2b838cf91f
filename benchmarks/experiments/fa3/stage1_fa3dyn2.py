"""Experiment (session 13): stage1_fa3dyn.py with the producer's per-unit loads (fields, Q rows' query
ids, first slot indices, the next queue ticket) issued a unit ahead, once the current unit's first
block is on its way.

stage1_fa3dyn.py: stage1_fa3pp.py with a dynamic work queue and the producer loading each
unit's Q. One persistent CTA per SM: a producer warpgroup and two consumer warpgroups (rows 0-63 and
64-127 of a 128-row large tile, each its own partition so they are not held in lockstep).

- Units are (item, kv head) pairs in plan order (large items longest first, then small), taken from a
  global counter by the producer: a CTA takes the next unit when its producer is ready for it, so long
  and short units balance across SMs whatever the plan's chunking. Which CTA computes a unit does not
  change its arithmetic: outputs stay bitwise deterministic. The last CTA to finish resets the counter,
  so a captured launch replays.
- The producer publishes each unit into one of two unit slots: its fields (plain shared stores, then an
  elected arrive) and its Q rows (gathered with cp.async, arriving noinc), so a consumer starts a unit
  without a global round trip; the slot is freed by both consumers. It then streams the unit's K/V
  blocks through the ring, and publishes the next unit while the consumers still work on this one.
- Small units (16 rows) run on the first consumer with mma.sync; the second passes their blocks."""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, warpgroup_mma, warpgroup_mma_wait

LOG2E = gl.constexpr(1.4426950408889634)
BLOCK_N = 128
RING = 2
NUM_WARPS = 4  # the first consumer; the second and the producer are worker partitions
CONSUMER_REGS = 200
PRODUCER_WARPS = 4
PRODUCER_REGS = 112
NF = 8  # int32 fields per unit slot: w, kv_start, kv_len, q_start, q_count, slot

_sched = {}


def _scheduler(device) -> torch.Tensor:
    if device not in _sched:
        _sched[device] = torch.zeros(2, dtype=torch.int32, device=device)
    return _sched[device]


@gluon.jit
def _load_idx(kv_indices, kv_start, kv_len, blk, offs_n, BLOCK: gl.constexpr):
    pos = blk * BLOCK + offs_n
    return gl.load(kv_indices + kv_start + pos, mask=pos < kv_len, other=0)


@gluon.jit
def _field(vals, f, k: gl.constexpr):
    return gl.sum(gl.where(f == k, vals, 0), 0)


@gluon.jit
def _fetch(w, total, items, qperm, kv_indices, f, rows, offs_n, NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr,
           BLOCK: gl.constexpr):
    """Unit w's fields, its Q rows' query ids and its first block's slot indices (loads only: the
    caller uses them a unit later, so their round trips overlap the current unit's stream)."""
    item = w // NUM_KV_HEADS
    ok = w < total
    vals = gl.load(items + item * 5 + f - 1, mask=(f >= 1) & (f <= 5) & ok, other=0)
    vals = gl.where(f == 0, w, vals)
    q_local = rows // GROUP
    qrows = gl.load(qperm + _field(vals, f, 3) + q_local, mask=(q_local < _field(vals, f, 4)) & ok, other=-1)
    idx0 = _load_idx(kv_indices, _field(vals, f, 1), _field(vals, f, 2), 0, offs_n, BLOCK)
    return vals, qrows, idx0


@gluon.jit
def _issue_block(K, V, k_bufs, v_bufs, ready, empty, t, j, idx, kv_len, kv_head, offs_n, offs_d, stride_kn,
                 stride_kh, stride_vn, stride_vh, BLOCK: gl.constexpr, STAGES: gl.constexpr):
    s = t % STAGES
    mbarrier.wait(empty.index(s), ((t // STAGES) & 1) ^ 1)
    m = (j * BLOCK + offs_n < kv_len)[:, None] & (offs_d >= 0)[None, :]
    sl = idx.to(gl.int64)
    cp.async_copy_global_to_shared(k_bufs.index(s), K + sl[:, None] * stride_kn + kv_head * stride_kh
                                   + offs_d[None, :], mask=m)
    cp.async_copy_global_to_shared(v_bufs.index(s), V + sl[:, None] * stride_vn + kv_head * stride_vh
                                   + offs_d[None, :], mask=m)
    cp.mbarrier_arrive(ready.index(s), increment_count=False)


@gluon.jit
def _publish(unit_f, q_smem, unit_ready, unit_empty, i, vals, qrows, rows, offs_d, f, Q, stride_qb, stride_qh,
             NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr):
    b = i % 2
    mbarrier.wait(unit_empty.index(b), ((i // 2) & 1) ^ 1)
    unit_f.index(b).store(vals)
    kv_head = _field(vals, f, 0) % NUM_KV_HEADS
    head = kv_head * GROUP + rows % GROUP
    row_ok = qrows >= 0
    cp.async_copy_global_to_shared(q_smem.index(b), Q + qrows.to(gl.int64)[:, None] * stride_qb
                                   + head[:, None] * stride_qh + offs_d[None, :],
                                   mask=row_ok[:, None] & (offs_d >= 0)[None, :])
    cp.mbarrier_arrive(unit_ready.index(b), increment_count=False)
    gl.thread_barrier()  # every producer thread's field stores precede the elected arrive
    mbarrier.arrive(unit_ready.index(b), count=1)


@gluon.jit
def _producer(Q, K, V, kv_indices, qperm, items, counts, sched, k_bufs, v_bufs, q_smem, unit_f, ready, empty,
              unit_ready, unit_empty, stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
              NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, LARGE_M: gl.constexpr,
              BLOCK: gl.constexpr, STAGES: gl.constexpr, PWARPS: gl.constexpr):
    total = (gl.load(counts) + gl.load(counts + 1)) * NUM_KV_HEADS
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [PWARPS, 1], [1, 0])
    fl: gl.constexpr = gl.BlockedLayout([1], [32], [PWARPS], [0])
    f = gl.arange(0, 8, layout=fl)
    offs_n = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, ld))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
    rows = gl.arange(0, LARGE_M, layout=gl.SliceLayout(1, ld))
    t = 0
    i = 0
    w = gl.atomic_add(sched, 1)
    vals, qrows, idx = _fetch(w, total, items, qperm, kv_indices, f, rows, offs_n, NUM_KV_HEADS, GROUP, BLOCK)
    wn = gl.atomic_add(sched, 1)
    while w < total:
        _publish(unit_f, q_smem, unit_ready, unit_empty, i, vals, qrows, rows, offs_d, f, Q, stride_qb, stride_qh,
                 NUM_KV_HEADS, GROUP)
        kv_head = w % NUM_KV_HEADS
        kv_start = _field(vals, f, 1)
        kv_len = _field(vals, f, 2)
        # Block 0 (every unit has one), then the next unit's loads, then the rest of the blocks.
        nxt = _load_idx(kv_indices, kv_start, kv_len, 1, offs_n, BLOCK)
        _issue_block(K, V, k_bufs, v_bufs, ready, empty, t, 0, idx, kv_len, kv_head, offs_n, offs_d, stride_kn,
                     stride_kh, stride_vn, stride_vh, BLOCK, STAGES)
        t += 1
        idx = nxt
        vals_n, qrows_n, idx_n = _fetch(wn, total, items, qperm, kv_indices, f, rows, offs_n, NUM_KV_HEADS, GROUP,
                                        BLOCK)
        wnn = gl.atomic_add(sched, 1)
        for j in range(1, gl.cdiv(kv_len, BLOCK)):
            nxt = _load_idx(kv_indices, kv_start, kv_len, j + 1, offs_n, BLOCK)
            _issue_block(K, V, k_bufs, v_bufs, ready, empty, t, j, idx, kv_len, kv_head, offs_n, offs_d, stride_kn,
                         stride_kh, stride_vn, stride_vh, BLOCK, STAGES)
            idx = nxt
            t += 1
        i += 1
        w = wn
        wn = wnn
        vals = vals_n
        qrows = qrows_n
        idx = idx_n
    # The end marker: a unit slot whose w is past the last unit.
    _publish(unit_f, q_smem, unit_ready, unit_empty, i, vals, qrows, rows, offs_d, f, Q, stride_qb, stride_qh,
             NUM_KV_HEADS, GROUP)


@gluon.jit
def _online_softmax(s, m_i, l_i, j, kv_len, offs_n_s, sm_scale, logit_cap, BLOCK: gl.constexpr,
                    USE_CAP: gl.constexpr):
    if USE_CAP:
        s = logit_cap * (1.0 - 2.0 / (1.0 + gl.exp(2.0 * (s * sm_scale) / logit_cap))) * LOG2E
        s_mul = 1.0
    else:
        s_mul = sm_scale * LOG2E
    if (j + 1) * BLOCK > kv_len:
        s = gl.where((j * BLOCK + offs_n_s < kv_len)[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * s_mul)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * s_mul - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _pass_unit(kv_len, t, ready, empty, BLOCK: gl.constexpr, STAGES: gl.constexpr):
    """The second consumer on a small unit: take and free each block without reading it."""
    for j in range(gl.cdiv(kv_len, BLOCK)):
        cur = t % STAGES
        mbarrier.wait(ready.index(cur), (t // STAGES) & 1)
        mbarrier.arrive(empty.index(cur), count=1)
        t += 1
    return t


@gluon.jit
def _consume_unit(q_tile, kv_head, kv_len, q_count, slot, t, k_bufs, v_bufs, ready, empty, partial_out,
                  partial_lse, sm_scale, logit_cap, stride_pp, stride_ph, stride_lp, dtype: gl.constexpr,
                  GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, ROW0: gl.constexpr,
                  BLOCK: gl.constexpr, STAGES: gl.constexpr, WGMMA: gl.constexpr, USE_CAP: gl.constexpr,
                  WARPS: gl.constexpr):
    if WGMMA:
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BLOCK, 16])
        o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, HEAD_DIM, 16])
        q_op = q_tile
    else:
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, WARPS], instr_shape=[16, 8])
        o_l: gl.constexpr = s_l
        q_op = q_tile.load(gl.DotOperandLayout(operand_index=0, parent=s_l, k_width=2))
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_l))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_l))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_l)
    s_zero = gl.zeros([BLOCK_M, BLOCK], gl.float32, layout=s_l)
    offs_n_s = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, s_l))
    for j in range(gl.cdiv(kv_len, BLOCK)):
        cur = t % STAGES
        mbarrier.wait(ready.index(cur), (t // STAGES) & 1)
        if WGMMA:
            # cp.async lands through the generic proxy, wgmma reads through the async proxy.
            fence_async_shared()
            s = warpgroup_mma(q_op, k_bufs.index(cur).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        else:
            kt = k_bufs.index(cur).permute((1, 0)).load(gl.DotOperandLayout(operand_index=1, parent=s_l, k_width=2))
            s = mma_v2(q_op, kt, s_zero)
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, j, kv_len, offs_n_s, sm_scale, logit_cap, BLOCK, USE_CAP)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_l)
        if WGMMA:
            acc = warpgroup_mma(p_op, v_bufs.index(cur), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        else:
            vv = v_bufs.index(cur).load(gl.DotOperandLayout(operand_index=1, parent=o_l, k_width=2))
            acc = mma_v2(p_op, vv, acc)
        gl.thread_barrier()  # every warp of this consumer is done reading the slot
        mbarrier.arrive(empty.index(cur), count=1)
        t += 1

    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_l))[:, None]
    rows_o = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_l)) + ROW0
    d_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_l))
    ql_o = rows_o // GROUP
    ok_o = ql_o < q_count
    out_row = (slot + ql_o).to(gl.int64)
    head_o = kv_head * GROUP + rows_o % GROUP
    gl.store(partial_out + out_row[:, None] * stride_pp + head_o[:, None] * stride_ph + d_o[None, :], out,
             mask=ok_o[:, None])
    lse = gl.convert_layout(m_i + gl.log2(l_i), gl.SliceLayout(1, o_l))
    gl.store(partial_lse + out_row * stride_lp + head_o, lse, mask=ok_o)
    return t


@gluon.jit
def _consumer(Q, counts, sched, k_bufs, v_bufs, q_smem, unit_f, ready, empty, unit_ready, unit_empty, partial_out,
              partial_lse, sm_scale, logit_cap, stride_pp, stride_ph, stride_lp, NUM_KV_HEADS: gl.constexpr,
              GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, LARGE_M: gl.constexpr, SMALL_M: gl.constexpr,
              BLOCK: gl.constexpr, STAGES: gl.constexpr, USE_CAP: gl.constexpr, WG: gl.constexpr,
              ROW0: gl.constexpr, HALF: gl.constexpr):
    dtype: gl.constexpr = Q.dtype.element_ty
    num_large = gl.load(counts)
    total = (num_large + gl.load(counts + 1)) * NUM_KV_HEADS
    fl: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    f = gl.arange(0, 8, layout=fl)
    t = 0
    i = 0
    mbarrier.wait(unit_ready.index(0), 0)
    vals = unit_f.index(0).load(fl)
    w = gl.sum(gl.where(f == 0, vals, 0), 0)
    while w < total:
        b = i % 2
        kv_len = gl.sum(gl.where(f == 2, vals, 0), 0)
        q_count = gl.sum(gl.where(f == 4, vals, 0), 0)
        slot = gl.sum(gl.where(f == 5, vals, 0), 0)
        item = w // NUM_KV_HEADS
        kv_head = w % NUM_KV_HEADS
        if item < num_large:
            fence_async_shared()
            t = _consume_unit(q_smem.index(b).slice(ROW0, HALF), kv_head, kv_len, q_count, slot, t, k_bufs, v_bufs,
                              ready, empty, partial_out, partial_lse, sm_scale, logit_cap, stride_pp, stride_ph,
                              stride_lp, dtype, GROUP, HEAD_DIM, HALF, ROW0, BLOCK, STAGES, True, USE_CAP, 4)
        else:
            if WG == 0:
                t = _consume_unit(q_smem.index(b).slice(0, SMALL_M), kv_head, kv_len, q_count, slot, t, k_bufs,
                                  v_bufs, ready, empty, partial_out, partial_lse, sm_scale, logit_cap, stride_pp,
                                  stride_ph, stride_lp, dtype, GROUP, HEAD_DIM, SMALL_M, 0, BLOCK, STAGES, False,
                                  USE_CAP, 4)
            else:
                t = _pass_unit(kv_len, t, ready, empty, BLOCK, STAGES)
        gl.thread_barrier()  # every warp of this consumer is done with the unit slot (Q included)
        mbarrier.arrive(unit_empty.index(b), count=1)
        i += 1
        b = i % 2
        mbarrier.wait(unit_ready.index(b), (i // 2) & 1)
        vals = unit_f.index(b).load(fl)
        w = gl.sum(gl.where(f == 0, vals, 0), 0)
    if WG == 0:
        # The last CTA out resets the queue for the next launch (all producers have taken their last).
        done = gl.atomic_add(sched + 1, 1)
        if done == gl.num_programs(0) - 1:
            gl.atomic_xchg(sched, 0)
            gl.atomic_xchg(sched + 1, 0)


# warp_specialize passes its arguments as values, not constexprs: one entry point per consumer.
@gluon.jit
def _consumer0(Q, counts, sched, k_bufs, v_bufs, q_smem, unit_f, ready, empty, unit_ready, unit_empty, partial_out,
               partial_lse, sm_scale, logit_cap, stride_pp, stride_ph, stride_lp, NUM_KV_HEADS: gl.constexpr,
               GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, LARGE_M: gl.constexpr, SMALL_M: gl.constexpr,
               BLOCK: gl.constexpr, STAGES: gl.constexpr, USE_CAP: gl.constexpr):
    _consumer(Q, counts, sched, k_bufs, v_bufs, q_smem, unit_f, ready, empty, unit_ready, unit_empty, partial_out,
              partial_lse, sm_scale, logit_cap, stride_pp, stride_ph, stride_lp, NUM_KV_HEADS, GROUP, HEAD_DIM,
              LARGE_M, SMALL_M, BLOCK, STAGES, USE_CAP, 0, 0, 64)


@gluon.jit
def _consumer1(Q, counts, sched, k_bufs, v_bufs, q_smem, unit_f, ready, empty, unit_ready, unit_empty, partial_out,
               partial_lse, sm_scale, logit_cap, stride_pp, stride_ph, stride_lp, NUM_KV_HEADS: gl.constexpr,
               GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, LARGE_M: gl.constexpr, SMALL_M: gl.constexpr,
               BLOCK: gl.constexpr, STAGES: gl.constexpr, USE_CAP: gl.constexpr):
    _consumer(Q, counts, sched, k_bufs, v_bufs, q_smem, unit_f, ready, empty, unit_ready, unit_empty, partial_out,
              partial_lse, sm_scale, logit_cap, stride_pp, stride_ph, stride_lp, NUM_KV_HEADS, GROUP, HEAD_DIM,
              LARGE_M, SMALL_M, BLOCK, STAGES, USE_CAP, 1, 64, 64)  # rows 64-127 (launch asserts 128-row tiles)


@gluon.jit
def _tree_decode_stage1_fa3dyn2(
    Q, K, V, kv_indices, qperm, items, counts, sched, partial_out, partial_lse, sm_scale, logit_cap,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_pp, stride_ph, stride_lp,
    NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, LARGE_M: gl.constexpr,
    SMALL_M: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr, USE_CAP: gl.constexpr,
    WARPS: gl.constexpr, PWARPS: gl.constexpr, PREGS: gl.constexpr, CREGS: gl.constexpr,
):
    dtype: gl.constexpr = Q.dtype.element_ty
    kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK, HEAD_DIM], dtype)
    q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([LARGE_M, HEAD_DIM], dtype)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], kv_sl)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], kv_sl)
    q_smem = gl.allocate_shared_memory(dtype, [2, LARGE_M, HEAD_DIM], q_sl)
    unit_f = gl.allocate_shared_memory(gl.int32, [2, 8], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    unit_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    unit_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        # Every producer thread's copies arrive once (noinc) per fill; each consumer frees once.
        mbarrier.init(ready.index(i), count=PWARPS * 32)
        mbarrier.init(empty.index(i), count=2)
    for i in gl.static_range(2):
        # Q copies (noinc, every producer thread) plus the elected arrive after the field stores.
        mbarrier.init(unit_ready.index(i), count=PWARPS * 32 + 1)
        mbarrier.init(unit_empty.index(i), count=2)
    gl.warp_specialize([
        # (the argument tuples spelled out: a tuple held in a variable turns its constexprs into values)
        (_consumer0, (Q, counts, sched, k_bufs, v_bufs, q_smem, unit_f, ready, empty, unit_ready, unit_empty,
                      partial_out, partial_lse, sm_scale, logit_cap, stride_pp, stride_ph, stride_lp, NUM_KV_HEADS,
                      GROUP, HEAD_DIM, LARGE_M, SMALL_M, BLOCK, STAGES, USE_CAP)),
        (_consumer1, (Q, counts, sched, k_bufs, v_bufs, q_smem, unit_f, ready, empty, unit_ready, unit_empty,
                      partial_out, partial_lse, sm_scale, logit_cap, stride_pp, stride_ph, stride_lp, NUM_KV_HEADS,
                      GROUP, HEAD_DIM, LARGE_M, SMALL_M, BLOCK, STAGES, USE_CAP)),
        (_producer, (Q, K, V, kv_indices, qperm, items, counts, sched, k_bufs, v_bufs, q_smem, unit_f, ready, empty,
                     unit_ready, unit_empty, stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                     NUM_KV_HEADS, GROUP, HEAD_DIM, LARGE_M, BLOCK, STAGES, PWARPS)),
    ], [4, PWARPS], [CREGS, PREGS])


def launch(q, k_buffer, v_buffer, plan, sm_scale: float, logit_cap: float, small_rows: int):
    assert plan.large_rows == 128, "plan with large_rows=128"
    po, pl = plan.partial_out, plan.partial_lse
    grid = torch.cuda.get_device_properties(q.device).multi_processor_count
    return _tree_decode_stage1_fa3dyn2[(grid,)](
        q, k_buffer, v_buffer, plan.kv_indices, plan.qperm, plan.items, plan.counts, _scheduler(q.device), po, pl,
        sm_scale, logit_cap,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        po.stride(0), po.stride(1), pl.stride(0),
        NUM_KV_HEADS=plan.num_kv_heads, GROUP=plan.group_size, HEAD_DIM=q.shape[2], LARGE_M=plan.large_rows,
        SMALL_M=small_rows, BLOCK=BLOCK_N, STAGES=RING, USE_CAP=logit_cap > 0, WARPS=NUM_WARPS,
        PWARPS=PRODUCER_WARPS, PREGS=PRODUCER_REGS, CREGS=CONSUMER_REGS, num_warps=NUM_WARPS)
