"""Experiment (session 15): main's Hopper stage 1 for the small-tile items only, as a persistent kernel
launched by programmatic dependent launch after stage1_fa3co.py's large units.

Each program loops over (small item, kv head) units with a stride of the grid, running main's own
small-tile code (`_attend_item`), and at its end waits (`griddepcontrol.wait`) for the large-unit
launch to finish, so that this launch's completion, which stage 2 waits for, implies that one's.
Persistent because a program that finished early would otherwise hold its SM slot in that wait and
keep the next small programs out; the grid is one program per SM (what fits beside an fa3co CTA)
unless PROGRAMS is given."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
from bench_kernels import _kernels  # noqa: E402

H = importlib.import_module(_kernels().__name__ + ".stage1_hopper")
_attend_item = H._attend_item


@gluon.jit
def _tree_decode_stage1_small_pdl(
    Q, K, V, kv_indices, qperm, items, counts, partial_out, partial_lse, sm_scale, logit_cap,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_pp, stride_ph, stride_lp,
    NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, SMALL_M: gl.constexpr,
    BLOCK: gl.constexpr, STAGES: gl.constexpr, USE_CAP: gl.constexpr, WARPS: gl.constexpr,
):
    num_large = gl.load(counts)
    total = gl.load(counts + 1) * NUM_KV_HEADS
    for u in range(gl.program_id(0), total, gl.num_programs(0)):
        _attend_item(Q, K, V, kv_indices, qperm, items, num_large + u // NUM_KV_HEADS, u % NUM_KV_HEADS,
                     partial_out, partial_lse, sm_scale, logit_cap, stride_qb, stride_qh, stride_kn, stride_kh,
                     stride_vn, stride_vh, stride_pp, stride_ph, stride_lp, GROUP, HEAD_DIM, SMALL_M, BLOCK,
                     STAGES, False, USE_CAP, WARPS)
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


def launch(q, k_buffer, v_buffer, plan, sm_scale: float, logit_cap: float, small_rows: int, programs: int | None = None,
           pdl: bool = True):
    po, pl = plan.partial_out, plan.partial_lse
    grid = programs or torch.cuda.get_device_properties(q.device).multi_processor_count
    return _tree_decode_stage1_small_pdl[(grid,)](
        q, k_buffer, v_buffer, plan.kv_indices, plan.qperm, plan.items, plan.counts, po, pl, sm_scale, logit_cap,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        po.stride(0), po.stride(1), pl.stride(0),
        NUM_KV_HEADS=plan.num_kv_heads, GROUP=plan.group_size, HEAD_DIM=q.shape[2], SMALL_M=small_rows,
        BLOCK=H.BLOCK_N, STAGES=H.RING, USE_CAP=logit_cap > 0, WARPS=H.NUM_WARPS, num_warps=H.NUM_WARPS,
        launch_pdl=pdl)
