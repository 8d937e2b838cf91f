"""Scratch: large and small stage-1 tiles as two kernels on two streams (parallel graph branches)."""
import sys, math
from pathlib import Path
import torch, triton, triton.testing
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sweep_stage1 as S

K, ST, PLAN = S.K, S.STAGES, S.PLAN
side = None


def launch(q, k, v, plan, scale, tiles, M, N, warps, stages):
    po, pl = plan.partial_out, plan.partial_lse
    D = q.shape[2]
    ST._tree_decode_stage1[(plan.num_kv_heads, plan.grid_items)](
        q, k, v, plan.kv_indices, plan.qperm, plan.items, plan.counts, po, pl,
        scale, 0.0, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), po.stride(0), po.stride(1), pl.stride(0),
        GROUP=plan.group_size, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), LARGE_M=plan.large_rows,
        SMALL_M=16, LARGE_N=N, SMALL_N=N, USE_CAP=False, IEEE=False, TILES=tiles, LOOP_STAGES=0, WARP_SPEC=False,
        num_warps=warps, num_stages=stages)


def variant(large, small, conc=True, small_first=False):
    def step(case, plan, out):
        global side
        main = torch.cuda.current_stream()
        if conc:
            side.wait_stream(main)
            with torch.cuda.stream(side):
                launch(case.q, case.k, case.v, plan, case.scale, 2 if not small_first else 1, *(small if not small_first else large))
            launch(case.q, case.k, case.v, plan, case.scale, 1 if not small_first else 2, *(large if not small_first else small))
            main.wait_stream(side)
        else:
            launch(case.q, case.k, case.v, plan, case.scale, 1, *large)
            launch(case.q, case.k, case.v, plan, case.scale, 2, *small)
        ST.launch_stage2(plan, out)
    return step


def unified(case, plan, out):
    K.tree_decode(case.q, case.k, case.v, plan, case.scale, out=out)


L64 = (64, 32, 4, 3)
VARIANTS = {
    "unified": (64, unified),
    "seq L64 S(w4)": (64, variant(L64, (16, 32, 4, 3), conc=False)),
    "conc L64 S(w4 s3)": (64, variant(L64, (16, 32, 4, 3))),
    "conc L64 S(w2 s3)": (64, variant(L64, (16, 32, 2, 3))),
    "conc L64 S(w4 s4 N64)": (64, variant(L64, (16, 64, 4, 3))),
    "conc L64 S(w2 s4)": (64, variant(L64, (16, 32, 2, 4))),
    "conc L64 S(w4) smallfirst": (64, variant(L64, (16, 32, 4, 3), small_first=True)),
    "conc L128w8 S(w4)": (128, variant((128, 32, 8, 3), (16, 32, 4, 3))),
    "conc L128w8N64 S(w4)": (128, variant((128, 64, 8, 3), (16, 32, 4, 3))),
    "conc L64N64 S(w4)": (64, variant((64, 64, 4, 3), (16, 32, 4, 3))),
}

device = torch.device("cuda")
side = torch.cuda.Stream()
by_key = {c.key: c for c in S.T.all_cases()}
res = {}
for key in "p4k_16,p4k_64,p16k_64,p1k_256,tree3,nosharing,spec".split(","):
    case = S.Case(by_key[key], device)
    row = {}
    for name, (rows, fn) in VARIANTS.items():
        try:
            plan = case.plan(S.Config(rows, PLAN.PROGRAMS_PER_SM, S.default_config().launch))
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
            print(name, "ERR", str(e)[:200]); row[name] = (float("nan"), False)
    res[key] = row
    print(key, row, flush=True)
names = list(VARIANTS)
for n in names:
    ok = [k for k in res if res[k][n][0] == res[k][n][0]]
    g = math.exp(sum(math.log(res[k][n][0] / res[k][names[0]][0]) for k in ok) / max(len(ok), 1))
    print(f"{n:28s} geo {g:.3f} " + " ".join(f"{res[k][n][0]:6.1f}{'' if res[k][n][1] else 'X'}" for k in res))
