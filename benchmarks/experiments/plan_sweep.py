"""Planner knobs (programs per SM, minimum chunk tokens) with the default kernels, on the benchmark's trees.

On the GPU host (the repo's overlay on PYTHONPATH, as scripts/gpu_session.sh builds it):
    COMBOS=4:128,4:256 OUT=$OUT python3 benchmarks/experiments/plan_sweep.py
    COMBOS=4:256:100:16384,4:256:50:32768 ...   # also the cost model's FLOP_PER_BYTE, PROGRAM_LATENCY_BYTES
CASES takes bench_kernels.py's --cases names (keys, or a set such as low_concurrency).
Writes $OUT/plan_sweep.json after every case: per case, the step's median us per "ppP_minM[_fF_lL]" (3 alternating
rounds), and the run's metadata (GPU, date, commit).
"""
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import sweep_stage1 as S  # noqa: E402

K, PLAN, check = S.K, S.PLAN, S.check


combos = [tuple(float(x) for x in c.split(":")) for c in
          os.environ.get("COMBOS", "4:128,3:128,5:128,6:128,8:128,4:64,4:256,8:64,6:64").split(",")]
DEFAULTS = (PLAN.MIN_CHUNK_TOKENS, PLAN.FLOP_PER_BYTE, PLAN.PROGRAM_LATENCY_BYTES)
cases = S.select_cases(os.environ.get("CASES", "p4k_16,p4k_64,p16k_64,p1k_256,tree3,nosharing,spec"))
report = {"metadata": S.run_metadata()}
out = Path(os.environ.get("OUT", "/tmp")) / "plan_sweep.json"
for bench_case in cases:
    key = bench_case.key
    case = S.Case(bench_case, torch.device("cuda"))
    q, k, v, scale = case.q, case.k, case.v, case.scale
    fns, res = {}, report.setdefault(key, {})
    for combo in combos:
        ppsm, mct = int(combo[0]), int(combo[1])
        fpb, plb = (combo[2], int(combo[3])) if len(combo) == 4 else DEFAULTS[1:]
        PLAN.MIN_CHUNK_TOKENS, PLAN.FLOP_PER_BYTE, PLAN.PROGRAM_LATENCY_BYTES = mct, fpb, plb
        p = K.plan_tree_decode(case.tree, case.case.num_qo_heads, case.case.num_kv_heads, case.case.head_dim,
                               programs_per_sm=ppsm)
        o = torch.full_like(q, float("nan"))
        K.tree_decode(q, k, v, p, scale, out=o)
        torch.cuda.synchronize()
        name = f"pp{ppsm}_min{mct}" + (f"_f{fpb:g}_l{plb}" if len(combo) == 4 else "")
        res[name + "_ok"] = check(o, case.ref)["ok"]
        res[name + "_items"] = p.grid_items
        fns[name] = (lambda p=p, o=o: K.tree_decode(q, k, v, p, scale, out=o))
    PLAN.MIN_CHUNK_TOKENS, PLAN.FLOP_PER_BYTE, PLAN.PROGRAM_LATENCY_BYTES = DEFAULTS
    res.update(S.alternating_graph_times(fns))
    print(key, {n: round(res[n], 1) for n in fns}, flush=True)
    S.write_replacing(out, json.dumps(report, indent=1))  # after every case: a run cut by a timeout keeps them
