"""Session 24: FA3's consumer scheduling on session 15's fa3co kernel (stage1_fa3pp.py), against fa3co as
it was and against main's one-launch step, in one process (alternating rounds, CUDA graphs, L2 flushed).

Variants (name=KNOBS, knobs as FA3CO_* environment variables of stage1_fa3pp.py, read when the module is
loaded): LOOP2 (PV(j-1) and QK(j) issued as one turn), PINGPONG (the two consumer warpgroups alternate
their turns by named barriers), INTRA (softmax(j) while PV(j-1) runs), MAXNREG/CREGS (registers).
Modes: 'large_u' = the large units alone (stage 1 only, one CTA per large unit), 'coq_u' = session 15's
hybrid (fa3co CTAs, then the small units from a work queue by PDL, then main's stage 2; checked against
the fp32 reference, and two launches bitwise equal).
    CASES=p16k_64 SPECS=152:1,176:1 OUT=$OUT python3 benchmarks/experiments/fa3/ab_fa3pp.py
"""
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
smallq = S.load_module(str(HERE / "stage1_small_queue.py"))

VARIANTS = os.environ.get("VARIANTS", "base=,loop=LOOP2:1,pp=PINGPONG:1,ppi=PINGPONG:1+INTRA:1,"
                          "base168=MAXNREG:168+CREGS:168,ppi168=PINGPONG:1+INTRA:1+MAXNREG:168+CREGS:168")
mods = {}
for item in VARIANTS.split(","):
    name, knobs = item.split("=")
    env = dict(kv.split(":") for kv in knobs.split("+") if kv)
    for k in ("LOOP2", "PINGPONG", "INTRA", "MAXNREG", "CREGS"):
        os.environ.pop("FA3CO_" + k, None)
    for k, v in env.items():
        os.environ["FA3CO_" + k] = v
    mods[name] = S.load_module(str(HERE / "stage1_fa3pp.py"))
specs = [tuple(int(x) for x in s.split(":")) for s in os.environ.get("SPECS", "152:1,176:1").split(",")]
modes = os.environ.get("MODES", "large_u,coq_u").split(",")
report = {"variants": VARIANTS, "specs": os.environ.get("SPECS", "152:1,176:1"), "modes": modes}
out_path = Path(os.environ.get("OUT", "/tmp")) / "ab_fa3pp.json"
real_num_sms = PLAN._num_sms
for bench_case in S.select_cases(os.environ.get("CASES", "p16k_64,p4k_64,p1k_256")):
    key = bench_case.key
    case = S.Case(bench_case, torch.device("cuda"))
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
        units = n_large * c.num_kv_heads
        res[tag + "_units"] = [units, n_small * c.num_kv_heads]
        large = dataclasses.replace(plan, counts=torch.tensor([n_large, 0, B], dtype=torch.int32, device=q.device))
        for vname, mod in mods.items():
            for mode in modes:
                o = torch.full_like(q, float("nan"))

                def step(o=o, plan=plan, large=large, mode=mode, mod=mod, units=units):
                    mod.launch(q, k, v, large, scale, 0.0, 16, units=units)
                    if mode.startswith("large"):
                        return
                    smallq.launch(q, k, v, plan, scale, 0.0, 16)
                    STAGES.launch_stage2(plan, o)
                name = f"{vname}_{mode}_{tag}"
                try:
                    step()
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 - a variant that fails is a result
                    res[name + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(key, name, res[name + "_error"], flush=True)
                    continue
                if not mode.startswith("large"):
                    res[name + "_check"] = check(o, case.ref)
                    o1 = o.clone()
                    step()
                    torch.cuda.synchronize()
                    res[name + "_repeat_equal"] = bool(torch.equal(o1, o))
                    print(key, name, res[name + "_check"]["ok"], res[name + "_repeat_equal"], flush=True)
                fns[name] = step
    for n, us in S.alternating_graph_times(fns).items():
        res[n + "_us"] = us
    print(key, {n: round(res[n + "_us"], 1) for n in fns}, flush=True)
    json.dump(report, open(out_path, "w"), indent=1)
