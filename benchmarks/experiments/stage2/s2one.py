"""Main's stage 2 (kernels/tree_decode.py, one head per program on one warp) as a file: ab_stage2.py's baseline."""
import triton
import triton.language as tl


@triton.jit
def _tree_decode_stage2(
    partial_out, partial_lse, merge_indptr, merge_slots, counts, Out,
    stride_pp, stride_ph, stride_lp, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program per (query, head), on one warp. BLOCK_P partials are loaded at once, so a query's
    # merge costs a few memory round trips rather than one per partial along its path. A merge is a
    # short chain of dependent loads, so the step's merge time goes with how many programs an SM holds:
    # at most 32, which one warp reaches at <= 64 registers. 8 partials on 1 warp take 64 registers
    # for sm_90 (32 programs per SM); 16 on 2 warps, the shape before, 71 (14 programs). On the H200
    # the whole step was 1-6% faster on every benchmark tree. 4 per load tied; 2, 16 (107 registers) and
    # 32 were slower overall (32 won only where queries merge more than 16 partials); loading the next
    # block before folding this one (118 registers) gained nothing (benchmarks/results/ab_stage2_h200.json).
    b = tl.program_id(0)
    head = tl.program_id(1)
    if b >= tl.load(counts + 2):
        return
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_p = tl.arange(0, BLOCK_P)
    lo = tl.load(merge_indptr + b)
    hi = tl.load(merge_indptr + b + 1)
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
    tl.store(Out + b * stride_ob + head * stride_oh + offs_d, res.to(Out.dtype.element_ty), mask=d_ok)
