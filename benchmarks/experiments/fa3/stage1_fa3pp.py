"""Experiment (session 15): fa3pp_b64 (session 13) trimmed so that one of its CTAs leaves an SM room
for one of main's stage-1 programs (48K of the 64K registers: .maxnreg 128 over 12 warps, consumers at
144, producer at 96), and triggering programmatic dependent launch at its start: the small-tile items,
launched next as a persistent kernel (stage1_small_pdl.py), then run beside the large units on every SM
instead of after them. Below: session 13's description of the kernel.

Stage 1 for Hopper in FA3's shape. One persistent CTA per SM; a producer
warpgroup (few registers) gathers each KV block of BLOCK tokens through the slot indices with cp.async
into a ring guarded by mbarriers; the consumer, two warpgroups at ~230 registers (Triton's
warp_specialize hands the producer's surrendered registers to the default partition by setmaxnreg),
computes 128-row large tiles with wgmma on 128-token blocks, so the per-block softmax chain is
amortised over 4x the tokens of main's 32-token blocks and one K/V load serves 128 rows.

This variant runs the two consumer warpgroups as two partitions (rows 0-63 and 64-127 of each large
tile), each freeing a ring slot by its own arrival (the slot's 'empty' barrier counts 2), so they are
not held in lockstep by a per-block 256-thread barrier: one can run its softmax while the other's
wgmma use the tensor cores. Small items run on the first consumer (mma.sync, 4 warps); the second
only passes their blocks.

Work: the plan's (item, kv head) pairs, large items first, dealt round-robin to the CTAs; the producer
runs ahead across item boundaries (the ring's counter is global), which hides each item's start-up.
Small items (16 rows) run on the same 8 consumer warps with mma.sync. Same items, partials and
launch() as kernels/stage1_hopper.py; plans must use large_rows=128."""
from __future__ import annotations

import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, warpgroup_mma, warpgroup_mma_wait

LOG2E = gl.constexpr(1.4426950408889634)
BLOCK_N = 64
RING = int(os.environ.get("FA3CO_RING", "4"))  # 3 leaves room for two small programs beside (162 -> 130 KB)
NUM_WARPS = 4  # the first consumer; the second and the producer are worker partitions
CONSUMER_REGS = int(os.environ.get("FA3CO_CREGS", "144"))  # the second consumer; the first gets what is left of 12 warps x 128
MAXNREG = int(os.environ.get("FA3CO_MAXNREG", "128"))
# Session 24: FA3's two scheduling devices on the consumers' large-tile loop. PINGPONG: the two consumer
# warpgroups take turns issuing their wgmma (named barriers 14 and 15), so one's softmax runs while the
# other's matmuls hold the tensor cores, instead of both waiting on the same block and computing in
# phase. INTRA: within a warpgroup, the softmax of block j runs while PV(j-1) is still in flight.
# LOOP2: the restructured loop (PV(j-1) and QK(j) issued together) without either device.
PINGPONG = int(os.environ.get("FA3CO_PINGPONG", "0"))
INTRA = int(os.environ.get("FA3CO_INTRA", "0"))
LOOP2 = int(os.environ.get("FA3CO_LOOP2", "0"))
PRODUCER_WARPS = 4
PRODUCER_REGS = 96  # 8 gathered rows per thread at 64-token blocks


@gluon.jit
def _load_idx(kv_indices, kv_start, kv_len, blk, offs_n, BLOCK: gl.constexpr):
    pos = blk * BLOCK + offs_n
    return gl.load(kv_indices + kv_start + pos, mask=pos < kv_len, other=0)


@gluon.jit
def _producer(K, V, kv_indices, items, counts, k_bufs, v_bufs, ready, empty, stride_kn, stride_kh, stride_vn,
              stride_vh, NUM_KV_HEADS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr,
              STAGES: gl.constexpr, PWARPS: gl.constexpr):
    total = (gl.load(counts) + gl.load(counts + 1)) * NUM_KV_HEADS
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [PWARPS, 1], [1, 0])
    offs_n = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, ld))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
    t = 0
    for w in range(gl.program_id(0), total, gl.num_programs(0)):
        item = w // NUM_KV_HEADS
        kv_head = w % NUM_KV_HEADS
        kv_start = gl.load(items + item * 5)
        kv_len = gl.load(items + item * 5 + 1)
        idx = _load_idx(kv_indices, kv_start, kv_len, 0, offs_n, BLOCK)
        for j in range(gl.cdiv(kv_len, BLOCK)):
            s = t % STAGES
            nxt = _load_idx(kv_indices, kv_start, kv_len, j + 1, offs_n, BLOCK)
            # A fresh mbarrier counts as having completed the phase before its first: the first
            # STAGES waits pass at once.
            mbarrier.wait(empty.index(s), ((t // STAGES) & 1) ^ 1)
            m = (j * BLOCK + offs_n < kv_len)[:, None] & (offs_d >= 0)[None, :]
            sl = idx.to(gl.int64)
            cp.async_copy_global_to_shared(k_bufs.index(s), K + sl[:, None] * stride_kn + kv_head * stride_kh
                                           + offs_d[None, :], mask=m)
            cp.async_copy_global_to_shared(v_bufs.index(s), V + sl[:, None] * stride_vn + kv_head * stride_vh
                                           + offs_d[None, :], mask=m)
            cp.mbarrier_arrive(ready.index(s), increment_count=False)
            idx = nxt
            t += 1


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
def _asm(ASM: gl.constexpr):
    gl.inline_asm_elementwise(ASM, "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _turn_begin(WG: gl.constexpr, PP: gl.constexpr):
    """Wait for this consumer's turn to issue wgmma (named barrier 14 + WG, 256 threads: this consumer
    syncs, the other arrives when it has issued its own)."""
    if PP:
        if WG == 0:
            _asm("bar.sync 14, 256; // $0")
        else:
            _asm("bar.sync 15, 256; // $0")


@gluon.jit
def _turn_end(WG: gl.constexpr, PP: gl.constexpr):
    if PP:
        if WG == 0:
            _asm("bar.arrive 15, 256; // $0")
        else:
            _asm("bar.arrive 14, 256; // $0")


@gluon.jit
def _large_loop(q_op, k_bufs, v_bufs, ready, empty, t, m_i, l_i, acc, s_zero, kv_len, offs_n_s, sm_scale, logit_cap,
                p_l: gl.constexpr, o_l: gl.constexpr, dtype: gl.constexpr, BLOCK: gl.constexpr,
                STAGES: gl.constexpr, USE_CAP: gl.constexpr, WG: gl.constexpr, PP: gl.constexpr,
                INTRA: gl.constexpr):
    """FA3's consumer loop: PV(j-1) and QK(j) issued as one turn, softmax(j) after QK(j) lands (INTRA:
    while PV(j-1) still runs), the accumulator rescaled once PV(j-1) is done."""
    cur = t % STAGES
    mbarrier.wait(ready.index(cur), (t // STAGES) & 1)
    fence_async_shared()
    _turn_begin(WG, PP)
    s = warpgroup_mma(q_op, k_bufs.index(cur).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    _turn_end(WG, PP)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, 0, kv_len, offs_n_s, sm_scale, logit_cap, BLOCK, USE_CAP)
    p_op = gl.convert_layout(p.to(dtype), p_l)
    prev = cur
    t += 1
    for j in range(1, gl.cdiv(kv_len, BLOCK)):
        cur = t % STAGES
        mbarrier.wait(ready.index(cur), (t // STAGES) & 1)
        fence_async_shared()
        _turn_begin(WG, PP)
        s = warpgroup_mma(q_op, k_bufs.index(cur).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        acc = warpgroup_mma(p_op, v_bufs.index(prev), acc, is_async=True)
        _turn_end(WG, PP)
        if INTRA:
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
            p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, j, kv_len, offs_n_s, sm_scale, logit_cap, BLOCK,
                                                 USE_CAP)
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
        else:
            s, acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(s, acc, p_op))
            p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, j, kv_len, offs_n_s, sm_scale, logit_cap, BLOCK,
                                                 USE_CAP)
        gl.thread_barrier()  # every warp of this consumer is done with block j-1's slot
        mbarrier.arrive(empty.index(prev), count=1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_l)
        prev = cur
        t += 1
    _turn_begin(WG, PP)
    acc = warpgroup_mma(p_op, v_bufs.index(prev), acc, is_async=True)
    _turn_end(WG, PP)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    gl.thread_barrier()
    mbarrier.arrive(empty.index(prev), count=1)
    return t, m_i, l_i, acc


@gluon.jit
def _pass_item(items, item, t, ready, empty, BLOCK: gl.constexpr, STAGES: gl.constexpr):
    """The second consumer on a small item: take and free each block without reading it."""
    kv_len = gl.load(items + item * 5 + 1)
    for j in range(gl.cdiv(kv_len, BLOCK)):
        cur = t % STAGES
        mbarrier.wait(ready.index(cur), (t // STAGES) & 1)
        mbarrier.arrive(empty.index(cur), count=1)
        t += 1
    return t


@gluon.jit
def _consume_item(Q, qperm, items, item, kv_head, t, k_bufs, v_bufs, q_smem, ready, empty, partial_out,
                  partial_lse, sm_scale, logit_cap, stride_qb, stride_qh, stride_pp, stride_ph, stride_lp,
                  GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, ROW0: gl.constexpr,
                  BLOCK: gl.constexpr, STAGES: gl.constexpr, WGMMA: gl.constexpr, USE_CAP: gl.constexpr,
                  WARPS: gl.constexpr, WG: gl.constexpr = 0, LOOP: gl.constexpr = 0, PP: gl.constexpr = 0,
                  INTRA: gl.constexpr = 0):
    dtype: gl.constexpr = Q.dtype.element_ty
    kv_len = gl.load(items + item * 5 + 1)
    q_start = gl.load(items + item * 5 + 2)
    q_count = gl.load(items + item * 5 + 3)
    slot = gl.load(items + item * 5 + 4)
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
    if WGMMA:
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BLOCK, 16])
        o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, HEAD_DIM, 16])
    else:
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, WARPS], instr_shape=[16, 8])
        o_l: gl.constexpr = s_l
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)

    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld)) + ROW0
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
    q_local = rows // GROUP
    row_ok = q_local < q_count
    qid = gl.load(qperm + q_start + q_local, mask=row_ok, other=0).to(gl.int64)
    head = kv_head * GROUP + rows % GROUP
    q = gl.load(Q + qid[:, None] * stride_qb + head[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    if WGMMA:
        gl.thread_barrier()  # every warp of this consumer is done with the previous item's Q
        q_smem.store(q)
        fence_async_shared()
        gl.thread_barrier()
        q_op = q_smem
    else:
        q_op = gl.convert_layout(q, gl.DotOperandLayout(operand_index=0, parent=s_l, k_width=2))

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_l))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_l))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_l)
    s_zero = gl.zeros([BLOCK_M, BLOCK], gl.float32, layout=s_l)
    offs_n_s = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, s_l))
    if LOOP:
        t, m_i, l_i, acc = _large_loop(q_op, k_bufs, v_bufs, ready, empty, t, m_i, l_i, acc, s_zero, kv_len, offs_n_s,
                                       sm_scale, logit_cap, p_l, o_l, dtype, BLOCK, STAGES, USE_CAP, WG, PP, INTRA)
    for j in range(gl.cdiv(kv_len, BLOCK) * (1 - LOOP)):
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
def _consumer(Q, qperm, items, counts, k_bufs, v_bufs, q_smem, ready, empty, partial_out, partial_lse, sm_scale,
              logit_cap, stride_qb, stride_qh, stride_pp, stride_ph, stride_lp, NUM_KV_HEADS: gl.constexpr,
              GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, LARGE_M: gl.constexpr, SMALL_M: gl.constexpr,
              BLOCK: gl.constexpr, STAGES: gl.constexpr, USE_CAP: gl.constexpr, WG: gl.constexpr,
              ROW0: gl.constexpr, HALF: gl.constexpr, LOOP: gl.constexpr, PP: gl.constexpr, INTRA: gl.constexpr):
    num_large = gl.load(counts)
    total = (num_large + gl.load(counts + 1)) * NUM_KV_HEADS
    t = 0
    if PP:
        if WG == 1:
            _asm("bar.arrive 14, 256; // $0")  # consumer 0 issues first
    for w in range(gl.program_id(0), total, gl.num_programs(0)):
        item = w // NUM_KV_HEADS
        kv_head = w % NUM_KV_HEADS
        if item < num_large:
            t = _consume_item(Q, qperm, items, item, kv_head, t, k_bufs, v_bufs, q_smem.index(WG), ready, empty,
                              partial_out, partial_lse, sm_scale, logit_cap, stride_qb, stride_qh, stride_pp,
                              stride_ph, stride_lp, GROUP, HEAD_DIM, HALF, ROW0, BLOCK,
                              STAGES, True, USE_CAP, 4, WG, LOOP, PP, INTRA)
        else:
            if WG == 0:
                t = _consume_item(Q, qperm, items, item, kv_head, t, k_bufs, v_bufs, q_smem.index(WG), ready,
                                  empty, partial_out, partial_lse, sm_scale, logit_cap, stride_qb, stride_qh,
                                  stride_pp, stride_ph, stride_lp, GROUP, HEAD_DIM, SMALL_M, 0, BLOCK, STAGES,
                                  False, USE_CAP, 4)
            else:
                t = _pass_item(items, item, t, ready, empty, BLOCK, STAGES)
    if PP:
        if WG == 0:
            _asm("bar.sync 14, 256; // $0")  # the other consumer's last arrival (it arrives once more than we sync)


# warp_specialize passes its arguments as values, not constexprs: one entry point per consumer.
@gluon.jit
def _consumer0(Q, qperm, items, counts, k_bufs, v_bufs, q_smem, ready, empty, partial_out, partial_lse, sm_scale,
               logit_cap, stride_qb, stride_qh, stride_pp, stride_ph, stride_lp, NUM_KV_HEADS: gl.constexpr,
               GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, LARGE_M: gl.constexpr, SMALL_M: gl.constexpr,
               BLOCK: gl.constexpr, STAGES: gl.constexpr, USE_CAP: gl.constexpr, LOOP: gl.constexpr,
               PP: gl.constexpr, INTRA: gl.constexpr):
    _consumer(Q, qperm, items, counts, k_bufs, v_bufs, q_smem, ready, empty, partial_out, partial_lse, sm_scale,
              logit_cap, stride_qb, stride_qh, stride_pp, stride_ph, stride_lp, NUM_KV_HEADS, GROUP, HEAD_DIM,
              LARGE_M, SMALL_M, BLOCK, STAGES, USE_CAP, 0, 0, 64, LOOP, PP, INTRA)


@gluon.jit
def _consumer1(Q, qperm, items, counts, k_bufs, v_bufs, q_smem, ready, empty, partial_out, partial_lse, sm_scale,
               logit_cap, stride_qb, stride_qh, stride_pp, stride_ph, stride_lp, NUM_KV_HEADS: gl.constexpr,
               GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, LARGE_M: gl.constexpr, SMALL_M: gl.constexpr,
               BLOCK: gl.constexpr, STAGES: gl.constexpr, USE_CAP: gl.constexpr, LOOP: gl.constexpr,
               PP: gl.constexpr, INTRA: gl.constexpr):
    _consumer(Q, qperm, items, counts, k_bufs, v_bufs, q_smem, ready, empty, partial_out, partial_lse, sm_scale,
              logit_cap, stride_qb, stride_qh, stride_pp, stride_ph, stride_lp, NUM_KV_HEADS, GROUP, HEAD_DIM,
              LARGE_M, SMALL_M, BLOCK, STAGES, USE_CAP, 1, 64, 64, LOOP, PP, INTRA)  # rows 64-127 (launch asserts 128-row tiles)


@gluon.jit
def _tree_decode_stage1_fa3co(
    Q, K, V, kv_indices, qperm, items, counts, partial_out, partial_lse, sm_scale, logit_cap,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_pp, stride_ph, stride_lp,
    NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, LARGE_M: gl.constexpr,
    SMALL_M: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr, USE_CAP: gl.constexpr,
    WARPS: gl.constexpr, PWARPS: gl.constexpr, PREGS: gl.constexpr, CREGS: gl.constexpr, times,
    TIMED: gl.constexpr, LOOP: gl.constexpr = 0, PP: gl.constexpr = 0, INTRA: gl.constexpr = 0,
):
    if TIMED:  # (start, end, SM) per CTA, for timeline_coresident.py
        gl.store(times + gl.program_id(0) * 3, _globaltimer())
        gl.store(times + gl.program_id(0) * 3 + 2, _smid().to(gl.int64))
    # Let the small-tile launch start now: its programs take the room this CTA leaves on each SM.
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)
    dtype: gl.constexpr = Q.dtype.element_ty
    kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK, HEAD_DIM], dtype)
    q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([LARGE_M // 2, HEAD_DIM], dtype)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], kv_sl)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], kv_sl)
    q_smem = gl.allocate_shared_memory(dtype, [2, LARGE_M // 2, HEAD_DIM], q_sl)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        # Every producer thread's copies arrive once (noinc) per fill; each consumer frees once.
        mbarrier.init(ready.index(i), count=PWARPS * 32)
        mbarrier.init(empty.index(i), count=2)
    gl.warp_specialize([
        # (the argument tuples spelled out: a tuple held in a variable turns its constexprs into values)
        (_consumer0, (Q, qperm, items, counts, k_bufs, v_bufs, q_smem, ready, empty, partial_out, partial_lse, sm_scale,
                      logit_cap, stride_qb, stride_qh, stride_pp, stride_ph, stride_lp, NUM_KV_HEADS, GROUP,
                      HEAD_DIM, LARGE_M, SMALL_M, BLOCK, STAGES, USE_CAP, LOOP, PP, INTRA)),
        (_consumer1, (Q, qperm, items, counts, k_bufs, v_bufs, q_smem, ready, empty, partial_out, partial_lse, sm_scale,
                      logit_cap, stride_qb, stride_qh, stride_pp, stride_ph, stride_lp, NUM_KV_HEADS, GROUP,
                      HEAD_DIM, LARGE_M, SMALL_M, BLOCK, STAGES, USE_CAP, LOOP, PP, INTRA)),
        (_producer, (K, V, kv_indices, items, counts, k_bufs, v_bufs, ready, empty, stride_kn, stride_kh, stride_vn,
                     stride_vh, NUM_KV_HEADS, HEAD_DIM, BLOCK, STAGES, PWARPS)),
    ], [4, PWARPS], [CREGS, PREGS])
    if TIMED:
        gl.store(times + gl.program_id(0) * 3 + 1, _globaltimer())


@gluon.jit
def _globaltimer():
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _smid():
    return gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


def launch(q, k_buffer, v_buffer, plan, sm_scale: float, logit_cap: float, small_rows: int, times=None,
           units: int | None = None):
    assert plan.large_rows == 128, "plan with large_rows=128"
    po, pl = plan.partial_out, plan.partial_lse
    grid = torch.cuda.get_device_properties(q.device).multi_processor_count
    if units:  # one CTA per unit when they are fewer than the SMs: the SMs left over run small units only
        grid = min(grid, units)
    return _tree_decode_stage1_fa3co[(grid,)](
        q, k_buffer, v_buffer, plan.kv_indices, plan.qperm, plan.items, plan.counts, po, pl, sm_scale, logit_cap,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        po.stride(0), po.stride(1), pl.stride(0),
        NUM_KV_HEADS=plan.num_kv_heads, GROUP=plan.group_size, HEAD_DIM=q.shape[2], LARGE_M=plan.large_rows,
        SMALL_M=small_rows, BLOCK=BLOCK_N, STAGES=RING, USE_CAP=logit_cap > 0, WARPS=NUM_WARPS,
        PWARPS=PRODUCER_WARPS, PREGS=PRODUCER_REGS, CREGS=CONSUMER_REGS, times=times if times is not None else pl,
        TIMED=times is not None, LOOP=max(LOOP2, PINGPONG, INTRA), PP=PINGPONG, INTRA=INTRA, num_warps=NUM_WARPS,
        maxnreg=MAXNREG)
