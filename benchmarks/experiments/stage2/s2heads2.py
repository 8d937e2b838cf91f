"""Stage 2 with HEADS heads of one query per program: the merge list is read once for them, and an SM
holds up to 32 programs, so at 4 partials per load 2 heads keep 64 merges resident at 64 registers."""
import triton
import triton.language as tl

HEADS_PER_PROGRAM = 2


@triton.jit
def _tree_decode_stage2(
    partial_out, partial_lse, merge_indptr, merge_slots, counts, Out,
    stride_pp, stride_ph, stride_lp, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, HEADS: tl.constexpr,
):
    b = tl.program_id(0)
    h0 = tl.program_id(1) * HEADS
    if b >= tl.load(counts + 2):
        return
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_p = tl.arange(0, BLOCK_P)
    offs_h = tl.arange(0, HEADS)
    lo = tl.load(merge_indptr + b)
    hi = tl.load(merge_indptr + b + 1)
    m = tl.full([HEADS], float("-inf"), tl.float32)
    denom = tl.zeros([HEADS], tl.float32)
    acc = tl.zeros([HEADS, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_P):
        p_ok = start + offs_p < hi
        slot = tl.load(merge_slots + start + offs_p, mask=p_ok, other=0).to(tl.int64)
        lse = tl.load(partial_lse + slot[:, None] * stride_lp + h0 + offs_h[None, :], mask=p_ok[:, None],
                      other=float("-inf"))  # [P, H]
        o = tl.load(partial_out + slot[:, None, None] * stride_pp + (h0 + offs_h)[None, :, None] * stride_ph
                    + offs_d[None, None, :], mask=p_ok[:, None, None] & d_ok[None, None, :], other=0.0)  # [P, H, D]
        m_new = tl.maximum(m, tl.max(lse, 0))
        w = tl.exp2(lse - m_new[None, :])
        alpha = tl.exp2(m - m_new)
        acc = acc * alpha[:, None] + tl.sum(o * w[:, :, None], 0)
        denom = denom * alpha + tl.sum(w, 0)
        m = m_new
    res = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(Out + b * stride_ob + (h0 + offs_h)[:, None] * stride_oh + offs_d[None, :],
             res.to(Out.dtype.element_ty), mask=d_ok[None, :])
