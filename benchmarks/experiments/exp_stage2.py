"""Scratch: stage-2 variants timed with the real stage 1 (not part of the repo)."""
import sys, math
from pathlib import Path
import torch, triton, triton.language as tl, triton.testing
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sweep_stage1 as S

K, ST = S.K, S.STAGES


@triton.jit
def stage2_twopass(partial_out, partial_lse, merge_indptr, merge_slots, counts, Out,
                   stride_pp, stride_ph, stride_lp, stride_ob, stride_oh,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, LOOP: tl.constexpr):
    b = tl.program_id(0)
    head = tl.program_id(1)
    if b >= tl.load(counts + 2):
        return
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    lo = tl.load(merge_indptr + b)
    hi = tl.load(merge_indptr + b + 1)
    m = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for start in range(lo, hi, BLOCK_P):
        p_ok = start + offs_p < hi
        slot = tl.load(merge_slots + start + offs_p, mask=p_ok, other=0).to(tl.int64)
        m = tl.maximum(m, tl.load(partial_lse + slot * stride_lp + head, mask=p_ok, other=float("-inf")))
    mx = tl.max(m, 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    den = 0.0
    for start in tl.range(lo, hi, BLOCK_P, num_stages=LOOP):
        p_ok = start + offs_p < hi
        slot = tl.load(merge_slots + start + offs_p, mask=p_ok, other=0).to(tl.int64)
        w = tl.exp2(tl.load(partial_lse + slot * stride_lp + head, mask=p_ok, other=float("-inf")) - mx)
        o = tl.load(partial_out + slot[:, None] * stride_pp + head * stride_ph + offs_d[None, :],
                    mask=p_ok[:, None], other=0.0)
        acc += tl.sum(o * w[:, None], 0)
        den += tl.sum(w, 0)
    res = acc / tl.where(den > 0, den, 1.0)
    tl.store(Out + b * stride_ob + head * stride_oh + offs_d, res.to(Out.dtype.element_ty))


def current(bp, warps):
    def run(plan, out):
        po, pl = plan.partial_out, plan.partial_lse
        D = out.shape[2]
        ST._tree_decode_stage2[(plan.grid_queries, out.shape[1])](
            po, pl, plan.merge_indptr, plan.merge_slots, plan.counts, out,
            po.stride(0), po.stride(1), pl.stride(0), out.stride(0), out.stride(1),
            HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_P=bp, num_warps=warps)
    return run


def twopass(bp, warps, loop):
    def run(plan, out):
        po, pl = plan.partial_out, plan.partial_lse
        D = out.shape[2]
        stage2_twopass[(plan.grid_queries, out.shape[1])](
            po, pl, plan.merge_indptr, plan.merge_slots, plan.counts, out,
            po.stride(0), po.stride(1), pl.stride(0), out.stride(0), out.stride(1),
            HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_P=bp, LOOP=loop, num_warps=warps)
    return run


VARIANTS = {"cur p16 w2": current(16, 2), "cur p32 w4": current(32, 4), "cur p64 w4": current(64, 4),
            "cur p8 w2": current(8, 2), "cur p16 w4": current(16, 4), "cur p32 w8": current(32, 8),
            "2pass p16 w2 s1": twopass(16, 2, 1), "2pass p16 w2 s3": twopass(16, 2, 3),
            "2pass p8 w2 s3": twopass(8, 2, 3), "2pass p32 w4 s2": twopass(32, 4, 2)}

device = torch.device("cuda")
by_key = {c.key: c for c in S.T.all_cases()}
cfg = S.default_config()
res = {}
for key in "p4k_16,p4k_64,p16k_64,p1k_256,tree3,nosharing,spec".split(","):
    case = S.Case(by_key[key], device)
    plan = case.plan(cfg)
    row = {}
    for name, fn in VARIANTS.items():
        out = torch.full_like(case.q, float("nan"))
        def step():
            ST.launch_stage1(case.q, case.k, case.v, plan, case.scale, 0.0, cfg.launch)
            fn(plan, out)
        step(); torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        med = triton.testing.do_bench(g.replay, rep=60, return_mode="median") * 1e3
        err = (out.float() - case.ref).abs().max().item()
        row[name] = (round(med, 1), err < 2e-2)
    res[key] = row
    print(key, row, flush=True)
names = list(VARIANTS)
for n in names:
    g = math.exp(sum(math.log(res[k][n][0] / res[k][names[0]][0]) for k in res) / len(res))
    print(f"{n:18s} geo {g:.3f} " + " ".join(f"{res[k][n][0]:6.1f}{'' if res[k][n][1] else 'X'}" for k in res))
