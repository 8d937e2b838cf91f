"""Scratch: run deft once per case (after warm-up) for ncu."""
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sweep_stage1 as S
K = S.K
by_key = {c.key: c for c in S.T.all_cases()}
for key in sys.argv[1].split(","):
    case = S.Case(by_key[key], torch.device("cuda"))
    plan = case.plan(S.default_config())
    out = torch.empty_like(case.q)
    for _ in range(3):
        K.tree_decode(case.q, case.k, case.v, plan, case.scale, out=out)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(key)
    K.tree_decode(case.q, case.k, case.v, plan, case.scale, out=out)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()
    print(key, "done", flush=True)
