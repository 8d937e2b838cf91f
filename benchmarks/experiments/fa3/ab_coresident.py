"""Session 15: large units in stage1_fa3co.py (one CTA per SM, 48K registers), small units in
stage1_small_pdl.py launched by programmatic dependent launch so that they run beside them, then main's
stage 2 -- against main's one-launch step, in one process (alternating rounds, CUDA graphs).
    SPECS=num_sms:pps,... CASES=... OUT=$OUT python3 benchmarks/experiments/fa3/ab_coresident.py
Each spec plans with large_rows=128 as if the GPU had num_sms SMs (how many chunks the large groups
get). Variants per spec (MODES): 'co' (PDL, small units strided over one program per SM), 'coq' (PDL,
small units from a work queue, four programs per SM), 'coqm' (coq whose small launch also merges, session
19: stage1_small_merge.py, no stage 2), 'serial' (co's launches without PDL), 'large' (the
large units alone, stage 1 only); a mode ending in '_u' launches fa3co with one CTA per large unit
when they are fewer than the SMs (else one per SM). Writes $OUT/ab_coresident.json."""
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
import sweep_stage1 as S  # noqa: E402

K, STAGES, PLAN, check = S.K, S.STAGES, S.PLAN, S.check
main_s1 = __import__(K.__name__ + ".stage1_hopper", fromlist=["launch"])
co = S.load_module(str(HERE / "stage1_fa3co.py"))
small = S.load_module(str(HERE / "stage1_small_pdl.py"))
smallq = S.load_module(str(HERE / "stage1_small_queue.py"))
smallm = S.load_module(str(HERE / "stage1_small_merge.py"))
specs = [tuple(int(x) for x in s.split(":")) for s in os.environ.get("SPECS", "132:1,176:1").split(",")]
small_grid = int(os.environ.get("SMALL_GRID", "0")) or None
cases = os.environ.get("CASES", "p16k_64,p4k_64,p1k_256,tree3,p4k_16,spec,nosharing").split(",")
by_key = {c.key: c for c in S.T.all_cases()}
report = {"specs": os.environ.get("SPECS"), "small_grid": small_grid}
real_num_sms = PLAN._num_sms
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
    for sms, pps in specs:
        PLAN._num_sms = lambda device, sms=sms: sms
        try:
            plan = K.plan_tree_decode(case.tree, c.num_qo_heads, c.num_kv_heads, c.head_dim, large_rows=128,
                                      programs_per_sm=pps)
        finally:
            PLAN._num_sms = real_num_sms
        n_large, n_small, B = plan.counts.tolist()
        tag = f"{sms}x{pps}"
        res[tag + "_units"] = [n_large * c.num_kv_heads, n_small * c.num_kv_heads]
        large = dataclasses.replace(plan, counts=torch.tensor([n_large, 0, B], dtype=torch.int32, device=q.device))
        for mode in os.environ.get("MODES", "co,coq,large").split(","):
            units = n_large * c.num_kv_heads if mode.endswith("_u") else None
            o = torch.full_like(q, float("nan"))

            def step(o=o, plan=plan, large=large, mode=mode, units=units):
                co.launch(q, k, v, large, scale, 0.0, 16, units=units)
                if mode.startswith("large"):
                    return
                if mode.startswith("coqm"):  # the small launch merges too: no stage 2
                    smallm.launch(q, k, v, plan, scale, 0.0, 16, o, programs=small_grid)
                    return
                if mode.startswith("coq"):
                    smallq.launch(q, k, v, plan, scale, 0.0, 16, programs=small_grid)
                else:
                    small.launch(q, k, v, plan, scale, 0.0, 16, programs=small_grid, pdl=mode == "co")
                STAGES.launch_stage2(plan, o)
            name = f"{mode}_{tag}"
            try:
                step()
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a variant that fails is a result
                res[name + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(key, name, res[name + "_error"], flush=True)
                continue
            if not mode.startswith("large"):
                res[name + "_check"] = check(o, case.ref)
                # repeated launches must agree bitwise
                o1 = o.clone()
                step()
                torch.cuda.synchronize()
                res[name + "_repeat_equal"] = bool(torch.equal(o1, o))
            fns[name] = step
    for n, us in S.alternating_graph_times(fns).items():
        res[n + "_us"] = us
    print(key, {n: round(res[n + "_us"], 1) for n in fns},
          {n: res[n + "_check"]["ok"] for n in fns if n + "_check" in res}, flush=True)
    json.dump(report, open(Path(os.environ.get("OUT", "/tmp")) / "ab_coresident.json", "w"), indent=1)
