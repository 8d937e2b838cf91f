"""Experiment (session 15): stage1_small_pdl.py with a work queue: each program takes (small item, kv
head) units from a global ticket counter until none are left, so the programs that run beside
stage1_fa3co.py's CTAs (one per SM) take most units, and the rest, which start as those CTAs exit (four
per SM), share what remains instead of a fixed stride's equal shares. The last program out (a second
counter) resets both counters, so a captured launch replays. Then `griddepcontrol.wait`, as there."""
from __future__ import annotations

import os

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
_spec = importlib.util.spec_from_file_location("fa3pp_timers", Path(__file__).resolve().parent / "stage1_fa3pp.py")
CO = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(CO)


@gluon.jit
def _tree_decode_stage1_small_queue(
    Q, K, V, kv_indices, qperm, items, counts, queue, partial_out, partial_lse, sm_scale, logit_cap,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_pp, stride_ph, stride_lp,
    NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, SMALL_M: gl.constexpr,
    BLOCK: gl.constexpr, STAGES: gl.constexpr, USE_CAP: gl.constexpr, WARPS: gl.constexpr, times,
    TIMED: gl.constexpr,
):
    num_large = gl.load(counts)
    total = gl.load(counts + 1) * NUM_KV_HEADS
    u = gl.atomic_add(queue, 1)
    while u < total:
        if TIMED:  # (start, end, SM) per unit, for timeline_coresident.py
            gl.store(times + u * 3, CO._globaltimer())
            gl.store(times + u * 3 + 2, CO._smid().to(gl.int64))
        _attend_item(Q, K, V, kv_indices, qperm, items, num_large + u // NUM_KV_HEADS, u % NUM_KV_HEADS,
                     partial_out, partial_lse, sm_scale, logit_cap, stride_qb, stride_qh, stride_kn, stride_kh,
                     stride_vn, stride_vh, stride_pp, stride_ph, stride_lp, GROUP, HEAD_DIM, HEAD_DIM, SMALL_M, BLOCK,
                     STAGES, False, USE_CAP, WARPS)
        if TIMED:
            gl.store(times + u * 3 + 1, CO._globaltimer())
        u = gl.atomic_add(queue, 1)
    if gl.atomic_add(queue + 1, 1) == gl.num_programs(0) - 1:
        # every other program has left its loop: no ticket is taken after this
        gl.store(queue, 0)
        gl.store(queue + 1, 0)
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


_QUEUES = {}
# SMALL_MAXNREG=64: two programs fit beside an fa3co CTA's 48K registers (ptxas spills ~170 B)
_REGS = {"maxnreg": int(os.environ["SMALL_MAXNREG"])} if os.environ.get("SMALL_MAXNREG") else {}


def launch(q, k_buffer, v_buffer, plan, sm_scale: float, logit_cap: float, small_rows: int, programs: int | None = None,
           pdl: bool = True, times=None):
    po, pl = plan.partial_out, plan.partial_lse
    grid = programs or 4 * torch.cuda.get_device_properties(q.device).multi_processor_count
    queue = _QUEUES.get(q.device)
    if queue is None:
        queue = _QUEUES[q.device] = torch.zeros(2, dtype=torch.int32, device=q.device)
    return _tree_decode_stage1_small_queue[(grid,)](
        q, k_buffer, v_buffer, plan.kv_indices, plan.qperm, plan.items, plan.counts, queue, po, pl, sm_scale, logit_cap,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        po.stride(0), po.stride(1), pl.stride(0),
        NUM_KV_HEADS=plan.num_kv_heads, GROUP=plan.group_size, HEAD_DIM=q.shape[2], SMALL_M=small_rows,
        BLOCK=H.BLOCK_N, STAGES=H.RING, USE_CAP=logit_cap > 0, WARPS=H.NUM_WARPS, times=times if times is not None else pl,
        TIMED=times is not None, num_warps=H.NUM_WARPS,
        launch_pdl=pdl, **_REGS)
