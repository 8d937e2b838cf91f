"""Session 24: launches for Nsight Compute on the 16k prefix: main's stage 1 over the large items only, session
15's fa3co (FA3CO_MAXNREG=168: one CTA per SM) over the 128 large units of the 176-SM plan, main's whole stage 1;
each twice (ncu profiles the second).
    ncu --clock-control none --kernel-name regex:stage1 --launch-skip 0 --launch-count 6 ... \
        python3 benchmarks/experiments/fa3/prof_large.py
"""
import dataclasses
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
import sweep_stage1 as S  # noqa: E402

K, PLAN = S.K, S.PLAN
main_s1 = __import__(K.__name__ + ".stage1_hopper", fromlist=["launch"])
os.environ["FA3CO_MAXNREG"] = os.environ["FA3CO_CREGS"] = "168"
fa3 = S.load_module(str(HERE / "stage1_fa3pp.py"))
case = S.Case(S.select_cases(os.environ.get("CASES", "p16k_64"))[0], torch.device("cuda"))
c = case.case
q, k, v, scale = case.q, case.k, case.v, case.scale
plan = K.plan_tree_decode(case.tree, c.num_qo_heads, c.num_kv_heads, c.head_dim)
n_large, n_small, B = plan.counts.tolist()
large = dataclasses.replace(plan, counts=torch.tensor([n_large, 0, B], dtype=torch.int32, device=q.device))
real = PLAN._num_sms
PLAN._num_sms = lambda device: 176
try:
    plan128 = K.plan_tree_decode(case.tree, c.num_qo_heads, c.num_kv_heads, c.head_dim, large_rows=128,
                                 programs_per_sm=1)
finally:
    PLAN._num_sms = real
n128 = plan128.counts.tolist()
large128 = dataclasses.replace(plan128, counts=torch.tensor([n128[0], 0, n128[2]], dtype=torch.int32,
                                                            device=q.device))
print("main large items", n_large * c.num_kv_heads, "fa3 large units", n128[0] * c.num_kv_heads, flush=True)
for _ in range(2):
    main_s1.launch(q, k, v, large, scale, 0.0, 16)
for _ in range(2):
    fa3.launch(q, k, v, large128, scale, 0.0, 16, units=n128[0] * c.num_kv_heads)
for _ in range(2):
    main_s1.launch(q, k, v, plan, scale, 0.0, 16)
torch.cuda.synchronize()
print("done", flush=True)
