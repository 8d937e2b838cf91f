"""Session 15: where the co-resident step's time goes. Runs stage1_fa3co (large units) and
stage1_small_queue (small units, PDL) with %globaltimer probes: per fa3co CTA its start, end and
SM, per small unit its start, end and SM, replayed as one CUDA graph; also the large units alone and the small units alone.
    SPECS=num_sms:pps,... CASES=... OUT=$OUT python3 benchmarks/experiments/fa3/timeline_coresident.py
Prints and writes $OUT/timeline_coresident.json (µs from the first fa3co CTA's start)."""
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
import sweep_stage1 as S  # noqa: E402

K, PLAN = S.K, S.PLAN
co = S.load_module(str(HERE / "stage1_fa3co.py"))
smallq = S.load_module(str(HERE / "stage1_small_queue.py"))
specs = [tuple(int(x) for x in s.split(":")) for s in os.environ.get("SPECS", "176:1").split(",")]
cases = os.environ.get("CASES", "p16k_64").split(",")
by_key = {c.key: c for c in S.T.all_cases()}
real_num_sms = PLAN._num_sms
report = {}


def summary(ct, st, n_sms):
    t0 = int(ct[ct[:, 2] >= 0, 0].min()) if ct is not None else int(st[:, 0].min())
    out = {}
    fa3_end_by_sm = {}
    if ct is not None:
        ct = ct[ct[:, 2] >= 0].clone()  # CTAs that ran
        ct[:, :2] -= t0
        ends = (ct[:, 1] / 1000).tolist()
        out["fa3_start_max"] = float(ct[:, 0].max()) / 1000
        out["fa3_end"] = [min(ends), statistics.median(ends), max(ends)]
        fa3_end_by_sm = {int(sm): e for sm, e in zip(ct[:, 2].tolist(), ends)}
    if st is not None:
        st = st.clone()
        st[:, :2] -= t0
        s, e, sm = (st[:, 0] / 1000).tolist(), (st[:, 1] / 1000).tolist(), st[:, 2].tolist()
        out["small_first_start"] = min(s)
        out["small_end"] = max(e)
        beside = [b - a for a, b, m in zip(s, e, sm) if b <= fa3_end_by_sm.get(int(m), -1)]
        after = [b - a for a, b, m in zip(s, e, sm) if a >= fa3_end_by_sm.get(int(m), -1)]
        out["small_units"] = len(s)
        out["small_beside_n"] = len(beside)
        out["small_beside_us_median"] = statistics.median(beside) if beside else None
        out["small_after_n"] = len(after)
        out["small_after_us_median"] = statistics.median(after) if after else None
        out["small_sms"] = len(set(sm))
    return out


for key in cases:
    case = S.Case(by_key[key], torch.device("cuda"))
    c = case.case
    q, k, v, scale = case.q, case.k, case.v, case.scale
    n_sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    for sms, pps in specs:
        PLAN._num_sms = lambda device, sms=sms: sms
        try:
            plan = K.plan_tree_decode(case.tree, c.num_qo_heads, c.num_kv_heads, c.head_dim, large_rows=128,
                                      programs_per_sm=pps)
        finally:
            PLAN._num_sms = real_num_sms
        n_large, n_small, B = plan.counts.tolist()
        large = dataclasses.replace(plan, counts=torch.tensor([n_large, 0, B], dtype=torch.int32, device=q.device))
        none = dataclasses.replace(plan, counts=torch.tensor([0, 0, B], dtype=torch.int32, device=q.device))
        ct = torch.full((n_sms, 3), -1, dtype=torch.int64, device=q.device)
        st = torch.zeros(max(n_small * c.num_kv_heads, 1), 3, dtype=torch.int64, device=q.device)
        res = report.setdefault(key, {})
        for mode in ("co", "large", "small"):
            def run(mode=mode):
                co.launch(q, k, v, none if mode == "small" else large, scale, 0.0, 16, times=ct,
                          units=None if mode == "small" else n_large * c.num_kv_heads)
                if mode != "large":
                    smallq.launch(q, k, v, plan, scale, 0.0, 16, times=st)
            run()  # compile
            torch.cuda.synchronize()
            # replayed as one CUDA graph, as the step runs: eager launches leave the GPU waiting on the host
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run()
            for _ in range(5):
                g.replay()
            torch.cuda.synchronize()
            out = summary(ct.cpu(), st.cpu() if mode != "large" else None, n_sms)
            out["units"] = [n_large * c.num_kv_heads, n_small * c.num_kv_heads]
            res[f"{sms}x{pps}_{mode}"] = out
            print(key, f"{sms}x{pps}", mode, json.dumps({a: (round(b, 1) if isinstance(b, float) else
                                                           [round(x, 1) for x in b] if isinstance(b, list) else b)
                                                       for a, b in out.items()}), flush=True)
    json.dump(report, open(Path(os.environ.get("OUT", "/tmp")) / "timeline_coresident.json", "w"), indent=1)
