"""Hang/correctness smoke of a stage-1 module on one small case (run under `timeout`)."""
import os, sys, time
import torch
sys.path.insert(0, "benchmarks")
import sweep_stage1 as S
K = S.K
mod = S.load_module(sys.argv[1])
by_key = {c.key: c for c in S.T.all_cases()}
for key in sys.argv[2:]:
    case = S.Case(by_key[key], torch.device("cuda"))
    c = case.case
    plan = K.plan_tree_decode(case.tree, c.num_qo_heads, c.num_kv_heads, c.head_dim)
    o = torch.full_like(case.q, float("nan"))
    t = time.time()
    mod.launch(case.q, case.k, case.v, plan, case.scale, 0.0, 16)
    S.STAGES.launch_stage2(plan, o)
    torch.cuda.synchronize()
    print(key, "ok in", round(time.time() - t, 1), "s", S.check(o, case.ref), flush=True)
