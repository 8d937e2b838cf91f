"""The FA3-shaped stage 1 for the large-tile items only, main's Hopper stage 1 for the small-tile items
in a second launch, then main's stage 2 (one CUDA graph): what a two-launch hybrid would take per step.
    VARIANTS=name=path:programs_per_sm,... OUT=$OUT python3 benchmarks/experiments/fa3/ab_split.py
Writes $OUT/ab_split.json: per case, main's step and each hybrid's, medians of alternating rounds, with
the output check."""
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
import sweep_stage1 as S  # noqa: E402

K, STAGES, check = S.K, S.STAGES, S.check
main_s1 = __import__(K.__name__ + ".stage1_hopper", fromlist=["launch"])
variants = {}
for item in os.environ["VARIANTS"].split(","):
    name, spec = item.split("=")
    path, pps = spec.split(":")
    variants[name] = (S.load_module(path), int(pps))
cases = os.environ.get("CASES", "p4k_16,p4k_64,p16k_64,p1k_256,tree3,nosharing,spec").split(",")
by_key = {c.key: c for c in S.T.all_cases()}
report = {"variants": os.environ["VARIANTS"]}
for key in cases:
    case = S.Case(by_key[key], torch.device("cuda"))
    c = case.case
    q, k, v, scale = case.q, case.k, case.v, case.scale
    res = report.setdefault(key, {})
    fns = {}
    plan = K.plan_tree_decode(case.tree, c.num_qo_heads, c.num_kv_heads, c.head_dim)
    o = torch.full_like(q, float("nan"))

    def step_main(o=o, plan=plan):
        main_s1.launch(q, k, v, plan, scale, 0.0, 16)
        STAGES.launch_stage2(plan, o)
    step_main()
    torch.cuda.synchronize()
    res["main_check"] = check(o, case.ref)
    fns["main"] = step_main
    for name, (mod, pps) in variants.items():
        plan = K.plan_tree_decode(case.tree, c.num_qo_heads, c.num_kv_heads, c.head_dim, large_rows=128,
                                  programs_per_sm=pps)
        n_large, n_small, B = plan.counts.tolist()
        large = dataclasses.replace(plan, counts=torch.tensor([n_large, 0, B], dtype=torch.int32, device=q.device))
        small = dataclasses.replace(plan, items=plan.items[n_large:], large_rows=64, grid_items=max(n_small, 1),
                                    counts=torch.tensor([0, n_small, B], dtype=torch.int32, device=q.device))
        o = torch.full_like(q, float("nan"))

        def step(o=o, plan=plan, large=large, small=small, mod=mod, n_large=n_large, n_small=n_small):
            if n_large:
                mod.launch(q, k, v, large, scale, 0.0, 16)
            if n_small:
                main_s1.launch(q, k, v, small, scale, 0.0, 16)
            STAGES.launch_stage2(plan, o)
        step()
        torch.cuda.synchronize()
        res[name + "_check"] = check(o, case.ref)
        fns[name] = step
    for n, us in S.alternating_graph_times(fns).items():
        res[n + "_us"] = us
    print(key, {n: round(res[n + "_us"], 1) for n in fns}, {n: res[n + "_check"]["ok"] for n in fns}, flush=True)
    json.dump(report, open(Path(os.environ.get("OUT", "/tmp")) / "ab_split.json", "w"), indent=1)
