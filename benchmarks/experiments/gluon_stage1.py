"""Scratch: stage 1's large tiles as a Gluon kernel (Hopper), one CTA = 2 warpgroups x 64 rows.

K/V blocks are gathered by cp.async into a STAGES-deep shared-memory ring, Q lives in shared memory
(the wgmma A operand), scores and P in registers. Same items/partials format as kernels/tree_decode.py.
"""
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy as cp, fence_async_shared,
                                                              warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_init

LOG2E = 1.4426950408889634


@gluon.jit
def _issue_kv(K, V, k_buf, v_buf, slot_idx, n_ok, kv_head, stride_kn, stride_kh, stride_vn, stride_vh,
              offs_d, HEAD_DIM: gl.constexpr):
    s = slot_idx.to(gl.int64)
    kp = K + s[:, None] * stride_kn + kv_head * stride_kh + offs_d[None, :]
    vp = V + s[:, None] * stride_vn + kv_head * stride_vh + offs_d[None, :]
    m = n_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    cp.async_copy_global_to_shared(k_buf, kp, mask=m)
    cp.async_copy_global_to_shared(v_buf, vp, mask=m)


@gluon.jit
def tree_decode_large_gluon(
    Q, K, V, kv_indices, qperm, items, counts, partial_out, partial_lse, qk_scale,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_pp, stride_ph, stride_lp,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, PIPE: gl.constexpr, num_warps: gl.constexpr,
):
    kv_head = gl.program_id(0)
    item = gl.program_id(1)
    if item >= gl.load(counts):
        return
    dtype: gl.constexpr = Q.dtype.element_ty
    kv_start = gl.load(items + item * 5)
    kv_len = gl.load(items + item * 5 + 1)
    q_start = gl.load(items + item * 5 + 2)
    q_count = gl.load(items + item * 5 + 3)
    slot = gl.load(items + item * 5 + 4)

    # Layouts: gathers and Q loads in 16-byte vectors; wgmma accumulators for S [M, N] and O [M, D].
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, HEAD_DIM, 16])
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)

    # Q tile -> shared memory.
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
    q_local = rows // GROUP
    row_ok = q_local < q_count
    qid = gl.load(qperm + q_start + q_local, mask=row_ok, other=0).to(gl.int64)
    head = kv_head * GROUP + rows % GROUP
    q = gl.load(Q + qid[:, None] * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_sl, q)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_sl)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_sl)

    offs_n_ld = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld))
    offs_n_s = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_l))
    num_blocks = gl.cdiv(kv_len, BLOCK_N)

    # Prologue: blocks 0 .. STAGES-2 in flight (0 .. STAGES-3 when pipelined, see PIPE below).
    for b in gl.static_range(STAGES - 1 - PIPE):
        pos = b * BLOCK_N + offs_n_ld
        ok = pos < kv_len
        idx = gl.load(kv_indices + kv_start + pos, mask=ok, other=0)
        _issue_kv(K, V, k_bufs.index(b), v_bufs.index(b), idx, ok, kv_head, stride_kn, stride_kh,
                  stride_vn, stride_vh, offs_d, HEAD_DIM)
        cp.commit_group()

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_l))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_l))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_l)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_l)
    if PIPE:
        # FA3's intra-warpgroup overlap: block j+1's scores run on the tensor cores while the warps
        # exponentiate block j. A slot is refilled two iterations after its block was used (its
        # P.V has surely finished by then), so copies run STAGES-2 blocks ahead.
        cp.wait_group(STAGES - 3)
        gl.thread_barrier()
        fence_async_shared()
        s = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        acc = warpgroup_mma_init(acc)  # loop-carried as the async accumulator it becomes
        for j in range(num_blocks):
            cp.wait_group(STAGES - 4)
            gl.thread_barrier()
            fence_async_shared()
            nxt = j + STAGES - 2
            pos = nxt * BLOCK_N + offs_n_ld
            ok = pos < kv_len
            idx = gl.load(kv_indices + kv_start + pos, mask=ok, other=0)
            _issue_kv(K, V, k_bufs.index(nxt % STAGES), v_bufs.index(nxt % STAGES), idx, ok, kv_head,
                      stride_kn, stride_kh, stride_vn, stride_vh, offs_d, HEAD_DIM)
            cp.commit_group()
            s_next = warpgroup_mma(q_smem, k_bufs.index((j + 1) % STAGES).permute((1, 0)), s_zero, use_acc=False,
                                   is_async=True)
            s, acc = warpgroup_mma_wait(num_outstanding=1, deps=(s, acc))
            s = s * qk_scale
            s = gl.where((j * BLOCK_N + offs_n_s < kv_len)[None, :], s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_l)
            acc = warpgroup_mma(p_op, v_bufs.index(j % STAGES), acc, is_async=True)
            s = s_next
        s, acc = warpgroup_mma_wait(num_outstanding=0, deps=(s, acc))
    else:
        for j in range(num_blocks):
            # Block j landed (this thread's copies), then everyone's; the slot written next was last
            # read by iteration j-1, which every warp has finished once past the barrier.
            cp.wait_group(STAGES - 2)
            gl.thread_barrier()
            fence_async_shared()
            nxt = j + STAGES - 1
            pos = nxt * BLOCK_N + offs_n_ld
            ok = pos < kv_len
            idx = gl.load(kv_indices + kv_start + pos, mask=ok, other=0)
            _issue_kv(K, V, k_bufs.index(nxt % STAGES), v_bufs.index(nxt % STAGES), idx, ok, kv_head,
                      stride_kn, stride_kh, stride_vn, stride_vh, offs_d, HEAD_DIM)
            cp.commit_group()

            cur = j % STAGES
            s = warpgroup_mma(q_smem, k_bufs.index(cur).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            s = s * qk_scale
            s = gl.where((j * BLOCK_N + offs_n_s < kv_len)[None, :], s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_l)
            acc = warpgroup_mma(p_op, v_bufs.index(cur), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    cp.wait_group(0)

    # Normalised partial rows and their base-2 log-sum-exp.
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


def launch_large(q, k, v, plan, sm_scale, block_n=32, stages=4, num_warps=8, pipe=0, maxnreg=None):
    po, pl = plan.partial_out, plan.partial_lse
    return tree_decode_large_gluon[(plan.num_kv_heads, plan.grid_items)](
        q, k, v, plan.kv_indices, plan.qperm, plan.items, plan.counts, po, pl, sm_scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        po.stride(0), po.stride(1), pl.stride(0),
        GROUP=plan.group_size, HEAD_DIM=q.shape[2], BLOCK_M=plan.large_rows, BLOCK_N=block_n, STAGES=stages,
        PIPE=pipe, num_warps=num_warps, **({"maxnreg": maxnreg} if maxnreg else {}))
