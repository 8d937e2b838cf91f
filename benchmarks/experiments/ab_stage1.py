"""A/B of Hopper stage-1 variants on the benchmark's trees, in one process (alternating rounds).

Each variant is ``name=module:large_rows:programs_per_sm[:block]``; ``module`` is ``main`` (the package's
kernels/stage1_hopper.py), a path to a copy of it (a baseline kept beside the change measured) or
``triton`` (the portable Triton stage 1 in its default shape); ``block`` is the Gluon kernel's KV tokens
per block (its default otherwise). ``KV=fp8_e4m3`` / ``fp8_e5m2`` stores the KV pool in fp8; ``CAP=50``
runs every variant with that logit cap, checked against the capped reference; ``QSCALE=8`` multiplies q
(scores 8x as large: near a cap of 50, where the cap's tanh is tested hardest).
On the GPU host (overlay on PYTHONPATH as scripts/gpu_session.sh builds it):
    VARIANTS="base=/path/old.py:64:4,new=main:64:4" OUT=$OUT python3 benchmarks/experiments/ab_stage1.py
Writes $OUT/ab_stage1.json: per case, each variant's median us of one step (stage 1 + main's stage 2,
one CUDA graph, do_bench's L2 flush; the middle of 3 alternating rounds), its eager step's output check,
whether that output is bitwise the first variant's (``_bitwise_first``; meaningful where both plans are
alike), and whether the timed replays left bitwise the eager output, their output and partials NaN-filled
before the timing (``_replays_equal_eager``).
"""
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import sweep_stage1 as S  # noqa: E402
from bench_kernels import KV_DTYPES  # noqa: E402

K, STAGES, check = S.K, S.STAGES, S.check


class PortableStage1:
    """The Triton stage 1 (tree_decode's launch_stage1 in stage1_config's portable shape) behind the Gluon
    module's ``launch``."""

    @staticmethod
    def launch(q, k, v, plan, scale, cap, small_rows, **_):
        S.STAGES.launch_stage1(q, k, v, plan, scale, cap, S.STAGES.stage1_config(q.shape[2], plan.large_rows))


def module(spec: str):
    if spec == "main":
        return __import__(K.__name__ + ".stage1_hopper", fromlist=["launch"])
    if spec == "triton":
        return PortableStage1
    return S.load_module(spec)


variants = {}
for item in os.environ["VARIANTS"].split(","):
    name, spec = item.split("=")
    mod, *nums = spec.split(":")
    variants[name] = (module(mod), [int(x) for x in nums])
cases = S.select_cases(os.environ.get("CASES", "p4k_16,p4k_64,p16k_64,p1k_256,tree3,nosharing,spec"))
kv = os.environ.get("KV", "bf16")
kv_dtype = {"bf16": torch.bfloat16, **KV_DTYPES}[kv]
cap = float(os.environ.get("CAP", "0"))
qscale = float(os.environ.get("QSCALE", "1"))
report = {"variants": os.environ["VARIANTS"], "kv_dtype": kv, "logit_cap": cap, "q_scale": qscale}
for bench_case in cases:
    key = bench_case.key
    case = S.Case(bench_case, torch.device("cuda"), kv_dtype)
    c = case.case
    q, k, v, scale = case.q, case.k, case.v, case.scale
    if qscale != 1:
        q = case.q * qscale
    res = report.setdefault(key, {})
    ref = K.attention_reference(q, k, v, case.tree, scale, logit_cap=cap) if cap or qscale != 1 else case.ref
    fns, first, eager = {}, None, {}
    for name, (mod, nums) in variants.items():
        lr, pps, *block = nums
        plan = K.plan_tree_decode(case.tree, c.num_qo_heads, c.num_kv_heads, c.head_dim, kv_dtype=k.dtype,
                                  large_rows=lr, programs_per_sm=pps)
        o = torch.full_like(q, float("nan"))
        shape = {"block": block[0]} if block else {}

        def step(o=o, plan=plan, mod=mod, shape=shape):
            mod.launch(q, k, v, plan, scale, cap, 16, **shape)
            STAGES.launch_stage2(plan, o)
        try:
            step()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result
            res[name + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(key, name, res[name + "_error"], flush=True)
            continue
        res[name + "_check"] = check(o, ref)
        first = first if fns else o
        res[name + "_bitwise_first"] = bool(torch.equal(o, first))
        fns[name] = step
        eager[name] = (o.clone(), o, plan)
    # The timed replays write the same buffers: NaN first (partials too), so what they leave is theirs alone.
    for _, o, plan in eager.values():
        for buf in (o, plan.partial_out, plan.partial_lse):
            buf.fill_(float("nan"))
    for n, us in S.alternating_graph_times(fns).items():
        res[n + "_us"] = us
    for name, (once, o, _) in eager.items():
        res[name + "_replays_equal_eager"] = bool(torch.equal(o, once))
    print(key, {n: round(res[n + "_us"], 1) for n in fns}, {n: res[n + "_check"]["ok"] for n in fns},
          {n: res[n + "_bitwise_first"] for n in fns}, {n: res[n + "_replays_equal_eager"] for n in fns}, flush=True)
    json.dump(report, open(Path(os.environ.get("OUT", "/tmp")) / "ab_stage1.json", "w"), indent=1)
