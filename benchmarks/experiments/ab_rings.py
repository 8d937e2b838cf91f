"""EXPERIMENT (prepared in session 9, not yet run): the Hopper stage 1 on main against the variant of
stage1_hopper_rings.py whose K and V rings have their own depths, on the benchmark's trees.

On the GPU host (overlay on PYTHONPATH as scripts/gpu_session.sh builds it):
    VARIANTS=3:2:2,2:2:2,2:2:2:64:1 OUT=$OUT python3 benchmarks/experiments/ab_rings.py
    (K ring : V ring : small-tile ring [: large-tile block tokens : Q in registers])
Compiled for sm_90 with Triton 3.6 on the CPU box (registers, shared memory -> programs per SM):
3:2:2 118, 56 KB -> 4; 2:2:2 118, 48 KB -> 4; 3:2:2:32:1 146, 48 KB -> 3; 2:2:2:64:1 177, 72 KB -> 2;
2:2:2:64:0 156, 80 KB -> 2.
Writes $OUT/ab_rings.json: per case, median us of one step (stage 1 + main's stage 2, one CUDA graph,
L2 flushed), middle of 3 alternating rounds, and each variant's output check.
"""
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import triton.testing

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import sweep_stage1 as S  # noqa: E402

K, STAGES, check = S.K, S.STAGES, S.check
spec = importlib.util.spec_from_file_location("stage1_hopper_rings", HERE / "stage1_hopper_rings.py")
R = importlib.util.module_from_spec(spec)
spec.loader.exec_module(R)


def graph_time(fn, rep=50):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, rep=rep, return_mode="median") * 1e3


variants = [tuple(int(x) for x in v.split(":")) for v in os.environ.get("VARIANTS", "3:2:2,2:2:2").split(",")]
cases = os.environ.get("CASES", "p4k_16,p4k_64,p16k_64,p1k_256,tree3,nosharing,spec").split(",")
by_key = {c.key: c for c in S.T.all_cases()}
report = {}
for key in cases:
    case = S.Case(by_key[key], torch.device("cuda"))
    q, k, v, scale = case.q, case.k, case.v, case.scale
    plan = K.plan_tree_decode(case.tree, case.case.num_qo_heads, case.case.num_kv_heads, case.case.head_dim)
    res = report.setdefault(key, {})
    out_main = torch.empty_like(q)
    fns = {"main": lambda: K.tree_decode(q, k, v, plan, scale, out=out_main)}
    for var in variants:
        ks, vs, ss = var[:3]
        lb, qreg = (var[3], bool(var[4])) if len(var) == 5 else (R.BLOCK_N, False)
        name = f"k{ks}_v{vs}_s{ss}" + (f"_n{lb}_qreg{int(qreg)}" if len(var) == 5 else "")
        o = torch.full_like(q, float("nan"))

        def step(o=o, ks=ks, vs=vs, ss=ss, lb=lb, qreg=qreg):
            R.launch(q, k, v, plan, scale, 0.0, 16, ks, vs, ss, lb, qreg)
            STAGES.launch_stage2(plan, o)
        step()
        torch.cuda.synchronize()
        res[name + "_check"] = check(o, case.ref)
        fns[name] = step
    times = {n: [] for n in fns}
    for _ in range(3):
        for n, fn in fns.items():
            times[n].append(graph_time(fn))
    for n, t in times.items():
        res[n + "_us"] = sorted(t)[1]
    print(key, {n: round(res[n + "_us"], 1) for n in fns}, {n: res[n + "_check"]["ok"] for n in fns if n != "main"},
          flush=True)
json.dump(report, open(Path(os.environ.get("OUT", "/tmp")) / "ab_rings.json", "w"), indent=1)
