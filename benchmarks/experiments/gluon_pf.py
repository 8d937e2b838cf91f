"""Scratch: stage 1 as a Gluon kernel whose KV pipeline is actually deep.

Main's Triton loop waits for *all* outstanding cp.async groups at the top of every iteration
(`cp.async.wait_group 0`, SASS `DEPBAR.LE SB0, 0x0`): the slot indices of block i+1 are themselves an
async copy issued in iteration i-1, and Triton must have them before it can issue block i+1's K/V, so
it waits for everything. K/V is then issued one block ahead, late in the iteration, and every block
pays a whole gathered-load round trip. Here the indices are plain loads PF blocks ahead of their use
(in registers, loop-carried), K/V are issued at the top of the iteration into a STAGES-deep ring and
the wait leaves STAGES-2 groups in flight.

Same grid, items and partials as kernels/tree_decode.py (TILES 0: both tile kinds in one launch,
1: large only, 2: small only). Large tiles: one warpgroup, 64 rows, wgmma (Q in shared memory).
Small tiles: 16 rows, mma.sync, warps split over the block's tokens.
"""
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp, mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

LOG2E = 1.4426950408889634


@gluon.jit
def _issue_kv(K, V, k_buf, v_buf, kv_start, kv_len, blk, idx, offs_n, offs_d, kv_head,
              stride_kn, stride_kh, stride_vn, stride_vh, BLOCK_N: gl.constexpr):
    ok = blk * BLOCK_N + offs_n < kv_len
    s = idx.to(gl.int64)
    m = ok[:, None] & (offs_d >= 0)[None, :]
    cp.async_copy_global_to_shared(k_buf, K + s[:, None] * stride_kn + kv_head * stride_kh + offs_d[None, :], mask=m)
    cp.async_copy_global_to_shared(v_buf, V + s[:, None] * stride_vn + kv_head * stride_vh + offs_d[None, :], mask=m)


@gluon.jit
def _load_idx(kv_indices, kv_start, kv_len, blk, offs_n, BLOCK_N: gl.constexpr):
    pos = blk * BLOCK_N + offs_n
    return gl.load(kv_indices + kv_start + pos, mask=pos < kv_len, other=0)


@gluon.jit
def _attend(Q, K, V, kv_indices, qperm, items, item, kv_head, partial_out, partial_lse, qk_scale,
            stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_pp, stride_ph, stride_lp,
            GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
            STAGES: gl.constexpr, PF: gl.constexpr, WGMMA: gl.constexpr, NUM_WARPS: gl.constexpr):
    dtype: gl.constexpr = Q.dtype.element_ty
    kv_start = gl.load(items + item * 5)
    kv_len = gl.load(items + item * 5 + 1)
    q_start = gl.load(items + item * 5 + 2)
    q_count = gl.load(items + item * 5 + 3)
    slot = gl.load(items + item * 5 + 4)

    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NUM_WARPS, 1], [1, 0])
    kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    if WGMMA:
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                      instr_shape=[16, BLOCK_N, 16])
        o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                      instr_shape=[16, HEAD_DIM, 16])
    else:
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NUM_WARPS],
                                                      instr_shape=[16, 8])
        o_l: gl.constexpr = s_l
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)

    # K/V ring first: the prologue's copies are in flight while Q is fetched.
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_sl)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_sl)
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
    for b in gl.static_range(STAGES - 1):
        idx = _load_idx(kv_indices, kv_start, kv_len, b, offs_n, BLOCK_N)
        _issue_kv(K, V, k_bufs.index(b), v_bufs.index(b), kv_start, kv_len, b, idx, offs_n, offs_d, kv_head,
                  stride_kn, stride_kh, stride_vn, stride_vh, BLOCK_N)
        cp.commit_group()
    # Slot indices of the next blocks to issue, PF of them, loaded ahead of their use.
    idx1 = _load_idx(kv_indices, kv_start, kv_len, STAGES - 1, offs_n, BLOCK_N)
    if PF >= 2:
        idx2 = _load_idx(kv_indices, kv_start, kv_len, STAGES, offs_n, BLOCK_N)

    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
    q_local = rows // GROUP
    row_ok = q_local < q_count
    qid = gl.load(qperm + q_start + q_local, mask=row_ok, other=0).to(gl.int64)
    head = kv_head * GROUP + rows % GROUP
    q = gl.load(Q + qid[:, None] * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if WGMMA:
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
        q_op = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_sl, q)
    else:
        q_op = gl.convert_layout(q, gl.DotOperandLayout(operand_index=0, parent=s_l, k_width=2))

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_l))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_l))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_l)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_l)
    offs_n_s = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_l))
    num_blocks = gl.cdiv(kv_len, BLOCK_N)
    for j in range(num_blocks):
        # Block j landed (this thread's copies), then everyone's; the ring slot refilled next was
        # last read in iteration j-1, which every warp has finished once past the barrier.
        cp.wait_group(STAGES - 2)
        gl.thread_barrier()
        if WGMMA:
            fence_async_shared()
        nxt = j + STAGES - 1
        _issue_kv(K, V, k_bufs.index(nxt % STAGES), v_bufs.index(nxt % STAGES), kv_start, kv_len, nxt, idx1,
                  offs_n, offs_d, kv_head, stride_kn, stride_kh, stride_vn, stride_vh, BLOCK_N)
        cp.commit_group()
        if PF >= 2:
            idx1 = idx2
            idx2 = _load_idx(kv_indices, kv_start, kv_len, nxt + 2, offs_n, BLOCK_N)
        else:
            idx1 = _load_idx(kv_indices, kv_start, kv_len, nxt + 1, offs_n, BLOCK_N)

        cur = j % STAGES
        if WGMMA:
            s = warpgroup_mma(q_op, k_bufs.index(cur).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        else:
            kt = k_bufs.index(cur).permute((1, 0)).load(gl.DotOperandLayout(operand_index=1, parent=s_l, k_width=2))
            s = mma_v2(q_op, kt, s_zero)
        s = s * qk_scale
        s = gl.where((j * BLOCK_N + offs_n_s < kv_len)[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_l)
        if WGMMA:
            acc = warpgroup_mma(p_op, v_bufs.index(cur), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        else:
            vv = v_bufs.index(cur).load(gl.DotOperandLayout(operand_index=1, parent=o_l, k_width=2))
            acc = mma_v2(p_op, vv, acc)
    cp.wait_group(0)

    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_l))
    out = acc / l_o[:, None]
    rows_o = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_l))
    d_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_l))
    ql_o = rows_o // GROUP
    ok_o = ql_o < q_count
    out_row = (slot + ql_o).to(gl.int64)
    head_o = kv_head * GROUP + rows_o % GROUP
    gl.store(partial_out + out_row[:, None] * stride_pp + head_o[:, None] * stride_ph + d_o[None, :], out,
             mask=ok_o[:, None])
    lse = gl.convert_layout(m_i + gl.log2(l_i), gl.SliceLayout(1, o_l))
    gl.store(partial_lse + out_row * stride_lp + head_o, lse, mask=ok_o)


@gluon.jit
def tree_decode_stage1_gluon(
    Q, K, V, kv_indices, qperm, items, counts, partial_out, partial_lse, qk_scale,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_pp, stride_ph, stride_lp,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, LARGE_M: gl.constexpr, LARGE_N: gl.constexpr,
    SMALL_N: gl.constexpr, LARGE_STAGES: gl.constexpr, SMALL_STAGES: gl.constexpr, PF: gl.constexpr, TILES: gl.constexpr, NUM_WARPS: gl.constexpr,
):
    kv_head = gl.program_id(0)
    pid = gl.program_id(1)
    num_large = gl.load(counts)
    if TILES == 2:
        item = num_large + pid
        is_large = False
        in_range = pid < gl.load(counts + 1)
    else:
        item = pid
        is_large = pid < num_large
        if TILES == 1:
            in_range = is_large
        else:
            in_range = pid < num_large + gl.load(counts + 1)
    if in_range:
        if is_large:
            _attend(Q, K, V, kv_indices, qperm, items, item, kv_head, partial_out, partial_lse, qk_scale,
                    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_pp, stride_ph, stride_lp,
                    GROUP, HEAD_DIM, LARGE_M, LARGE_N, LARGE_STAGES, PF, True, NUM_WARPS)
        elif TILES != 1:
            _attend(Q, K, V, kv_indices, qperm, items, item, kv_head, partial_out, partial_lse, qk_scale,
                    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_pp, stride_ph, stride_lp,
                    GROUP, HEAD_DIM, 16, SMALL_N, SMALL_STAGES, PF, False, NUM_WARPS)


def launch_stage1(q, k, v, plan, sm_scale, tiles=0, large_stages=3, small_stages=3, pf=2, large_n=32, small_n=32, num_warps=4, maxnreg=None):
    po, pl = plan.partial_out, plan.partial_lse
    return tree_decode_stage1_gluon[(plan.num_kv_heads, plan.grid_items)](
        q, k, v, plan.kv_indices, plan.qperm, plan.items, plan.counts, po, pl, sm_scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        po.stride(0), po.stride(1), pl.stride(0),
        GROUP=plan.group_size, HEAD_DIM=q.shape[2], LARGE_M=plan.large_rows, LARGE_N=large_n, SMALL_N=small_n,
        LARGE_STAGES=large_stages, SMALL_STAGES=small_stages, PF=pf, TILES=tiles, NUM_WARPS=num_warps, num_warps=num_warps,
        **({"maxnreg": maxnreg} if maxnreg else {}))
