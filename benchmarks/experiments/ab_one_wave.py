"""The planner's one-wave rounding of chunk counts against plain rounding up, on small batches.

``schedule.c`` rounds each segment's chunk count up; when that passes one wave of programs
(``PROGRAMS_PER_SM`` x SMs per KV head) but rounding down fits, the largest remainders take the spare
items instead. This times the step (stage 1 + stage 2 in one CUDA graph, do_bench's L2 flush, the middle
of 3 alternating rounds) with plans from the schedule.c given in ``OLD_SCHEDULE_C`` (built beside the
package's, e.g. ``git show <sha>:kernels/schedule.c``) and from the package's own. Both outputs are
checked against the fp32 reference. On the GPU host (overlay on PYTHONPATH):
    OLD_SCHEDULE_C=.ab/schedule_ceil.c DEFT_COMMIT=<sha> OUT=$OUT python3 benchmarks/experiments/ab_one_wave.py
Writes $OUT/ab_one_wave.json.
"""
import ctypes
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import sweep_stage1 as S  # noqa: E402

K, PLAN, T = S.K, S.PLAN, S.T
C_LIBRARY = __import__(K.__name__ + ".c_library", fromlist=["_build"])
SCHEDULE = __import__(K.__name__ + ".schedule", fromlist=["Schedule"])

# (key, shape): batches whose chunk counts the rounding changes, and two it leaves alone (noise).
SHAPES = [(f"b{b}_{n // 1024}k", T.no_sharing(b, n)) for b, n in
          [(4, 8192), (5, 16384), (8, 8192), (12, 4096), (16, 8192), (24, 2048), (32, 16384), (48, 1024),
           (48, 4096), (16, 2048), (64, 2048)]]
SHAPES.append(("n40_p8k+2", T.TreeShape((8192, 300, 8192, 4000), (-1, 0, -1, -1), (1,) * 40 + (2, 3))))


def old_planner(source: Path):
    lib = ctypes.CDLL(str(C_LIBRARY._build(source, C_LIBRARY._compiler())))
    fn = lib.deft_schedule
    fn.restype = ctypes.c_int64
    fn.argtypes = SCHEDULE._library().deft_schedule.argtypes
    schedule = SCHEDULE.Schedule()
    schedule._fn = fn
    return schedule


def main():
    device = torch.device("cuda")
    old_schedule = old_planner(Path(os.environ["OLD_SCHEDULE_C"]))
    report = {"gpu": torch.cuda.get_device_name(device), "date": time.strftime("%Y-%m-%d"),
              "commit": os.environ.get("DEFT_COMMIT", "?"), "old_schedule_c": os.environ["OLD_SCHEDULE_C"],
              "cases": {}}
    for key, shape in SHAPES:
        case = S.Case(T.Case(key, key, shape), device)
        c = case.case
        q, k, v, scale = case.q, case.k, case.v, case.scale
        plans = {"round_up": PLAN.TreeDecodePlanner(c.num_qo_heads, c.num_kv_heads, c.head_dim,
                                                    kv_dtype=q.dtype, schedule=old_schedule).plan(case.tree, device),
                 "one_wave": K.plan_tree_decode(case.tree, c.num_qo_heads, c.num_kv_heads, c.head_dim,
                                                kv_dtype=q.dtype, device=device)}
        row, fns = report["cases"].setdefault(key, {}), {}
        for name, plan in plans.items():
            out = torch.full_like(q, float("nan"))
            K.tree_decode(q, k, v, plan, scale, out=out)
            torch.cuda.synchronize()
            row[name + "_items"] = int(plan.counts[:2].sum())
            row[name + "_ok"] = S.check(out, case.ref)["ok"]
            fns[name] = (lambda plan=plan, out=out: K.tree_decode(q, k, v, plan, scale, out=out))
        row.update(S.alternating_graph_times(fns))
        row["ratio"] = row["one_wave"] / row["round_up"]
        print(key, {n: round(x, 2) if isinstance(x, float) else x for n, x in row.items()}, flush=True)
        json.dump(report, open(Path(os.environ.get("OUT", "/tmp")) / "ab_one_wave.json", "w"), indent=1)


if __name__ == "__main__":
    main()
