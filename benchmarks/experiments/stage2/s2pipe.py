"""Stage 2 with the next block's merge slots and partials loaded before this block is folded
(same blocks, same arithmetic as main's loop: bitwise the same output)."""
import triton
import triton.language as tl


@triton.jit
def _tree_decode_stage2(
    partial_out, partial_lse, merge_indptr, merge_slots, counts, Out,
    stride_pp, stride_ph, stride_lp, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    if b >= tl.load(counts + 2):
        return
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_p = tl.arange(0, BLOCK_P)
    lo = tl.load(merge_indptr + b)
    hi = tl.load(merge_indptr + b + 1)
    ok = lo + offs_p < hi
    slot = tl.load(merge_slots + lo + offs_p, mask=ok, other=0).to(tl.int64)
    ok_n = lo + BLOCK_P + offs_p < hi
    slot_n = tl.load(merge_slots + lo + BLOCK_P + offs_p, mask=ok_n, other=0).to(tl.int64)
    lse = tl.load(partial_lse + slot * stride_lp + head, mask=ok, other=float("-inf"))
    o = tl.load(partial_out + slot[:, None] * stride_pp + head * stride_ph + offs_d[None, :],
                mask=ok[:, None] & d_ok[None, :], other=0.0)
    m = float("-inf")
    denom = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_P):
        # The next block's partials (their slots are already here) and the slots after them go out
        # before this block is folded.
        lse_n = tl.load(partial_lse + slot_n * stride_lp + head, mask=ok_n, other=float("-inf"))
        o_n = tl.load(partial_out + slot_n[:, None] * stride_pp + head * stride_ph + offs_d[None, :],
                      mask=ok_n[:, None] & d_ok[None, :], other=0.0)
        ok_nn = start + 2 * BLOCK_P + offs_p < hi
        slot_nn = tl.load(merge_slots + start + 2 * BLOCK_P + offs_p, mask=ok_nn, other=0).to(tl.int64)
        m_new = tl.maximum(m, tl.max(lse, 0))
        w = tl.exp2(lse - m_new)
        alpha = tl.exp2(m - m_new)
        acc = acc * alpha + tl.sum(o * w[:, None], 0)
        denom = denom * alpha + tl.sum(w, 0)
        m = m_new
        lse, o, ok_n, slot_n = lse_n, o_n, ok_nn, slot_nn
    res = acc / tl.where(denom > 0, denom, 1.0)
    tl.store(Out + b * stride_ob + head * stride_oh + offs_d, res.to(Out.dtype.element_ty), mask=d_ok)
