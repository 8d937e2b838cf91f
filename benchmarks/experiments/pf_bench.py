"""Scratch: the deep-pipeline Gluon stage 1 (gluon_pf.py) against main's Triton stage 1 on the benchmark's
trees, one process, alternating; writes $OUT/pf_bench.json."""
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import triton.testing

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import sweep_stage1 as S  # noqa: E402
import gluon_pf as G  # noqa: E402

K, STAGES, check = S.K, S.STAGES, S.check


def graph_time(fn, rep=50):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, rep=rep, return_mode="median") * 1e3


def main():
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    cases = os.environ.get("CASES", "p4k_16,p4k_64,p16k_64,p1k_256,tree3,nosharing,spec").split(",")
    # name: (large_stages, small_stages, pf, programs_per_sm, maxnreg)
    variants = {}
    for v in os.environ.get("VARIANTS", "2:3:2:4:0,3:3:2:4:0,3:3:2:3:0,2:2:2:4:0").split(","):
        ls, ss, pf, ppsm, mr = (int(x) for x in v.split(":"))
        variants[f"g_ls{ls}_ss{ss}_pf{pf}_pp{ppsm}" + (f"_r{mr}" if mr else "")] = (ls, ss, pf, ppsm, mr or None)
    rounds = int(os.environ.get("ROUNDS", 2))
    by_key = {c.key: c for c in S.T.all_cases()}
    base = S.default_config()
    report = {"variants": {k: list(v) for k, v in variants.items()}, "cases": {}}
    for key in cases:
        case = S.Case(by_key[key], torch.device("cuda"))
        q, k, v, scale = case.q, case.k, case.v, case.scale
        res = report["cases"].setdefault(key, {})
        plans = {}

        def plan_for(ppsm):
            if ppsm not in plans:
                plans[ppsm] = K.plan_tree_decode(case.tree, case.case.num_qo_heads, case.case.num_kv_heads,
                                                 case.case.head_dim, programs_per_sm=ppsm)
            return plans[ppsm]

        lc = base.launch
        out_m = torch.empty_like(q)
        pm = plan_for(4)
        fns = {"main": lambda: K.tree_decode(q, k, v, pm, scale, out=out_m, config=lc),
               "main_large": lambda: STAGES._tree_decode_stage1[(pm.num_kv_heads, pm.grid_items)](
                   q, k, v, pm.kv_indices, pm.qperm, pm.items, pm.counts, pm.partial_out, pm.partial_lse,
                   scale, 0.0, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                   pm.partial_out.stride(0), pm.partial_out.stride(1), pm.partial_lse.stride(0),
                   GROUP=pm.group_size, HEAD_DIM=q.shape[2], BLOCK_D=q.shape[2], LARGE_M=pm.large_rows, SMALL_M=16,
                   LARGE_N=lc.block_n_large, SMALL_N=lc.block_n_small, USE_CAP=False, IEEE=False, TILES=1,
                   num_warps=lc.num_warps, num_stages=lc.num_stages)}
        outs = {}
        for name, (ls, ss, pf, ppsm, mr) in variants.items():
            p = plan_for(ppsm)
            o = torch.full_like(q, float("nan"))
            outs[name] = o

            def step(p=p, o=o, ls=ls, ss=ss, pf=pf, mr=mr):
                G.launch_stage1(q, k, v, p, scale, 0, ls, ss, pf, maxnreg=mr)
                STAGES.launch_stage2(p, o)
            fns[name] = step
            fns[name + "_large"] = lambda p=p, ls=ls, ss=ss, pf=pf, mr=mr: G.launch_stage1(q, k, v, p, scale, 1, ls, ss, pf,
                                                                                      maxnreg=mr)
            try:
                step()
                torch.cuda.synchronize()
                res[name + "_check"] = check(o, case.ref)
                c = G.launch_stage1(q, k, v, p, scale, 0, ls, ss, pf, maxnreg=mr)
                res[name + "_regs"] = [c.n_regs, c.n_spills, c.metadata.shared]
            except Exception as e:  # noqa: BLE001
                res[name + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
                fns.pop(name)
                fns.pop(name + "_large")
        times = {n: [] for n in fns}
        for _ in range(rounds):
            for n, fn in fns.items():
                try:
                    times[n].append(graph_time(fn))
                except Exception as e:  # noqa: BLE001
                    res[n + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        for n, t in times.items():
            if t:
                res[n + "_us"] = sorted(t)[len(t) // 2]
        print(key, {n: round(res[n + "_us"], 1) for n in fns if n + "_us" in res},
              {n: res[n + "_check"]["ok"] for n in variants if n + "_check" in res}, flush=True)
        json.dump(report, open(out_dir / "pf_bench.json", "w"), indent=1)


if __name__ == "__main__":
    main()
