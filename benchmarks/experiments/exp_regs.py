"""Scratch: stage-1 occupancy via maxnreg and shallower pipelines."""
import sys, math
from pathlib import Path
import torch, triton, triton.testing
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sweep_stage1 as S
K, ST, PLAN = S.K, S.STAGES, S.PLAN


def make(N, warps, stages, maxnreg, ppsm=4):
    def step(case, plan, out):
        q, k, v = case.q, case.k, case.v
        po, pl = plan.partial_out, plan.partial_lse
        D = q.shape[2]
        extra = {"maxnreg": maxnreg} if maxnreg else {}
        ST._tree_decode_stage1[(plan.num_kv_heads, plan.grid_items)](
            q, k, v, plan.kv_indices, plan.qperm, plan.items, plan.counts, po, pl,
            case.scale, 0.0, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), po.stride(0), po.stride(1), pl.stride(0),
            GROUP=plan.group_size, HEAD_DIM=D, BLOCK_D=128, LARGE_M=plan.large_rows,
            SMALL_M=16, LARGE_N=N, SMALL_N=N, USE_CAP=False, IEEE=False, TILES=0,
            num_warps=warps, num_stages=stages, **extra)
        ST.launch_stage2(plan, out)
    return ppsm, step


VARIANTS = {"default": make(32, 4, 3, None), "s3 r112": make(32, 4, 3, 112), "s2 r96": make(32, 4, 2, 96),
            "s2 r104": make(32, 4, 2, 104), "s2 r80": make(32, 4, 2, 80), "N16 s4 r96": make(16, 4, 4, 96),
            "N16 s3 r96": make(16, 4, 3, 96), "s2 r96 ppsm6": make(32, 4, 2, 96, 6), "s2 r96 ppsm5": make(32, 4, 2, 96, 5),
            "N16 s4 r96 ppsm6": make(16, 4, 4, 96, 6)}
device = torch.device("cuda")
by_key = {c.key: c for c in S.T.all_cases()}
res = {}
for key in "p4k_16,p4k_64,p16k_64,p1k_256,tree3,nosharing,spec".split(","):
    case = S.Case(by_key[key], device)
    row = {}
    for name, (ppsm, fn) in VARIANTS.items():
        try:
            plan = case.plan(S.Config(64, ppsm, S.default_config().launch))
            out = torch.full_like(case.q, float("nan"))
            fn(case, plan, out); torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            out.fill_(float("nan"))
            with torch.cuda.graph(g):
                fn(case, plan, out)
            med = triton.testing.do_bench(g.replay, rep=60, return_mode="median") * 1e3
            err = (out.float() - case.ref).abs().max().item()
            row[name] = (round(med, 1), err < 2e-2)
        except Exception as e:
            print(name, "ERR", str(e)[:300]); row[name] = (float("nan"), False)
    res[key] = row
    print(key, row, flush=True)
names = list(VARIANTS)
shared = ["p4k_16", "p4k_64", "p16k_64", "p1k_256", "tree3"]
for n in names:
    ok = [k for k in shared if res[k][n][0] == res[k][n][0]]
    g = math.exp(sum(math.log(res[k][n][0] / res[k][names[0]][0]) for k in ok) / max(len(ok), 1))
    print(f"{n:20s} geo5 {g:.3f} " + " ".join(f"{res[k][n][0]:6.1f}{'' if res[k][n][1] else 'X'}" for k in res))
