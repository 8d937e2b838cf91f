"""A/B of stage 1 at head dims the Hopper kernel did not serve at first (256, then 80 and 96), in one
process (alternating rounds): the Triton kernel against the Hopper kernel in main's shape (32-token
blocks, ring 2) and with 16-token blocks, ring 3.

At 256 the Hopper kernel's large tiles need ~190 registers (a [64, 256] fp32 accumulator on one
warpgroup) and 96 KB of shared memory: two programs per SM. 80 and 96 run padded to 128. The committed
run at 256 (``ab_head_dim_256_h200.json``) also timed a launch per tile kind, each compiled to its own
registers (Triton or Hopper large tiles, Hopper small tiles with 16- or 32-token blocks, a 2-4 deep ring,
`maxnreg` 168, either order, the planner at 2-4 programs per SM): that needed a TILES switch in the
Hopper kernel, which only commit bb7db11 has.

    CASES=p4k_64_d96,nosharing_d96 OUT=$OUT python3 benchmarks/experiments/ab_head_dims.py
Writes $OUT/ab_head_dims.json: per case, each variant's median us of one step (stage 1 + stage 2,
one CUDA graph, do_bench's L2 flush; the middle of 3 alternating rounds), its output check and the
compiled stage-1 kernel's registers and shared memory.
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


def hopper(block, stages):
    def run(q, k, v, plan, scale):
        return HOP.launch(q, k, v, plan, scale, 0.0, SMALL_ROWS, block=block, stages=stages)
    return run


def triton_kernel():
    """The Triton stage 1 in its shape for the head dim (stage1_config without a device)."""
    def run(q, k, v, plan, scale):
        return STAGES.launch_stage1(q, k, v, plan, scale, 0.0, STAGES.stage1_config(q.shape[2], plan.large_rows))
    return run


VARIANTS = {"triton": triton_kernel(), "hop_both_b32r2": hopper(32, 2), "hop_both_b16r3": hopper(16, 3)}
only = os.environ.get("VARIANTS")
if only:
    VARIANTS = {n: VARIANTS[n] for n in only.split(",")}
cases = S.select_cases(os.environ.get("CASES", "p4k_64_d256,nosharing_d256,p4k_64_d256_g2,nosharing_d256_g2"))
out_path = Path(os.environ.get("OUT", "/tmp")) / "ab_head_dims.json"
report = {"gpu": torch.cuda.get_device_name(), "variants": list(VARIANTS), "cases": {}}
for bench_case in cases:
    case = S.Case(bench_case, torch.device("cuda"))
    c = case.case
    q, k, v, scale = case.q, case.k, case.v, case.scale
    res = report["cases"].setdefault(bench_case.key, {})
    fns = {}
    plan = K.plan_tree_decode(case.tree, c.num_qo_heads, c.num_kv_heads, c.head_dim)
    for name, launch in VARIANTS.items():
        o = torch.full_like(q, float("nan"))

        def step(o=o, launch=launch):
            compiled = launch(q, k, v, plan, scale)
            STAGES.launch_stage2(plan, o)
            return compiled
        try:
            compiled = step()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(bench_case.key, name, res[name]["error"], flush=True)
            continue
        res[name] = dict(check(o, case.ref), regs=compiled.n_regs, spills=compiled.n_spills,
                         shared=compiled.metadata.shared)
        fns[name] = step
    for n, us in S.alternating_graph_times(fns).items():
        res[n]["median_us"] = us
    print(bench_case.key, {n: (round(res[n]["median_us"], 1), res[n]["ok"]) for n in fns}, flush=True)
    out_path.write_text(json.dumps(report, indent=1))
