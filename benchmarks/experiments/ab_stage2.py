"""A/B of stage-2 launch shapes (partials per load, warps) on the benchmark's trees, in one process.

Each variant is ``BLOCK_P:num_warps`` (main's ``_tree_decode_stage2`` in that shape) or
``BLOCK_P:num_warps:path`` (a file defining another ``_tree_decode_stage2`` with the same arguments, and
``HEADS_PER_PROGRAM`` if it merges several heads per program, passed as its ``HEADS``: ``stage2/s2heads2.py``,
``s2heads4.py``). Every step is main's stage 1 followed by that stage 2, one CUDA graph, do_bench's L2
flush, the middle of 3 alternating rounds. Also records how many partials each case's queries merge (the
loop runs ceil(partials / BLOCK_P) times) and which outputs are bitwise those of the first variant.
On the GPU host (overlay on PYTHONPATH, as scripts/gpu_session.sh builds it):
    VARIANTS=8:1,4:1:benchmarks/experiments/stage2/s2heads2.py OUT=$OUT python3 benchmarks/experiments/ab_stage2.py
``CAP_QUERIES=N`` plans into fixed-capacity buffers for N queries, so the launch grids cover N as in a
server's CUDA graphs (programs past the step's queries exit at once). Writes $OUT/ab_stage2.json.
"""
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

import torch
import triton

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import sweep_stage1 as S  # noqa: E402

K, STAGES, check = S.K, S.STAGES, S.check
PLAN = importlib.import_module(K.__name__ + ".plan")

variants = []
for v in os.environ.get("VARIANTS", "16:2,32:2").split(","):
    bp, w, *path = v.split(":")
    mod = S.load_module(path[0]) if path else STAGES
    variants.append((int(bp), int(w), mod, f"p{bp}w{w}" + (f"_{Path(path[0]).stem}" if path else "")))
cases = S.select_cases(os.environ.get("CASES", "p4k_16,p4k_64,p16k_64,p1k_256,tree3,nosharing,spec"))
report = {"variants": os.environ.get("VARIANTS", "16:2,32:2")}


def stage2(plan, out, block_p, warps, mod):
    """Stage 2 of ``mod`` (a module with ``_tree_decode_stage2``; ``HEADS_PER_PROGRAM`` heads per program
    if it says so)."""
    po, pl = plan.partial_out, plan.partial_lse
    D = out.shape[2]
    heads = getattr(mod, "HEADS_PER_PROGRAM", 1)
    kernel = mod._tree_decode_stage2
    # Main's kernel takes an fp8 KV cache's V scale; the variants here predate it.
    v_scale = {"v_scale": 1.0, "SCALE_V": False} if "v_scale" in kernel.arg_names else {}
    kernel[(plan.grid_queries, out.shape[1] // heads)](
        po, pl, plan.merge_indptr, plan.merge_slots, plan.counts, out,
        stride_pp=po.stride(0), stride_ph=po.stride(1), stride_lp=pl.stride(0), stride_ob=out.stride(0),
        stride_oh=out.stride(1), HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_P=block_p, num_warps=warps,
        **v_scale, **({"HEADS": heads} if heads > 1 else {}))


for bench_case in cases:
    key = bench_case.key
    case = S.Case(bench_case, torch.device("cuda"))
    c = case.case
    q, k, v, scale = case.q, case.k, case.v, case.scale
    plan = K.plan_tree_decode(case.tree, c.num_qo_heads, c.num_kv_heads, c.head_dim)
    if os.environ.get("CAP_QUERIES"):  # launch grids over a capacity, as a server's CUDA graphs do
        cap = dataclasses.replace(PLAN._capacity_of(plan), max_queries=int(os.environ["CAP_QUERIES"]))
        plan = K.plan_tree_decode(case.tree, c.num_qo_heads, c.num_kv_heads, c.head_dim, capacity=cap)
    cfg = STAGES.stage1_config(c.head_dim, plan.large_rows, q.dtype, q.device)
    n = plan.merge_indptr[1:q.shape[0] + 1] - plan.merge_indptr[:q.shape[0]]
    res = report.setdefault(key, {"partials_per_query": {"min": int(n.min()), "max": int(n.max()),
                                                         "mean": float(n.float().mean())}})
    fns = {}
    outs = {}
    for bp, w, mod, name in variants:
        o = torch.full_like(q, float("nan"))

        def step(o=o, bp=bp, w=w, mod=mod):
            STAGES.launch_stage1(q, k, v, plan, scale, 0.0, cfg)
            stage2(plan, o, bp, w, mod)
        step()
        outs[name] = o
        torch.cuda.synchronize()
        res[name + "_check"] = check(o, case.ref)
        fns[name] = step
    first = next(iter(outs.values()))
    res["bitwise_as_first"] = {n: bool(torch.equal(o, first)) for n, o in outs.items()}
    for name, us in S.alternating_graph_times(fns).items():
        res[name + "_us"] = us
    print(key, res["partials_per_query"], {n: round(res[n + "_us"], 1) for n in fns},
          all(res[n + "_check"]["ok"] for n in fns), res["bitwise_as_first"], flush=True)
    json.dump(report, open(Path(os.environ.get("OUT", "/tmp")) / os.environ.get("AB_NAME", "ab_stage2.json"), "w"),
              indent=1)
