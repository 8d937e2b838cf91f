"""Scratch: Gluon large-tile stage 1 against main's Triton stage 1 on the benchmark's trees (H200).

Writes $OUT/gluon_bench.json; prints one line per (case, variant).
"""
import dataclasses
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
import gluon_stage1 as G  # noqa: E402

K, STAGES, check = S.K, S.STAGES, S.check


def graph_time(fn, rep=60):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, rep=rep, return_mode="median") * 1e3


def main():
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    cases = os.environ.get("CASES", "p16k_64,p4k_64,p1k_256,tree3,p4k_16,spec").split(",")
    variants = [v.split(":") for v in os.environ.get("VARIANTS", "128:64:2:8:0:128,256:64:2:16:0:128,256:32:3:16:0:128,128:128:2:8:0:0").split(",")]
    by_key = {c.key: c for c in S.T.all_cases()}
    report = {}
    base_cfg = S.default_config()
    for key in cases:
        case = S.Case(by_key[key], torch.device("cuda"))
        q, k, v, scale = case.q, case.k, case.v, case.scale
        res = report.setdefault(key, {})
        # main: the default step, and its large tiles alone
        plan64 = case.plan(base_cfg)
        out = torch.empty_like(q)
        lc = base_cfg.launch
        res["main_step_us"] = graph_time(lambda: K.tree_decode(q, k, v, plan64, scale, out=out, config=lc))
        sep = dataclasses.replace(lc, separate_launches=True)

        def launch_tiles(plan, tiles):
            STAGES._tree_decode_stage1[(plan.num_kv_heads, plan.grid_items)](
                q, k, v, plan.kv_indices, plan.qperm, plan.items, plan.counts, plan.partial_out, plan.partial_lse,
                scale, 0.0, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                plan.partial_out.stride(0), plan.partial_out.stride(1), plan.partial_lse.stride(0),
                GROUP=plan.group_size, HEAD_DIM=q.shape[2], BLOCK_D=q.shape[2], LARGE_M=plan.large_rows, SMALL_M=16,
                LARGE_N=sep.block_n_large, SMALL_N=sep.block_n_small, USE_CAP=False, IEEE=False, TILES=tiles,
                num_warps=sep.num_warps if plan.large_rows == 64 or tiles == 2 else 8, num_stages=sep.num_stages)

        res["main_large_us"] = graph_time(lambda: launch_tiles(plan64, 1))
        plan128 = K.plan_tree_decode(case.tree, case.case.num_qo_heads, case.case.num_kv_heads, case.case.head_dim,
                                     large_rows=128)

        def small_and_merge(plan, o):
            launch_tiles(plan, 2)
            STAGES.launch_stage2(plan, o)

        plans = {128: plan128}
        for rows, bn, st, nw, pipe, mr in variants:
            rows, bn, st, nw, pipe, mr = int(rows), int(bn), int(st), int(nw), int(pipe), int(mr) or None
            name = f"gluon_m{rows}_n{bn}_s{st}_w{nw}_p{pipe}_r{mr}"
            if rows not in plans:
                plans[rows] = K.plan_tree_decode(case.tree, case.case.num_qo_heads, case.case.num_kv_heads,
                                                 case.case.head_dim, large_rows=rows)
            plan_g = plans[rows]
            try:
                o = torch.full_like(q, float("nan"))

                def step():
                    G.launch_large(q, k, v, plan_g, scale, bn, st, nw, pipe, mr)
                    small_and_merge(plan_g, o)

                step()
                torch.cuda.synchronize()
                res[name] = dict(check(o, case.ref), step_us=graph_time(step),
                                 large_us=graph_time(lambda: G.launch_large(q, k, v, plan_g, scale, bn, st, nw, pipe, mr)))
            except Exception as e:  # noqa: BLE001
                res[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
                traceback.print_exc()
            print(key, name, res[name], flush=True)
        print(key, "main", res["main_step_us"], res["main_large_us"], flush=True)
        json.dump(report, open(out_dir / "gluon_bench.json", "w"), indent=1)


if __name__ == "__main__":
    main()
