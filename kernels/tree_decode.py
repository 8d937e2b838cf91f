"""Tree decode attention in two stages.

Stage 1, one program per (KV head, work item): a work item is a chunk of one node's KV and a tile
of the queries that attend it (TreeDecodePlan). The tile's rows are (query, GQA head) pairs, so one
load of a KV block feeds every query and every query head sharing that KV head through one
tensor-core product. It writes each row's output normalised by its own softmax sum and the base-2
log-sum-exp of its scores. This module's Triton kernel runs everywhere (the CPU interpreter
included); on Hopper with Triton 3.5 or 3.6, ``stage1_hopper``'s Gluon kernel does the same work with a
deeper KV pipeline (``stage1_config`` chooses).

Stage 2, one program per (query, head) on one warp (four when the step has at most one merge per
SM and its batch is at most a captured graph size that fits: ``stage2_shape``): folds the query's
partials along its path in the plan's fixed order with the online-softmax rule. Gathers only: no
atomics, deterministic.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .plan import SMALL_ROWS, TreeDecodePlan
from .reference import FP32_MAX as _FP32_MAX, cap_refusal

logger = logging.getLogger(__name__)
LOG2E = tl.constexpr(1.4426950408889634)  # scores move to base 2 so the kernels use exp2/log2
# Stage 2's launch shape, (partials per load, warps): see _tree_decode_stage2 and launch_stage2.
STAGE2_SHAPE = (8, 1)
STAGE2_SHAPE_FEW_MERGES = (32, 4)


# The soft cap, cap * tanh(x) with x = score x sm_scale / cap, is computed as score x R(x^2) (sm_scale then applied as
# without a cap), the score clamped where |x| reaches TANH_CLAMP (where the rational reaches 1 within its error; tanh
# itself is 1 - 2.7e-7 there), and R(x^2) = tanh(x) / x Eigen's float32 tanh (a [13/6] rational in x; XLA's too): the
# capped score within 7 ulp (4.3e-7) of float64's, evaluated in float32 with and without FMA over caps 0.5-1e8 and
# sm_scales 1e-30-1e30 (Eigen's tanh alone within 6.5 ulp on 2.1M points). One division per score, no exponential, and
# no 1 - ... subtraction: 1 - 2 / (1 + e^{2x}) lost all of tanh's digits as x -> 0 (at a cap of 1e8 every score became
# 0), and with a series below |x| = 0.2 and a division by the cap it took three MUFU operations per score beside the
# softmax's exp2; capped 16k x 64 ran 35% slower than uncapped on an H100
# (benchmarks/results/kernels_h100_logit_cap.md). A cap too large for float32's sm_scale / cap is no cap: the scale is
# 0 and R(0) = A1 / B0 = 1 - 1.3e-7. The Hopper kernel computes tanh otherwise (stage1_hopper._soft_cap: the same
# function within 4e-6, cheaper where its large tiles are bound by arithmetic per score).
TANH_CLAMP = tl.constexpr(7.90531110763549805)
TANH_A1 = tl.constexpr(4.89352455891786e-03)
TANH_A3 = tl.constexpr(6.37261928875436e-04)
TANH_A5 = tl.constexpr(1.48572235717979e-05)
TANH_A7 = tl.constexpr(5.12229709037114e-08)
TANH_A9 = tl.constexpr(-8.60467152213735e-11)
TANH_A11 = tl.constexpr(2.00018790482477e-13)
TANH_A13 = tl.constexpr(-2.76076847742355e-16)
TANH_B0 = tl.constexpr(4.89352518554385e-03)
TANH_B2 = tl.constexpr(2.26843463243900e-03)
TANH_B4 = tl.constexpr(1.18534705686654e-04)
TANH_B6 = tl.constexpr(1.19825839466702e-06)
TANH_CONSTANTS = ("TANH_CLAMP", "TANH_A1", "TANH_A3", "TANH_A5", "TANH_A7", "TANH_A9", "TANH_A11", "TANH_A13",
                  "TANH_B0", "TANH_B2", "TANH_B4", "TANH_B6")


def soft_cap_scalars(logit_cap: float, sm_scale: float) -> tuple[float, float]:
    """_soft_cap's scalars for SGLang's ``logit_cap`` (0: none): sm_scale / cap, which takes a raw score q.k to tanh's
    argument, and cap x TANH_CLAMP / sm_scale, the raw score where the clamp starts. Computed in float64 and kept
    within float32's normal range, which the kernels take them in: a scale under 2^-126 is 0 (no cap, but for raw
    scores near float32's largest: R(0) = 1 - 1.3e-7), where float32 would make it a subnormal that a GPU flushes to 0
    anyway and the CPU interpreter would take in float64; the clamp is then at most float32's largest. A scale past
    float32's range is refused (tree_decode refuses it first): the clamp would be subnormal."""
    if logit_cap <= 0:
        return 0.0, 0.0
    scale = sm_scale / logit_cap
    if not scale <= _FP32_MAX:
        raise cap_scale_refusal(logit_cap, sm_scale)
    return (scale if scale >= 2.0 ** -126 else 0.0), min(logit_cap * TANH_CLAMP.value / sm_scale, _FP32_MAX)


def cap_scale_refusal(logit_cap: float, sm_scale: float) -> ValueError | None:
    """The error for a cap the kernels cannot take with this ``sm_scale`` (None where they can): sm_scale / cap past
    float32's range, or a cap x log2(e) past it (the Hopper kernel's capped scores in base 2) where the cap acts
    (sm_scale / cap not under float32's normal range, where a cap is no cap)."""
    if logit_cap <= 0:
        return None
    scale = sm_scale / logit_cap
    if scale <= _FP32_MAX and (logit_cap * LOG2E.value <= _FP32_MAX or scale < 2.0 ** -126):
        return None
    return ValueError(f"logit_cap {logit_cap} with sm_scale {sm_scale}: the kernels take sm_scale / logit_cap and "
                      f"logit_cap x log2(e) in float32, at most {_FP32_MAX:.4g}")


@triton.jit
def _soft_cap(s, cap_scale, cap_clamp):
    """SGLang's cap on a raw score s = q.k, divided by sm_scale again: cap * tanh(s sm_scale / cap) / sm_scale, which
    is s R(x^2) with x = s sm_scale / cap, s clamped where tanh is 1 (see TANH_CLAMP; scalars from
    soft_cap_scalars). sm_scale and the move to base 2 then stay one multiply per score, as without a cap."""
    # NaN propagates (max.NaN): by default min/max return the other operand, and a NaN score (an inf in K) became
    # -cap, a finite score, where the uncapped path and the reference give NaN.
    s = tl.minimum(tl.maximum(s, -cap_clamp, propagate_nan=tl.PropagateNan.ALL), cap_clamp,
                   propagate_nan=tl.PropagateNan.ALL)
    x2 = (s * cap_scale) * (s * cap_scale)
    num = TANH_A1 + x2 * (TANH_A3 + x2 * (TANH_A5 + x2 * (TANH_A7 + x2 * (TANH_A9 + x2 * (TANH_A11 + x2 * TANH_A13)))))
    return s * (num / (TANH_B0 + x2 * (TANH_B2 + x2 * (TANH_B4 + x2 * TANH_B6))))


@triton.jit
def _attend_item(
    Q, K, V, kv_indices, qperm, items, item, kv_head, partial_out, partial_lse,
    sm_scale, cap_scale, cap_clamp,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_pp, stride_ph, stride_lp,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_CAP: tl.constexpr, IEEE: tl.constexpr,
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
    qk_scale = sm_scale * LOG2E  # one multiply per score scales and moves it to base 2
    for start in range(0, kv_len, BLOCK_N):
        n_ok = start + offs_n < kv_len
        kv_slot = tl.load(kv_indices + kv_start + start + offs_n, mask=n_ok, other=0).to(tl.int64)
        # An fp8 KV cache is read as stored and computed in q's dtype (a no-op when they are the same);
        # its K scale is in sm_scale and its V scale in stage 2 (tree_decode).
        k = tl.load(K + kv_slot[:, None] * stride_kn + kv_head * stride_kh + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(Q.dtype.element_ty)
        # fp32 inputs would run as TF32 on tensor cores by default; IEEE keeps fp32 exact.
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if USE_CAP:
            s = _soft_cap(s, cap_scale, cap_clamp)
        s = s * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_slot[:, None] * stride_vn + kv_head * stride_vh + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(Q.dtype.element_ty)
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


@triton.jit
def _tree_decode_stage1(
    Q, K, V, kv_indices, qperm, items, counts, partial_out, partial_lse,
    sm_scale, cap_scale, cap_clamp,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_pp, stride_ph, stride_lp,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, LARGE_M: tl.constexpr,
    SMALL_M: tl.constexpr, LARGE_N: tl.constexpr, SMALL_N: tl.constexpr, USE_CAP: tl.constexpr,
    IEEE: tl.constexpr, TILES: tl.constexpr,
):
    # TILES 0: one launch serves both tile sizes (a separate launch for the small tiles waits for
    # the large ones to drain); but then the kernel's shared memory is sized by the larger branch,
    # which limits how many small-tile programs an SM keeps resident. TILES 1 / 2: large / small
    # tiles only, for two launches each sized to its own tiles.
    kv_head = tl.program_id(0)
    pid = tl.program_id(1)
    # Counts live on the device, so a captured launch covers whatever a later plan writes.
    num_large = tl.load(counts)
    if TILES == 2:
        item = num_large + pid
        is_large = False
        in_range = pid < tl.load(counts + 1)
    else:
        item = pid
        is_large = pid < num_large
        in_range = is_large if TILES == 1 else pid < num_large + tl.load(counts + 1)
    if in_range:
        if is_large:
            _attend_item(Q, K, V, kv_indices, qperm, items, item, kv_head, partial_out, partial_lse,
                         sm_scale, cap_scale, cap_clamp, stride_qb, stride_qh, stride_kn, stride_kh, stride_vn,
                         stride_vh, stride_pp, stride_ph, stride_lp, GROUP, HEAD_DIM, BLOCK_D, LARGE_M, LARGE_N,
                         USE_CAP, IEEE)
        elif TILES != 1:
            _attend_item(Q, K, V, kv_indices, qperm, items, item, kv_head, partial_out, partial_lse,
                         sm_scale, cap_scale, cap_clamp, stride_qb, stride_qh, stride_kn, stride_kh, stride_vn,
                         stride_vh, stride_pp, stride_ph, stride_lp, GROUP, HEAD_DIM, BLOCK_D, SMALL_M, SMALL_N,
                         USE_CAP, IEEE)


@triton.jit
def _tree_decode_stage2(
    partial_out, partial_lse, merge_indptr, merge_slots, counts, Out, v_scale,
    stride_pp, stride_ph, stride_lp, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, SCALE_V: tl.constexpr,
):
    # One program per (query, head), on one warp (four on steps of few merges: stage2_shape). BLOCK_P
    # partials are loaded at once, so a query's merge costs a few memory round trips rather than one
    # per partial along its path. A merge is a short chain of dependent loads, so the step's merge
    # time goes with how many programs an SM holds: at most 32, which one warp reaches at <= 64
    # registers. 8 partials on 1 warp take 64 registers for sm_90 (32 programs per SM); 16 on 2 warps,
    # the shape before, 71 (14 programs). On the H200 the whole step was 1-6% faster on every benchmark
    # tree. 4 per load tied; 2, 16 (107 registers) and 32 were slower overall (32 won only where
    # queries merge more than 16 partials: stage2_shape); loading the next block before folding this
    # one (118 registers) gained nothing (benchmarks/results/ab_stage2_h200.json).
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
    if SCALE_V:  # an fp8 KV cache's V scale (compiled out at 1.0, so other caches merge as before)
        res = res * v_scale
    # b in int64: B x Hq x D may pass 2^31 elements (stage 1 widens its rows the same way)
    tl.store(Out + b.to(tl.int64) * stride_ob + head * stride_oh + offs_d, res.to(Out.dtype.element_ty), mask=d_ok)


@dataclass(frozen=True)
class Stage1Config:
    block_n_large: int  # KV tokens per block for large tiles
    block_n_small: int  # KV tokens per block for small tiles
    num_warps: int
    num_stages: int
    separate_launches: bool = False  # large and small tiles in two launches (see _tree_decode_stage1)
    kernel: str = "triton"  # "triton": _tree_decode_stage1 here; "hopper": stage1_hopper's Gluon kernel

    def __post_init__(self):
        # A misspelt name would otherwise run (and be benchmarked as) the Triton kernel without a word.
        if self.kernel not in ("triton", "hopper"):
            raise ValueError(f"Stage1Config.kernel {self.kernel!r}: 'triton' or 'hopper'")
        for name in ("block_n_large", "block_n_small"):  # tl.arange's power of two, tl.dot's least dim on a GPU
            if (n := getattr(self, name)) < 16 or n & (n - 1):
                raise ValueError(f"Stage1Config.{name} {n}: a power of two >= 16")


HOPPER_CONFIG = Stage1Config(32, 32, 4, 2, kernel="hopper")  # stage1_hopper's fixed shape, for reference


def padded_head_dim(head_dim: int) -> int:
    """The row width the Triton stage-1 kernel loads (BLOCK_D, masked past ``head_dim``): a power of two for
    tl.arange, and at least 16, tl.dot's least inner dim for 16-bit types on NVIDIA GPUs (QK^T's is BLOCK_D)."""
    return max(16, triton.next_power_of_2(head_dim))


def stage1_config(head_dim: int, large_rows: int, dtype: torch.dtype | None = None,
                  device: torch.device | None = None, kv_dtype: torch.dtype | None = None) -> Stage1Config:
    """Which stage-1 kernel runs, with its KV block lengths, warps and pipeline depth.

    On Hopper with Triton 3.5 or 3.6, for float16/bfloat16 (over a KV cache in q's dtype or in fp8), head_dim
    64/80/96/128/256 and the default 64-row large tiles: the Gluon kernel of ``stage1_hopper`` (0.83-0.96x
    the Triton kernel's step time on every benchmark tree, `benchmarks/results/ab_hopper_stage1_h200.json`;
    0.63-0.69x at head_dim 256, `ab_head_dim_256_h200.json`). Elsewhere (CPU interpreter, other GPUs or
    Triton versions, float32, other head dims) the Triton kernel of this module, in its shape measured
    on the H200 (bf16, head_dim 128, L2 flushed, 2026-11-29; the planner at 4 programs per
    SM; `benchmarks/results/sweep_stage1_h200.md`): 32-token blocks for both tile sizes in one
    launch, 3 stages, was the best of 72 configurations over the benchmark's trees (geomean 0.84x the
    time of the earlier 64/32-token default). Mixing 64-token blocks for the large tiles with 32 for
    the small ones sized the kernel's shared memory by the large branch (80 KB against 48), and the
    latency-bound small-tile programs lost occupancy (no sharing 64 x 2k: 205 us against 152). Two
    launches (each sized to its tiles) lose more to the second launch waiting for the first to
    drain than they win back (geomean 0.99). Blocks shrink with head_dim so K and V, three stages
    deep, fit in shared memory. 128-row tiles take 8 warps (row 6 of the experiments); 64-row tiles 4,
    also at head_dim 256 (200 registers, no spills), where 8 warps took 1.27-1.34x the time (prefix 4k
    x 64: 192 against 151 us, no sharing 64 x 2k: 1049 against 781;
    `benchmarks/results/sweep_stage1_d256_h200.md`).
    """
    if device is not None and dtype is not None and _hopper_unsupported(device, dtype, head_dim, large_rows,
                                                                        kv_dtype) is None:
        return HOPPER_CONFIG
    # by the padded width the kernel loads: head_dim 192 moves 256-wide rows
    block_n = 32 // max(1, padded_head_dim(head_dim) // 128)
    return Stage1Config(block_n, block_n, 8 if large_rows > 64 else 4, 3)


# q's dtypes the kernels compute in (fp32 accumulation; the Triton loop's running max is fp32, so fp64 would not
# compile). KV caches are read in their own dtype: q's, or one of SGLang's fp8 formats (--kv-cache-dtype fp8_e4m3 /
# fp8_e5m2).
Q_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@functools.cache
def interpreted() -> bool:
    """Whether the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 when this module was imported (Triton
    decides as it decorates a kernel, so setting the variable later changes nothing; cached: tree_decode asks on
    every bf16 call, and the import took ~1.5 us a layer)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_tree_decode_stage2, InterpretedFunction)


def _scalar(name: str, value) -> float:
    """A Python float for a kernel's scalar argument: Triton's launcher takes no numpy scalar, and a tensor would be
    passed as a pointer (reading it on the host would synchronise, which the per-layer path must not)."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python number, not a tensor (reading it would synchronise with the device)")
    return float(value)


def reads_kv_dtype(kv_dtype: torch.dtype, q_dtype: torch.dtype) -> bool:
    """Whether the kernels read a KV cache of ``kv_dtype`` under q in ``q_dtype``: q's own, or an fp8 one."""
    return kv_dtype == q_dtype or kv_dtype in FP8_KV_DTYPES


@functools.lru_cache(maxsize=None)
def kv_dtype_unsupported_on(kv_dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the kernels cannot read a ``kv_dtype`` cache on ``device`` (None if they can). Triton compiles
    float8_e4m3fn (its fp8e4nv) only for sm_89 and newer; before, the first launch would fail to compile."""
    if kv_dtype != torch.float8_e4m3fn or device.type != "cuda":
        return None
    if torch.version.hip is not None:  # capability there is not NVIDIA's (MI200 says (9, 0), without fp8)
        return "a float8_e4m3fn KV cache on a ROCm device (deft's fp8 path is written and measured for NVIDIA's)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= (8, 9):
        return None
    return (f"a float8_e4m3fn KV cache on {torch.cuda.get_device_name(device)} (sm_{major}{minor}): Triton reads "
            "that format on sm_89 and newer only (Ada, Hopper); fp8_e5m2 or the model's dtype work here")


@functools.lru_cache(maxsize=None)
def _hopper_unsupported(device: torch.device, dtype: torch.dtype, head_dim: int, large_rows: int,
                        kv_dtype: torch.dtype | None = None) -> str | None:
    """Why the Hopper kernel cannot serve this configuration (None if it can); logged once per configuration.
    ``dtype`` is q's, ``kv_dtype`` the KV cache's when it differs (fp8)."""
    if device.type != "cuda":
        return "not a CUDA device"  # never imports Gluon off the GPU
    try:
        from . import stage1_hopper
    except ImportError as e:  # a Triton without Gluon, or with another Gluon API
        reason = f"Gluon unavailable ({e})"
    else:
        reason = stage1_hopper.unsupported_reason(device, dtype, head_dim, large_rows, kv_dtype)
    which = "Gluon kernel for Hopper" if reason is None else f"Triton kernel: the Hopper kernel does not serve {reason}"
    cache = "" if kv_dtype in (None, dtype) else f" over a {kv_dtype} KV cache"
    logger.info("tree decode stage 1 on %s, %s%s, head_dim %d, %d-row large tiles: %s", device, dtype, cache,
                head_dim, large_rows, which)
    return reason


def tree_decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, plan: TreeDecodePlan,
                sm_scale: float, logit_cap: float = 0.0, out: torch.Tensor | None = None,
                config: Stage1Config | None = None, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Attention of every query over its KV-tree path. q [B, Hq, D]; k/v_buffer [S, Hkv, D].

    K and V are in q's dtype or, for an fp8 KV cache, in float8_e4m3fn / float8_e5m2, standing for their
    values times ``k_scale`` / ``v_scale`` (SGLang's per-layer scales; 1.0 without a calibrated checkpoint).
    ``config`` picks stage 1's kernel and shape; by default ``stage1_config`` for the dtypes and device.
    Never synchronises with the host: the plan's device tensors carry all the data-dependent sizes.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [queries, heads, head_dim] (SGLang's [B, heads x head_dim] viewed per head); "
                         f"got shape {tuple(q.shape)}")
    B, Hq, D = q.shape
    if q.dtype not in Q_DTYPES:
        raise ValueError(f"q in {q.dtype}: the kernels compute in {', '.join(map(str, Q_DTYPES))}")
    if not type(sm_scale) is type(logit_cap) is type(k_scale) is type(v_scale) is float:  # (per layer: the cheap test)
        sm_scale, logit_cap = _scalar("sm_scale", sm_scale), _scalar("logit_cap", logit_cap)
        k_scale, v_scale = _scalar("k_scale", k_scale), _scalar("v_scale", v_scale)
    if not logit_cap <= _FP32_MAX:
        raise cap_refusal(logit_cap)
    # (also NaN) The kernels scale scores in fp32, and the Hopper one masks past-the-end tokens to -inf before: a
    # scale <= 0 turned those into NaN or +inf, one past fp32's range failed to compile.
    # The kernels multiply the scale by log2(e) in float32: past _FP32_MAX / log2(e) that product overflowed.
    if not _FP32_TINY <= sm_scale * k_scale <= _MAX_SCALE or not _FP32_TINY <= v_scale <= _FP32_MAX:
        raise ValueError(f"sm_scale {sm_scale} (x k_scale {k_scale}) and v_scale {v_scale}: positive and normal in "
                         f"float32 ({_FP32_TINY:.4g} to {_FP32_MAX:.4g}; the scale times log2(e) too, so at most "
                         f"{_MAX_SCALE:.4g})")
    refusal = cap_scale_refusal(logit_cap, sm_scale * k_scale)
    if refusal is not None:
        raise refusal
    # Stage 1 reads q's rows of the buffers' queries and stage 2 writes those rows of out; rows past them
    # (a CUDA graph's padding up to the plan's capacity) are left as they are in a given out, zeros in one
    # made here. The buffers' queries, not the plan's: after reuse= the buffers hold a later plan's step,
    # which is what the kernels read.
    n = plan.buffered_queries
    if n is None:
        raise ValueError("the plan's buffers hold no step: the last plan written into them failed half-way or was "
                         "refused (past their capacity); plan the "
                         "step again (reuse= these buffers)")
    if (Hq, D) != (plan.num_qo_heads, plan.head_dim) or not n <= B <= plan.qperm.numel():
        raise ValueError(f"q has shape {tuple(q.shape)} but the plan's buffers hold a step of {n} queries (at most "
                         f"{plan.qperm.numel()} rows), {plan.num_qo_heads} heads of dim {plan.head_dim}")
    if n > plan.grid_queries:
        raise ValueError(f"the plan's buffers hold a step of {n} queries, but this plan launches stage 2 for "
                         f"{plan.grid_queries}: pass the plan that wrote them (reuse= returns it)")
    if k_buffer.shape[1:] != (plan.num_kv_heads, D) or v_buffer.shape[1:] != (plan.num_kv_heads, D):
        raise ValueError(f"k/v buffers {tuple(k_buffer.shape)}/{tuple(v_buffer.shape)} do not match the plan's "
                         f"{plan.num_kv_heads} KV heads of dim {D}")
    if k_buffer.shape[0] != v_buffer.shape[0]:  # one slot id indexes both: V would be read past its end
        raise ValueError(f"k/v buffers of {k_buffer.shape[0]} and {v_buffer.shape[0]} slots: a KV slot indexes both")
    if (top := plan.buffered_max_kv_slot) is not None and top >= k_buffer.shape[0]:
        raise ValueError(f"the plan's KVTree.kv_indices holds slot {top}, outside the KV buffers' "
                         f"{k_buffer.shape[0]} slots")
    if k_buffer.dtype != v_buffer.dtype or not reads_kv_dtype(k_buffer.dtype, q.dtype):
        raise ValueError(f"k/v buffers in {k_buffer.dtype}/{v_buffer.dtype} for q in {q.dtype}: K and V need one dtype, "
                         f"q's or an fp8 one ({', '.join(map(str, FP8_KV_DTYPES))})")
    # (the dtype first: other caches skip the cached lookup on this per-layer path)
    if k_buffer.dtype == torch.float8_e4m3fn and (reason := kv_dtype_unsupported_on(k_buffer.dtype, k_buffer.device)):
        raise ValueError(f"tree_decode cannot read {reason}")
    if (k_scale, v_scale) != (1.0, 1.0) and k_buffer.dtype not in FP8_KV_DTYPES:
        raise ValueError(f"k_scale {k_scale} / v_scale {v_scale} apply to an fp8 KV cache, not to {k_buffer.dtype}")
    if q.stride(-1) != 1 or k_buffer.stride(-1) != 1 or v_buffer.stride(-1) != 1:
        raise ValueError("q, k_buffer and v_buffer need a contiguous last dimension")
    device = plan.meta.device
    if q.device != device or k_buffer.device != v_buffer.device or k_buffer.device != device:
        raise ValueError(f"q on {q.device}, k/v buffers on {k_buffer.device}/{v_buffer.device}, the plan on {device}")
    if reason := interpreter_refusal(device, q.dtype):
        raise ValueError(reason)
    if out is None:
        # Stage 2 writes the step's rows only: rows past them (a smaller step in a graph's buffers) are zeros.
        out = torch.empty_like(q) if n == B else torch.zeros_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1 or out.device != device:
        raise ValueError(f"out must be like q, {tuple(q.shape)} {q.dtype} with a contiguous last dimension on "
                         f"{device}; got {tuple(out.shape)} {out.dtype}, strides {out.stride()}, on {out.device}")
    elif not out.is_contiguous() and not _elements_apart(out):  # e.g. expanded: rows would overwrite each other
        raise ValueError(f"out's strides {out.stride()} for shape {tuple(out.shape)} may let (query, head) rows share "
                         "memory: each needs its own (pass a contiguous out, or a slice of one)")
    _check_head_offsets(q, k_buffer, v_buffer, out)
    cfg = config or stage1_config(D, plan.large_rows, q.dtype, k_buffer.device, k_buffer.dtype)
    # Triton launches on the current device and its stream: tensors on another GPU were read from this one
    off_current = device.type == "cuda" and device.index != _current_device()
    with torch.cuda.device(device) if off_current else contextlib.nullcontext():
        launch_stage1(q, k_buffer, v_buffer, plan, sm_scale * k_scale, logit_cap, cfg)
        launch_stage2(plan, out, v_scale)
    return out


def _elements_apart(t: torch.Tensor) -> bool:
    """Whether no two elements of ``t`` can share memory, by a layout test that holds for every slice of a contiguous
    tensor: with the dims of size > 1 taken by increasing stride, each stride must pass the farthest element the
    smaller dims reach. torch's own overlap check proves only simple cases (a stride of 0) and cannot tell a row that
    starts inside the one before it. A layout that interleaves its dims fails this test even where it would not
    overlap; tree_decode's callers pass none."""
    reach = 0
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride <= reach:
            return False
        reach += (size - 1) * stride
    return True


_current_device = torch.cuda.current_device  # (the GPU tests make another read as current)
_FP32_TINY = torch.finfo(torch.float32).tiny  # the least normal float32
_MAX_SCALE = _FP32_MAX / 1.4426950408889634  # the largest sm_scale whose product with log2(e) stays finite
INTERPRETER_BF16 = "Triton's interpreter computes a bf16 tl.dot wrongly; use float16 or float32 on a CPU"


def interpreter_problem(dtype: torch.dtype) -> str | None:
    """Why the kernels cannot compute in ``dtype`` on the CPU (None if they can): Triton runs them there only in its
    interpreter, whose bf16 ``tl.dot`` is wrong (off by orders of magnitude)."""
    if not interpreted():
        return ("Triton runs its kernels on a CPU only in its interpreter: set TRITON_INTERPRET=1 before importing "
                "sglang_deft (slow: for tests)")
    if dtype == torch.bfloat16:
        return INTERPRETER_BF16
    return None


def interpreter_refusal(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why tree_decode refuses ``dtype`` tensors on ``device`` (None: it does not): on the CPU, interpreter_problem;
    on a GPU under TRITON_INTERPRET=1 the interpreter runs the kernels too (on host copies), its bf16 tl.dot as wrong."""
    if device.type == "cpu":
        reason = interpreter_problem(dtype)
        return f"tree_decode on CPU tensors: {reason}" if reason else None
    if dtype == torch.bfloat16 and interpreted():
        return (f"tree_decode on {device} tensors under TRITON_INTERPRET=1, which runs the kernels in Triton's CPU "
                "interpreter: its bf16 tl.dot is wrong. Unset TRITON_INTERPRET (before importing sglang_deft) to run "
                "them on the GPU, or use float16 or float32")
    return None


def _check_head_offsets(*tensors: torch.Tensor) -> None:
    """q, k_buffer, v_buffer, out. The kernels add a row's offset in int64 but a head's (head index x head
    stride) in int32, which is exact for SGLang's [S, H, D] buffers (a head stride of D); a head-major view
    of a buffer past 2^31 elements would wrap it and read another head's memory, so it is refused."""
    for name, t in zip(("q", "k_buffer", "v_buffer", "out"), tensors):
        if (t.shape[1] - 1) * t.stride(1) >= 1 << 31:
            raise ValueError(f"{name} has head stride {t.stride(1)} over {t.shape[1]} heads: the kernels need "
                             "(heads - 1) x head stride < 2^31 (make it contiguous, [rows, heads, dim])")


# Stage-1 shapes (device, q and KV dtypes, head dim, large rows, config) whose pipeline did not fit the GPU's shared
# memory: launched with one stage from then on (launch_stage1).
_SHALLOW_STAGES: dict[tuple, int] = {}


def launch_stage1(q, k_buffer, v_buffer, plan: TreeDecodePlan, sm_scale: float, logit_cap: float,
                  cfg: Stage1Config):
    """Partial attention of every work item into the plan's partial buffers; returns Triton's
    compiled kernel of the (last) launch (its metadata tells shared memory and registers), or None
    when nothing ran."""
    if not plan.grid_items:
        return None
    if cfg.kernel == "hopper":
        reason = ("K and V in different dtypes" if k_buffer.dtype != v_buffer.dtype
                  else _hopper_unsupported(k_buffer.device, q.dtype, q.shape[2], plan.large_rows, k_buffer.dtype))
        if reason is not None:
            raise ValueError(f"the Hopper stage-1 kernel does not serve {reason}")
        if cfg != HOPPER_CONFIG:
            raise ValueError(f"the Hopper stage-1 kernel has one shape, {HOPPER_CONFIG}; got {cfg}")
        from . import stage1_hopper
        return stage1_hopper.launch(q, k_buffer, v_buffer, plan, sm_scale, logit_cap, SMALL_ROWS)
    po, pl = plan.partial_out, plan.partial_lse
    D = q.shape[2]
    compiled = None
    shape = (q.device, q.dtype, k_buffer.dtype, D, plan.large_rows, cfg)
    stages = _SHALLOW_STAGES.get(shape, cfg.num_stages)
    for tiles in ((1, 2) if cfg.separate_launches else (0,)):
        while True:
            try:
                compiled = _tree_decode_stage1[(plan.num_kv_heads, plan.grid_items)](
                    q, k_buffer, v_buffer, plan.kv_indices, plan.qperm, plan.items, plan.counts, po, pl,
                    sm_scale, *soft_cap_scalars(logit_cap, sm_scale), q.stride(0), q.stride(1), k_buffer.stride(0),
                    k_buffer.stride(1),
                    v_buffer.stride(0), v_buffer.stride(1), po.stride(0), po.stride(1), pl.stride(0),
                    GROUP=plan.group_size, HEAD_DIM=D, BLOCK_D=padded_head_dim(D), LARGE_M=plan.large_rows,
                    SMALL_M=SMALL_ROWS, LARGE_N=cfg.block_n_large, SMALL_N=cfg.block_n_small, USE_CAP=logit_cap > 0,
                    IEEE=q.dtype == torch.float32, TILES=tiles, num_warps=cfg.num_warps, num_stages=stages)
                break
            except OutOfResources as e:
                # The shape is chosen from the head dim and tiles, not from the GPU (measured on the H200). Compiled
                # for sm_80/86/89 (benchmarks/results/stage1_shared_memory_triton36.md) every 16-bit and fp8 shape
                # fits, and in fp32 head_dim 256 needs 100.3 KB, 1.3 KB past the 99 KB of sm_86/sm_89; with one stage
                # (84.2 KB) each block is loaded as it is used, without the next block's loads in flight: the same
                # arithmetic, and bitwise the same output on an H100 (test_one_pipeline_stage_gives_the_same_output).
                # Once per shape and process: Triton would raise again at every launch.
                if stages > 1:
                    logger.warning("deft's Triton stage-1 kernel (%s) for q in %s, head_dim %d needs %d of %s, more "
                                   "than this GPU's %d: it runs with one pipeline stage instead of %d (the same "
                                   "output, slower)", cfg, q.dtype, D, e.required, e.name, e.limit, stages)
                    stages = _SHALLOW_STAGES[shape] = 1
                    continue
                raise RuntimeError(f"deft's Triton stage-1 kernel ({cfg}) for q in {q.dtype}, head_dim {D} and "
                                   f"{plan.large_rows}-row tiles needs {e.required} of {e.name}, more than this GPU's "
                                   f"{e.limit} even with one pipeline stage: serve the model in float16/bfloat16, or "
                                   "on a GPU with more shared memory per block") from e
    return compiled


def stage2_shape(plan: TreeDecodePlan) -> tuple[int, int]:
    """(partials per load, warps) of stage 2's programs for ``plan``.

    One-warp programs with 8 partials per load suit steps with more merges than SMs: 32 of them share
    an SM. A step with at most one (query, head) merge per SM (a single request: 32 merges on 132
    SMs) has SMs to spare, and its queries merge many partials each (1 x 32k tokens: 66, nine
    dependent loads at 8 per load); there 32 partials per load on 4 warps made the step 5% faster
    (52.1 and 51.8 against 54.6 us in two runs, H200, benchmarks/results/ab_stage2_low_concurrency_h200.json).
    The two shapes round differently (not bitwise equal; both within the dtype's tolerance). The rule
    reads only the launch grid, which a captured graph fixes at its batch size, against a threshold that
    is itself a captured batch size (``plan.few_merges_max_queries``), so a graph replay and an eager
    step of the same batch merge bitwise alike."""
    if plan.grid_queries <= plan.few_merges_max_queries:
        return STAGE2_SHAPE_FEW_MERGES
    return STAGE2_SHAPE


def launch_stage2(plan: TreeDecodePlan, out: torch.Tensor, v_scale: float = 1.0) -> None:
    """Merge every query's partials into ``out`` (times ``v_scale``: an fp8 KV cache's V scale)."""
    if not plan.grid_queries:
        return
    po, pl = plan.partial_out, plan.partial_lse
    D = out.shape[2]
    block_p, warps = stage2_shape(plan)
    _tree_decode_stage2[(plan.grid_queries, out.shape[1])](
        po, pl, plan.merge_indptr, plan.merge_slots, plan.counts, out, v_scale,
        po.stride(0), po.stride(1), pl.stride(0), out.stride(0), out.stride(1),
        HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_P=block_p, SCALE_V=v_scale != 1.0, num_warps=warps)
