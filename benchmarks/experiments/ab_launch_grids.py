"""What the launch grids of a server's fixed plan buffers cost a step, on the benchmark's trees.

A server plans every decode step into buffers sized for ``--cuda-graph-max-bs`` requests
(``sglang_deft.tree_attention.plan_limits``), and launches over their capacity: stage 1 over
``max_items`` programs per KV head, stage 2 over ``max_bs`` queries; programs past the step's
device-side counts exit at once. Each case's tree is planned into such buffers (MAX_BS, default 256)
and its step timed with the grids as they are (``server``), with stage 2 over the step's queries
(``q``), with stage 1 also over the items bound of the step's batch size (``qi``:
``plan_limits(B).max_items``), and over exactly the step's items (``exact``), against a plain plan
(``plain``). One CUDA graph per step, do_bench's L2 flush, the middle of 3 alternating rounds; outputs
must be bitwise those of ``server``. On the GPU host (overlay on PYTHONPATH):
    DEFT_COMMIT=<sha> OUT=$OUT python3 benchmarks/experiments/ab_launch_grids.py   # writes $OUT/ab_launch_grids.json
"""
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import sweep_stage1 as S  # noqa: E402
from sglang_deft.tree_attention import plan_limits  # noqa: E402

K = S.K
MAX_BS = int(os.environ.get("MAX_BS", "256"))
cases = S.select_cases(os.environ.get("CASES", "p4k_16,p4k_64,p16k_64,p1k_256,tree3,nosharing,spec"))
device = torch.device("cuda")
report = {"gpu": torch.cuda.get_device_name(device), "date": time.strftime("%Y-%m-%d"),
          "commit": os.environ.get("DEFT_COMMIT", "?"), "max_bs": MAX_BS}

for bench_case in cases:
    key = bench_case.key
    case = S.Case(bench_case, device)
    c = case.case
    B, T = case.q.shape[0], case.tree.kv_indices.numel()
    limits = plan_limits(MAX_BS, c.num_qo_heads, c.num_kv_heads, device)
    server = K.plan_tree_decode(case.tree, c.num_qo_heads, c.num_kv_heads, c.head_dim,
                                capacity=limits.capacity(MAX_BS, T))
    n_items = int(server.counts[:2].sum())
    plans = {
        "plain": K.plan_tree_decode(case.tree, c.num_qo_heads, c.num_kv_heads, c.head_dim),
        "server": server,
        "q": dataclasses.replace(server, grid_queries=B),
        "qi": dataclasses.replace(server, grid_queries=B,
                                  grid_items=plan_limits(B, c.num_qo_heads, c.num_kv_heads, device).max_items),
        "exact": dataclasses.replace(server, grid_queries=B, grid_items=n_items),
    }
    res = report.setdefault(key, {"queries": B, "items": n_items,
                                  "grids": {n: [p.grid_items, p.grid_queries] for n, p in plans.items()}})
    fns, outs = {}, {}
    for name, plan in plans.items():
        o = torch.full_like(case.q, float("nan"))

        def step(o=o, plan=plan):
            K.tree_decode(case.q, case.k, case.v, plan, case.scale, out=o)
        step()
        torch.cuda.synchronize()
        outs[name] = o
        res[name + "_check"] = S.check(o, case.ref)
        fns[name] = step
    res["bitwise_as_server"] = {n: bool(torch.equal(o, outs["server"])) for n, o in outs.items()}
    for name, us in S.alternating_graph_times(fns).items():
        res[name + "_us"] = us
    print(key, B, n_items, {n: round(res[n + "_us"], 1) for n in fns},
          all(res[n + "_check"]["ok"] for n in fns), res["bitwise_as_server"], flush=True)
    json.dump(report, open(Path(os.environ.get("OUT", "/tmp")) / "ab_launch_grids.json", "w"), indent=1)
