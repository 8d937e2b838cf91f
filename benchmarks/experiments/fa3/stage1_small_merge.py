"""Experiment (session 19): stage1_small_queue.py that also does stage 2's work, so the step is two
launches instead of three.

As there, each program takes (small item, kv head) units from a ticket counter and runs main's
small-tile code on them beside stage1_fa3co.py's CTAs; it records the units it ran. Then
`griddepcontrol.wait` (fa3co's partials are complete and visible), and for each unit it ran, it merges
the partials of the unit's queries for the unit's KV head (GROUP heads at once, as a [partials,
GROUP * D] tile) straight into the output. A unit's own tail partial was stored by this program, so no
other program's progress is waited for. Serves trees whose every query has exactly one small item (its
private tail, as in the prefix trees): a query with none is not merged (its output keeps what it held)
and one with two is merged twice. Partials are loaded with .cg (L2): other SMs wrote them."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
from bench_kernels import _kernels  # noqa: E402

H = importlib.import_module(_kernels().__name__ + ".stage1_hopper")
_attend_item = H._attend_item
MAX_UNITS = 64  # units one program may run (it records them to merge after the wait)
MERGE_BLOCK_P = 8  # partials per load in the merge ([8, GROUP * D] of outputs and of their lse: 64 registers)


@gluon.jit
def _merge_kv_head(partial_out, partial_lse, merge_indptr, merge_slots, Out, qid, kv_head,
                   stride_pp, stride_ph, stride_lp, stride_ob, stride_oh,
                   GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_P: gl.constexpr, WARPS: gl.constexpr):
    COLS: gl.constexpr = GROUP * HEAD_DIM
    lay: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [1, WARPS], [1, 0])
    offs_p = gl.arange(0, BLOCK_P, layout=gl.SliceLayout(1, lay))
    cols = gl.arange(0, COLS, layout=gl.SliceLayout(0, lay))
    head = kv_head * GROUP + cols // HEAD_DIM
    d = cols % HEAD_DIM
    lo = gl.load(merge_indptr + qid)
    hi = gl.load(merge_indptr + qid + 1)
    m = gl.full([COLS], float("-inf"), gl.float32, layout=gl.SliceLayout(0, lay))
    den = gl.zeros([COLS], gl.float32, layout=gl.SliceLayout(0, lay))
    acc = gl.zeros([COLS], gl.float32, layout=gl.SliceLayout(0, lay))
    for start in range(lo, hi, BLOCK_P):
        p_ok = start + offs_p < hi
        slot = gl.load(merge_slots + start + offs_p, mask=p_ok, other=0).to(gl.int64)
        ok = p_ok[:, None] & (cols < COLS)[None, :]
        lse = gl.load(partial_lse + slot[:, None] * stride_lp + head[None, :], mask=ok, other=float("-inf"),
                      cache_modifier=".cg")
        o = gl.load(partial_out + slot[:, None] * stride_pp + head[None, :] * stride_ph + d[None, :], mask=ok,
                    other=0.0, cache_modifier=".cg")
        m_new = gl.maximum(m, gl.max(lse, 0))
        w = gl.exp2(lse - m_new[None, :])
        alpha = gl.exp2(m - m_new)
        acc = acc * alpha + gl.sum(o * w, 0)
        den = den * alpha + gl.sum(w, 0)
        m = m_new
    res = acc / gl.where(den > 0, den, 1.0)
    gl.store(Out + qid.to(gl.int64) * stride_ob + head * stride_oh + d, res.to(Out.dtype.element_ty))


@gluon.jit
def _tree_decode_stage1_small_merge(
    Q, K, V, kv_indices, qperm, items, counts, queue, done, partial_out, partial_lse, merge_indptr, merge_slots,
    Out, sm_scale, logit_cap, stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_pp,
    stride_ph, stride_lp, stride_ob, stride_oh,
    NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, SMALL_M: gl.constexpr,
    BLOCK: gl.constexpr, STAGES: gl.constexpr, USE_CAP: gl.constexpr, WARPS: gl.constexpr,
    MAXU: gl.constexpr, MERGE_P: gl.constexpr,
):
    num_large = gl.load(counts)
    total = gl.load(counts + 1) * NUM_KV_HEADS
    mine = done + gl.program_id(0) * MAXU
    n = 0
    u = gl.atomic_add(queue, 1)
    while u < total:
        _attend_item(Q, K, V, kv_indices, qperm, items, num_large + u // NUM_KV_HEADS, u % NUM_KV_HEADS,
                     partial_out, partial_lse, sm_scale, logit_cap, stride_qb, stride_qh, stride_kn, stride_kh,
                     stride_vn, stride_vh, stride_pp, stride_ph, stride_lp, GROUP, HEAD_DIM, SMALL_M, BLOCK,
                     STAGES, False, USE_CAP, WARPS)
        gl.store(mine + n, u, mask=n < MAXU)
        n += 1
        u = gl.atomic_add(queue, 1)
    if gl.atomic_add(queue + 1, 1) == gl.num_programs(0) - 1:
        gl.store(queue, 0)
        gl.store(queue + 1, 0)
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
    gl.thread_barrier()  # this program's own partials, stored by all its warps, before any warp reads them
    for i in range(gl.minimum(n, MAXU)):
        u = gl.load(mine + i)
        item = num_large + u // NUM_KV_HEADS
        q_start = gl.load(items + item * 5 + 2)
        q_count = gl.load(items + item * 5 + 3)
        for ql in range(q_count):
            qid = gl.load(qperm + q_start + ql)
            _merge_kv_head(partial_out, partial_lse, merge_indptr, merge_slots, Out, qid, u % NUM_KV_HEADS,
                           stride_pp, stride_ph, stride_lp, stride_ob, stride_oh, GROUP, HEAD_DIM, MERGE_P, WARPS)


_BUFS = {}


def launch(q, k_buffer, v_buffer, plan, sm_scale: float, logit_cap: float, small_rows: int, out,
           programs: int | None = None):
    po, pl = plan.partial_out, plan.partial_lse
    grid = programs or 4 * torch.cuda.get_device_properties(q.device).multi_processor_count
    bufs = _BUFS.get((q.device, grid))
    if bufs is None:
        bufs = _BUFS[(q.device, grid)] = (torch.zeros(2, dtype=torch.int32, device=q.device),
                                          torch.zeros(grid * MAX_UNITS, dtype=torch.int32, device=q.device))
    queue, done = bufs
    return _tree_decode_stage1_small_merge[(grid,)](
        q, k_buffer, v_buffer, plan.kv_indices, plan.qperm, plan.items, plan.counts, queue, done, po, pl,
        plan.merge_indptr, plan.merge_slots, out, sm_scale, logit_cap,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        po.stride(0), po.stride(1), pl.stride(0), out.stride(0), out.stride(1),
        NUM_KV_HEADS=plan.num_kv_heads, GROUP=plan.group_size, HEAD_DIM=q.shape[2], SMALL_M=small_rows,
        BLOCK=H.BLOCK_N, STAGES=H.RING, USE_CAP=logit_cap > 0, WARPS=H.NUM_WARPS, MAXU=MAX_UNITS,
        MERGE_P=MERGE_BLOCK_P, num_warps=H.NUM_WARPS, launch_pdl=True)
