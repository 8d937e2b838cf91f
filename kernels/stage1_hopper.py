"""Stage 1 for Hopper (sm_90) as a Gluon kernel: the same work items and partials as the Triton
kernel in ``tree_decode.py``, with a KV pipeline that keeps gathered loads in flight.

Why a second kernel. Each KV block is gathered through its slot indices, so the K/V copies of block
i+1 depend on a load of block i+1's indices. Triton's software pipeliner (3.6) makes the index load
an async copy too, and to issue block i+1's K/V it must wait for *every* outstanding copy
(``cp.async.wait_group 0`` at the top of the loop): K/V are then issued one block ahead, late in the
iteration, and each block costs a whole gathered-load round trip (~2 us per block whatever the tile,
`benchmarks/results/kernel_experiments_h200.md`). Here the indices are plain loads made two blocks
before their use and carried in registers, and each iteration first issues the next block's K/V and
only then computes, so the copy overlaps a whole iteration's math. On the H200 this made the step
0.83-0.96x the Triton kernel's time on every benchmark tree
(`benchmarks/results/ab_hopper_stage1_h200.json`; the whole table in `kernels_h200.md`).

Per block, the softmax scale rides in exp2's argument (one FFMA per score instead of a multiply and a
subtract) and only an item's last block masks tokens past its end: 1-3% off the step on the larger
trees (`benchmarks/results/ab_stage1_h200.json`).

At head_dim 256 the same shape holds a [64, 256] fp32 accumulator (~190 registers) and 96 KB of shared
memory: two programs per SM. It still took 0.63-0.69x the Triton kernel's step time on the H200 (no
sharing 64 x 2k, 16 q / 16 kv heads: 494 against 784 us, the Triton loop paying a gathered-load round
trip per 16-token block); a launch per tile kind, each compiled to its own registers, or 16-token
blocks were slower (`benchmarks/results/ab_head_dim_256_h200.json`). Head dims 80 and 96 run padded to
128 (``BLOCK_D``): the masked columns are neither loaded nor stored, and the copies fill them with zeros,
which add nothing to the scores or the output (96: 0.56-0.59x the Triton kernel's step,
`ab_head_dim_96_h200.json`).

An fp8 KV cache (SGLang's fp8_e4m3 / fp8_e5m2, with q in float16 or bfloat16) lands in the ring as
stored, half the bytes of a bf16 block, and is converted to q's dtype after it lands, exactly (every fp8
value is a float16 and a bfloat16). A large tile's warpgroup converts each block once into shared memory
for wgmma (whose B operand lives there, and which takes fp8 only with an fp8 A: Q or P rounded); a small
tile's warps convert their own slices of the block in registers. To bfloat16 the conversion goes through
float32, not Triton's float16 route, whose F2F instructions run at a quarter of the FMA pipe's rate. On
the H200 (bf16 q, fp8_e4m3, `benchmarks/results/ab_fp8_hopper_h200.json`) this is 0.67-0.88x the Triton
kernel's step on the benchmark's trees (no sharing 100.9 against 149.4 us, prefix 16k x 64 88.8 against
116.0); converting both tile kinds through shared memory with Triton's conversion was 0.91-0.97x.

Tiles, as in the Triton kernel: large tiles (``LARGE_M`` = 64 rows of (query, GQA head)) on one
warpgroup with wgmma, Q in shared memory; small tiles (16 rows: a private tail) with mma.sync, the
four warps splitting the block's tokens. Both run in one launch, large items first.

Gluon's API changes between Triton releases (3.9 renamed the async copy this uses), so the kernel
is used only where it was built and measured: sm_90, Triton 3.5 and 3.6 (``unsupported_reason``). Triton 3.5
(what ``pip install sglang==0.5.10.post1`` brings with torch 2.9.1) has no mma.sync in Gluon: there a small
tile runs as a large tile's wgmma, the rows past its queries masked (``launch``'s ``small_wgmma``). On the H100
under 3.5.1 the kernel took 0.92x the Triton kernel's step over the shared trees in bf16 and 0.85x over an fp8
cache; under 3.6 the wgmma small tiles are even with mma.sync in bf16 and 7% slower over an fp8 cache, whose
blocks they convert through shared memory (`benchmarks/results/triton35_h100.md`).
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp

try:
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
except ImportError:  # Triton 3.5's Gluon has no mma.sync
    mma_v2 = None
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

LOG2E = gl.constexpr(1.4426950408889634)  # scores in base 2: the kernel uses exp2/log2
# The soft cap's tanh below |x| = TANH_SERIES_BELOW: its series to x^5, within 1.2e-7 (relative; 5.4e-8 of it
# truncation, the rest float32 rounding) there; above it 1 - 2 / (1 + e^{2x}), within ~2e-7 (absolute), which alone
# lost every digit as x -> 0 (a cap far above the scores).
TANH_SERIES_BELOW = gl.constexpr(0.1)
FP32_MAX = float(torch.finfo(torch.float32).max)
LARGE_ROWS = 64  # one warpgroup's wgmma tile
BLOCK_N = 32  # KV tokens per block, both tile kinds
RING = 2  # K/V blocks in shared memory: one computed, one landing (48 KB with Q at head_dim 128: 4 programs per SM)
NUM_WARPS = 4
# Small tiles on the large tiles' wgmma where this Triton's Gluon has no mma.sync (``launch``'s default).
SMALL_TILES_ON_WGMMA = mma_v2 is None
TRITON_VERSIONS = ("3.5", "3.6")
# fp8 KV caches read as stored and converted to q's dtype (SGLang's fp8_e4m3 / fp8_e5m2): tree_decode's
# FP8_KV_DTYPES (a test checks), repeated so that this module loads on its own, as the experiments load it.
FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Measured on the H200; 80 and 96 (Phi-2's and Phi-3-mini's heads) run padded to 128, masked.
HEAD_DIMS = (64, 80, 96, 128, 256)


def unsupported_reason(device, dtype, head_dim: int, large_rows: int, kv_dtype=None) -> str | None:
    """Why this kernel cannot serve the call (None when it can); ``kv_dtype`` is the KV cache's when it is
    not q's ``dtype``."""
    if getattr(device, "type", device) != "cuda":
        return "not a CUDA device"
    if torch.version.hip is not None:  # ROCm's torch says "cuda" too, and MI200 reports capability (9, 0)
        return "a ROCm device (the Gluon kernel is written for NVIDIA's Hopper)"
    major_minor = ".".join(triton.__version__.split(".")[:2])
    if major_minor not in TRITON_VERSIONS:
        return f"Triton {triton.__version__} (the Gluon kernel is built for {', '.join(TRITON_VERSIONS)})"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return f"compute capability {torch.cuda.get_device_capability(device)} (needs sm_90)"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{dtype} (needs float16 or bfloat16)"
    if kv_dtype not in (None, dtype, *FP8_KV_DTYPES):
        return f"a {kv_dtype} KV cache for {dtype} queries (needs q's dtype or {' or '.join(map(str, FP8_KV_DTYPES))})"
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} (needs one of {', '.join(map(str, HEAD_DIMS))})"
    if large_rows != LARGE_ROWS:
        return f"large tiles of {large_rows} rows (needs {LARGE_ROWS})"
    return None


@gluon.jit
def _load_idx(kv_indices, kv_start, kv_len, blk, offs_n, BLOCK: gl.constexpr):
    pos = blk * BLOCK + offs_n
    return gl.load(kv_indices + kv_start + pos, mask=pos < kv_len, other=0)


@gluon.jit
def _issue_kv(K, V, k_buf, v_buf, kv_len, blk, idx, offs_n, offs_d, kv_head,
              stride_kn, stride_kh, stride_vn, stride_vh, BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr):
    # Masked copies write zeros: V rows past the item's end must be finite (their P is 0), and the
    # columns past a head dim padded to a power of two must add nothing to the scores or the output.
    ok = blk * BLOCK + offs_n < kv_len
    s = idx.to(gl.int64)
    m = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    cp.async_copy_global_to_shared(k_buf, K + s[:, None] * stride_kn + kv_head * stride_kh + offs_d[None, :], mask=m)
    cp.async_copy_global_to_shared(v_buf, V + s[:, None] * stride_vn + kv_head * stride_vh + offs_d[None, :], mask=m)


@gluon.jit
def _in_dtype(x, dtype: gl.constexpr):
    """K/V values in q's ``dtype``: as they are, or an fp8 cache's converted (exactly: every fp8 value is a
    float16 and a bfloat16). To bfloat16 the conversion goes through float32: Triton's own goes through
    float16 with two F2F per pair, which run at a quarter of the FMA pipe's rate; fp32 to bf16 packs a pair
    in one F2FP."""
    if x.dtype == dtype:
        y = x
    elif dtype == gl.bfloat16:
        y = x.to(gl.float16).to(gl.float32).to(dtype)
    else:
        y = x.to(dtype)
    return y


@gluon.jit
def _soft_cap(s, cap_scale):
    """tanh(s sm_scale / cap) for a raw score s = q.k, given sm_scale / cap: SGLang's capped score divided by the cap,
    which _online_softmax's one multiply per score takes back to cap x log2(e) units.

    Not kernels/tree_decode.py's rational (one division and 15 FMA-pipe operations per score): the large tiles are
    bound by arithmetic per score, and this form, two MUFU operations (ex2, rcp) and ~8 others, took prefix 16k x 64
    from +20% over uncapped to +10% on an H100 (100.2 and 91.5 against 83.2 µs;
    benchmarks/results/ab_soft_cap_ex2s_h100.json). Within 4e-6 of tanh relative to it over float32's range, a bound
    from ex2's and rcp's documented errors (1.4e-6 measured there); tanh.approx.f32, one MUFU operation, costs nothing
    measurable but is only within 2^-11. NaN stays NaN; +-inf and |x| past ~44 give +-1 (e^{2x} is inf or 0 there)."""
    x = s * cap_scale
    e = gl.exp2(x * (2.0 * LOG2E))
    # rcp.approx: 1 + e >= 1, where it is within 1 ulp; `/` compiles to div.full, range checks this never needs.
    r = gl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + e], dtype=gl.float32, is_pure=True,
                                  pack=1)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0)))
    return gl.where(gl.abs(x) < TANH_SERIES_BELOW, series, 1.0 - 2.0 * r)


@gluon.jit
def _online_softmax(s, m_i, l_i, j, kv_len, offs_n_s, sm_scale, cap_scale, cap_mul, BLOCK: gl.constexpr,
                    USE_CAP: gl.constexpr):
    """Block j's scores -> (P, alpha, running max, running sum), all in base 2."""
    if USE_CAP:
        s = _soft_cap(s, cap_scale)  # capped / cap
        s_mul = cap_mul  # cap x log2(e)
    else:
        s_mul = sm_scale * LOG2E
    # s_mul folded into exp2's argument: one FFMA per score, not FMUL + FADD
    if (j + 1) * BLOCK > kv_len:  # only an item's last block has tokens past its end
        s = gl.where((j * BLOCK + offs_n_s < kv_len)[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * s_mul)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * s_mul - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _item_fields(items, item):
    return (gl.load(items + item * 5), gl.load(items + item * 5 + 1), gl.load(items + item * 5 + 2),
            gl.load(items + item * 5 + 3), gl.load(items + item * 5 + 4))


@gluon.jit
def _load_q(Q, qperm, q_start, q_count, kv_head, offs_d, stride_qb, stride_qh, GROUP: gl.constexpr,
            BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, ld: gl.constexpr):
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
    q_local = rows // GROUP
    row_ok = q_local < q_count
    qid = gl.load(qperm + q_start + q_local, mask=row_ok, other=0).to(gl.int64)
    head = kv_head * GROUP + rows % GROUP
    return gl.load(Q + qid[:, None] * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                   mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)


@gluon.jit
def _store_partials(acc, m_i, l_i, q_count, slot, kv_head, partial_out, partial_lse, stride_pp, stride_ph,
                    stride_lp, GROUP: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                    BLOCK_D: gl.constexpr, o_l: gl.constexpr):
    # kv_len >= 1 for every item, so l_i > 0 on every row.
    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_l))[:, None]
    rows_o = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_l))
    d_o = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, o_l))
    ql_o = rows_o // GROUP
    ok_o = ql_o < q_count
    out_row = (slot + ql_o).to(gl.int64)
    head_o = kv_head * GROUP + rows_o % GROUP
    gl.store(partial_out + out_row[:, None] * stride_pp + head_o[:, None] * stride_ph + d_o[None, :], out,
             mask=ok_o[:, None] & (d_o < HEAD_DIM)[None, :])
    lse = gl.convert_layout(m_i + gl.log2(l_i), gl.SliceLayout(1, o_l))
    gl.store(partial_lse + out_row * stride_lp + head_o, lse, mask=ok_o)


@gluon.jit
def _attend_item(Q, K, V, kv_indices, qperm, items, item, kv_head, partial_out, partial_lse, sm_scale, cap_scale,
                 cap_mul, stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_pp, stride_ph,
                 stride_lp, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK: gl.constexpr, STAGES: gl.constexpr, WGMMA: gl.constexpr, USE_CAP: gl.constexpr,
                 WARPS: gl.constexpr, CONVERT: gl.constexpr):
    dtype: gl.constexpr = Q.dtype.element_ty
    kv_dtype: gl.constexpr = K.dtype.element_ty
    kv_start, kv_len, q_start, q_count, slot = _item_fields(items, item)

    # Gathers and Q in 16-byte vectors (8 elements of q's dtype, 16 of an fp8 cache's); scores S [M, N]
    # and output O [M, D] in the MMA's layouts.
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
    if CONVERT:
        ld_kv: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [WARPS, 1], [1, 0])
    else:
        ld_kv: gl.constexpr = ld
    kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK, BLOCK_D], dtype)
    raw_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK, BLOCK_D], kv_dtype)
    if WGMMA:
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BLOCK, 16])
        o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BLOCK_D, 16])
    else:
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, WARPS], instr_shape=[16, 8])
        o_l: gl.constexpr = s_l
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)

    # The first blocks' copies go out before Q is fetched, so the two loads overlap. The ring holds K/V as
    # stored: an fp8 cache's blocks are half the bytes, converted to q's dtype after they land (_in_dtype).
    k_bufs = gl.allocate_shared_memory(kv_dtype, [STAGES, BLOCK, BLOCK_D], raw_sl)
    v_bufs = gl.allocate_shared_memory(kv_dtype, [STAGES, BLOCK, BLOCK_D], raw_sl)
    if CONVERT and WGMMA:
        # wgmma reads its B operand from shared memory and takes fp8 only with an fp8 A (Q or P, which
        # would be rounded), so a large tile's block is converted once into these, for the warpgroup.
        k_op = gl.allocate_shared_memory(dtype, [BLOCK, BLOCK_D], kv_sl)
        v_op = gl.allocate_shared_memory(dtype, [BLOCK, BLOCK_D], kv_sl)
    offs_n = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, ld_kv))
    offs_d_kv = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, ld_kv))
    offs_d = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, ld))
    for b in gl.static_range(STAGES - 1):
        idx = _load_idx(kv_indices, kv_start, kv_len, b, offs_n, BLOCK)
        _issue_kv(K, V, k_bufs.index(b), v_bufs.index(b), kv_len, b, idx, offs_n, offs_d_kv, kv_head,
                  stride_kn, stride_kh, stride_vn, stride_vh, BLOCK, HEAD_DIM)
        cp.commit_group()
    # Slot indices of the next two blocks to issue: loaded two iterations before they are used.
    idx1 = _load_idx(kv_indices, kv_start, kv_len, STAGES - 1, offs_n, BLOCK)
    idx2 = _load_idx(kv_indices, kv_start, kv_len, STAGES, offs_n, BLOCK)

    q = _load_q(Q, qperm, q_start, q_count, kv_head, offs_d, stride_qb, stride_qh, GROUP, BLOCK_M, HEAD_DIM, ld)
    if WGMMA:
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_D], dtype)
        q_op = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_D], q_sl, q)
    else:
        q_op = gl.convert_layout(q, gl.DotOperandLayout(operand_index=0, parent=s_l, k_width=2))

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_l))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_l))
    acc = gl.zeros([BLOCK_M, BLOCK_D], gl.float32, layout=o_l)
    s_zero = gl.zeros([BLOCK_M, BLOCK], gl.float32, layout=s_l)
    offs_n_s = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, s_l))
    for j in range(gl.cdiv(kv_len, BLOCK)):
        # Block j landed (this thread's copies, then everyone's); the ring slot refilled next was
        # read in iteration j-1, which every warp has finished once past the barrier.
        cp.wait_group(STAGES - 2)
        gl.thread_barrier()
        if WGMMA and not CONVERT:
            fence_async_shared()  # the copies' writes, before wgmma reads them (another proxy)
        nxt = j + STAGES - 1
        _issue_kv(K, V, k_bufs.index(nxt % STAGES), v_bufs.index(nxt % STAGES), kv_len, nxt, idx1, offs_n,
                  offs_d_kv, kv_head, stride_kn, stride_kh, stride_vn, stride_vh, BLOCK, HEAD_DIM)
        cp.commit_group()
        idx1 = idx2
        idx2 = _load_idx(kv_indices, kv_start, kv_len, nxt + 2, offs_n, BLOCK)

        cur = j % STAGES
        if WGMMA:
            if CONVERT:
                # k_op/v_op were last read by block j-1's MMAs, which every warp finished before the
                # barrier above. Both are converted before the scores' wgmma: converting V after its wait,
                # beside the softmax, was 2.4% slower over the benchmark's trees (0.98-1.07x,
                # ab_fp8_hopper_h200.json), and V's stores between the wgmma and its wait crash Triton
                # 3.6's ptxas.
                k_op.store(_in_dtype(k_bufs.index(cur).load(ld_kv), dtype))
                v_op.store(_in_dtype(v_bufs.index(cur).load(ld_kv), dtype))
                fence_async_shared()
                gl.thread_barrier()
                s = warpgroup_mma(q_op, k_op.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            else:
                s = warpgroup_mma(q_op, k_bufs.index(cur).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        else:
            # A small tile's warps each load their own slice of the block into registers: converted there.
            kt = k_bufs.index(cur).permute((1, 0)).load(gl.DotOperandLayout(operand_index=1, parent=s_l, k_width=2))
            s = mma_v2(q_op, _in_dtype(kt, dtype), s_zero)
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, j, kv_len, offs_n_s, sm_scale, cap_scale, cap_mul, BLOCK,
                                             USE_CAP)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_l)
        if WGMMA:
            acc = warpgroup_mma(p_op, v_op if CONVERT else v_bufs.index(cur), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        else:
            vv = v_bufs.index(cur).load(gl.DotOperandLayout(operand_index=1, parent=o_l, k_width=2))
            acc = mma_v2(p_op, _in_dtype(vv, dtype), acc)
    cp.wait_group(0)
    _store_partials(acc, m_i, l_i, q_count, slot, kv_head, partial_out, partial_lse, stride_pp, stride_ph,
                    stride_lp, GROUP, BLOCK_M, HEAD_DIM, BLOCK_D, o_l)


@gluon.jit
def _tree_decode_stage1_hopper(
    Q, K, V, kv_indices, qperm, items, counts, partial_out, partial_lse, sm_scale, cap_scale, cap_mul,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_pp, stride_ph, stride_lp,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, LARGE_M: gl.constexpr,
    SMALL_M: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr, USE_CAP: gl.constexpr, WARPS: gl.constexpr,
    CONVERT: gl.constexpr, SMALL_WGMMA: gl.constexpr,
):
    kv_head = gl.program_id(0)
    item = gl.program_id(1)
    # Counts live on the device, so a captured launch covers whatever a later plan writes.
    num_large = gl.load(counts)
    if item < num_large:
        _attend_item(Q, K, V, kv_indices, qperm, items, item, kv_head, partial_out, partial_lse, sm_scale, cap_scale,
                     cap_mul, stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_pp, stride_ph,
                     stride_lp, GROUP, HEAD_DIM, BLOCK_D, LARGE_M, BLOCK, STAGES, True, USE_CAP, WARPS, CONVERT)
    elif item < num_large + gl.load(counts + 1):
        # On wgmma a small item's rows fill a large tile, the rows past its queries masked.
        SMALL_TILE: gl.constexpr = LARGE_M if SMALL_WGMMA else SMALL_M
        _attend_item(Q, K, V, kv_indices, qperm, items, item, kv_head, partial_out, partial_lse, sm_scale, cap_scale,
                     cap_mul, stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_pp, stride_ph,
                     stride_lp, GROUP, HEAD_DIM, BLOCK_D, SMALL_TILE, BLOCK, STAGES, SMALL_WGMMA, USE_CAP, WARPS, CONVERT)


def _cap_scalars(logit_cap: float, sm_scale: float) -> tuple[float, float]:
    """(sm_scale / cap, cap x log2(e)), which _soft_cap and _online_softmax take the cap by; (0, 0) for no cap, and
    for a cap whose scale is under float32's normal range (a GPU would flush it to 0: tanh(0) = 0 for every score),
    where the capped score is the score within (s x scale)^2 / 3 of itself: run uncapped. tree_decode refuses the
    rest of what float32 cannot hold (``cap_scale_refusal``)."""
    if logit_cap <= 0:
        return 0.0, 0.0
    scale = sm_scale / logit_cap
    if scale < 2.0 ** -126:
        return 0.0, 0.0
    mul = logit_cap * LOG2E.value
    if not (scale <= FP32_MAX and mul <= FP32_MAX):
        raise ValueError(f"logit_cap {logit_cap} with sm_scale {sm_scale}: sm_scale / logit_cap and logit_cap x "
                         f"log2(e) must be finite in float32 (at most {FP32_MAX:.4g})")
    return scale, mul


def launch(q, k_buffer, v_buffer, plan, sm_scale: float, logit_cap: float, small_rows: int, block: int = BLOCK_N,
           stages: int = RING, small_wgmma: bool = SMALL_TILES_ON_WGMMA):
    """One launch over every work item of ``plan`` (``block`` tokens per KV block in a ring of ``stages``:
    the shipped shape unless an experiment asks for another; ``small_wgmma``: small tiles on wgmma, where
    Gluon has no mma.sync, or to compare the two); returns the compiled kernel."""
    po, pl = plan.partial_out, plan.partial_lse
    cap_scale, cap_mul = _cap_scalars(logit_cap, sm_scale)
    return _tree_decode_stage1_hopper[(plan.num_kv_heads, plan.grid_items)](
        q, k_buffer, v_buffer, plan.kv_indices, plan.qperm, plan.items, plan.counts, po, pl, sm_scale,
        cap_scale, cap_mul,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        po.stride(0), po.stride(1), pl.stride(0),
        GROUP=plan.group_size, HEAD_DIM=q.shape[2], BLOCK_D=triton.next_power_of_2(q.shape[2]),
        LARGE_M=plan.large_rows, SMALL_M=small_rows, BLOCK=block,
        STAGES=stages, USE_CAP=cap_scale > 0, WARPS=NUM_WARPS, CONVERT=k_buffer.dtype != q.dtype,
        SMALL_WGMMA=small_wgmma, num_warps=NUM_WARPS)
