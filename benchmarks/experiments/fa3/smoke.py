"""Hang/correctness smoke of stage1_fa3 (full step: it + main's stage 2) on some cases; run under `timeout`.
    python3 benchmarks/experiments/fa3/smoke.py <module.py> <programs_per_sm> case...
"""
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
import sweep_stage1 as S  # noqa: E402

K = S.K
mod = S.load_module(sys.argv[1])
pps = int(sys.argv[2])
by_key = {c.key: c for c in S.T.all_cases()}
for key in sys.argv[3:]:
    case = S.Case(by_key[key], torch.device("cuda"))
    c = case.case
    plan = K.plan_tree_decode(case.tree, c.num_qo_heads, c.num_kv_heads, c.head_dim, large_rows=128,
                              programs_per_sm=pps)
    outs = []
    t = time.time()
    for _ in range(3):  # repeated launches: a persistent kernel's work queue must reset itself
        o = torch.full_like(case.q, float("nan"))
        mod.launch(case.q, case.k, case.v, plan, case.scale, 0.0, 16)
        S.STAGES.launch_stage2(plan, o)
        outs.append(o)
    torch.cuda.synchronize()
    same = all(torch.equal(outs[0], x) for x in outs[1:])
    print(key, "items", plan.counts.tolist(), "ok in", round(time.time() - t, 1), "s", S.check(outs[0], case.ref),
          "repeats bitwise equal:", same, flush=True)
