"""A/B of stage-1 launches at head_dim 256, in one process (alternating rounds).

At 256 the Hopper kernel's large tiles need ~190 registers (a [64, 256] fp32 accumulator on one
warpgroup: two programs per SM) while its small tiles need ~150-175, so one launch of both kinds would
run the small tiles, all that a batch without sharing has, at the large tiles' occupancy. The variants:
the Triton kernel as on main; the Hopper kernel over both kinds; and a launch per kind, each compiled
to its own shape (Triton or Hopper large tiles, Hopper small tiles with 16- or 32-token blocks and a
2-4 deep ring), in both orders, at the planner's 2-4 programs per SM.

    OUT=$OUT python3 benchmarks/experiments/ab_head_dim_256.py
Writes $OUT/ab_head_dim_256.json: per case, each variant's median us of one step (stage 1 + stage 2,
one CUDA graph, do_bench's L2 flush; the middle of 3 alternating rounds), its output check and the
compiled stage-1 kernels' registers and shared memory.
"""
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import sweep_stage1 as S  # noqa: E402

K, STAGES, check = S.K, S.STAGES, S.check
HOP = __import__(K.__name__ + ".stage1_hopper", fromlist=["launch"])
SMALL_ROWS = S.PLAN.SMALL_ROWS


def hopper(tiles, block, stages, maxnreg=None):
    def run(q, k, v, plan, scale):
        po, pl = plan.partial_out, plan.partial_lse
        opts = {"maxnreg": maxnreg} if maxnreg else {}
        return HOP._tree_decode_stage1_hopper[(plan.num_kv_heads, plan.grid_items)](
            q, k, v, plan.kv_indices, plan.qperm, plan.items, plan.counts, po, pl, scale, 0.0,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            po.stride(0), po.stride(1), pl.stride(0),
            GROUP=plan.group_size, HEAD_DIM=q.shape[2], LARGE_M=plan.large_rows, SMALL_M=SMALL_ROWS, BLOCK=block,
            STAGES=stages, USE_CAP=False, WARPS=HOP.NUM_WARPS, TILES=tiles, num_warps=HOP.NUM_WARPS, **opts)
    return run


def triton_kernel(tiles):
    """main's Triton stage 1 at head_dim 256 (its stage1_config), over both kinds (0) or large items only (1)."""
    def run(q, k, v, plan, scale):
        cfg = STAGES.stage1_config(q.shape[2], plan.large_rows)
        po, pl = plan.partial_out, plan.partial_lse
        D = q.shape[2]
        return STAGES._tree_decode_stage1[(plan.num_kv_heads, plan.grid_items)](
            q, k, v, plan.kv_indices, plan.qperm, plan.items, plan.counts, po, pl, scale, 0.0,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            po.stride(0), po.stride(1), pl.stride(0),
            GROUP=plan.group_size, HEAD_DIM=D, BLOCK_D=D, LARGE_M=plan.large_rows, SMALL_M=SMALL_ROWS,
            LARGE_N=cfg.block_n_large, SMALL_N=cfg.block_n_small, USE_CAP=False, IEEE=False, TILES=tiles,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return run


# name -> (programs per SM for the planner, stage-1 launches in order)
VARIANTS = {
    "triton": (4, [triton_kernel(0)]),
    "hop_both_b32r2": (4, [hopper(0, 32, 2)]),
    "hop_both_b16r3": (4, [hopper(0, 16, 3)]),
    "tri_large+hop_small_b32r2": (4, [triton_kernel(1), hopper(2, 32, 2)]),
    "tri_large+hop_small_b32r2_r168": (4, [triton_kernel(1), hopper(2, 32, 2, 168)]),
    "tri_large+hop_small_b16r4": (4, [triton_kernel(1), hopper(2, 16, 4)]),
    "tri_large+hop_small_b16r3": (4, [triton_kernel(1), hopper(2, 16, 3)]),
    "hop_small_b16r4+tri_large": (4, [hopper(2, 16, 4), triton_kernel(1)]),
    "hop_large_b32r2+hop_small_b16r4": (4, [hopper(1, 32, 2), hopper(2, 16, 4)]),
    "hop_large_b16r3+hop_small_b16r4": (4, [hopper(1, 16, 3), hopper(2, 16, 4)]),
    "tri_large+hop_small_b16r4_pps3": (3, [triton_kernel(1), hopper(2, 16, 4)]),
    "tri_large+hop_small_b16r4_pps2": (2, [triton_kernel(1), hopper(2, 16, 4)]),
    "hop_large_b32r2+hop_small_b16r4_pps3": (3, [hopper(1, 32, 2), hopper(2, 16, 4)]),
    "triton_pps3": (3, [triton_kernel(0)]),
}
only = os.environ.get("VARIANTS")
if only:
    VARIANTS = {n: VARIANTS[n] for n in only.split(",")}
cases = S.select_cases(os.environ.get("CASES", "p4k_64_d256,nosharing_d256,p4k_64_d256_g2,nosharing_d256_g2"))
out_path = Path(os.environ.get("OUT", "/tmp")) / "ab_head_dim_256.json"
report = {"gpu": torch.cuda.get_device_name(), "variants": list(VARIANTS), "cases": {}}
for bench_case in cases:
    case = S.Case(bench_case, torch.device("cuda"))
    c = case.case
    q, k, v, scale = case.q, case.k, case.v, case.scale
    res = report["cases"].setdefault(bench_case.key, {})
    fns = {}
    for name, (pps, launches) in VARIANTS.items():
        plan = K.plan_tree_decode(case.tree, c.num_qo_heads, c.num_kv_heads, c.head_dim, programs_per_sm=pps)
        o = torch.full_like(q, float("nan"))

        def step(o=o, plan=plan, launches=launches):
            compiled = [launch(q, k, v, plan, scale) for launch in launches]
            STAGES.launch_stage2(plan, o)
            return compiled
        try:
            compiled = step()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(bench_case.key, name, res[name]["error"], flush=True)
            continue
        res[name] = dict(check(o, case.ref), kernels=[{"regs": ck.n_regs, "spills": ck.n_spills,
                                                        "shared": ck.metadata.shared} for ck in compiled])
        fns[name] = step
    for n, us in S.alternating_graph_times(fns).items():
        res[n]["median_us"] = us
    print(bench_case.key, {n: (round(res[n]["median_us"], 1), res[n]["ok"]) for n in fns}, flush=True)
    out_path.write_text(json.dumps(report, indent=1))
