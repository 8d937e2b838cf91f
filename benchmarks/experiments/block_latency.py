"""EXPERIMENT: what one KV block costs a stage-1 program, alone on its SM and with the SMs full.

Trees of R identical roots of L tokens (runs of 32 slots, as the benchmark's pool), each root with
16 queries (64 rows per KV head: one large tile) or 1 query (a small tile), never chunked (the
planner's minimum chunk is raised past L), so stage 1 runs R x 8 programs of L / 32 blocks each.
R = 1 puts 8 programs on 8 SMs: the time per block is one program's dependency chain and load round
trip. R = 66 makes 528 programs, 4 per SM as the planner aims for: the time per block is what the
SMs sustain together. Stage 1 alone, one CUDA graph, do_bench's L2 flush; the slope over L is the
time per block, the intercept start-up and the partials' store.
    OUT=$OUT python3 benchmarks/experiments/block_latency.py
RINGS=path/to/stage1_hopper_rings.py VARIANTS=3:2:2,3:3:3 (K:V:small ring depths) adds that kernel's
variants (branch s9-next), and ROOTS=1,33,66 / KINDS=large,small pick the trees.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import sweep_stage1 as S  # noqa: E402

K, STAGES, T = S.K, S.STAGES, S.T
PLAN = S.PLAN
PLAN.MIN_CHUNK_TOKENS = 1 << 30  # one chunk per node, whatever its length
HQ, HKV, D = 32, 8, 128
torch.manual_seed(0)
dev = torch.device("cuda")
kernels = {"main": None}
if os.environ.get("RINGS"):
    R = S.load_module(os.environ["RINGS"])
    for var in os.environ.get("VARIANTS", "3:2:2").split(","):
        kernels["rings" + var.replace(":", "")] = tuple(int(x) for x in var.split(":"))
roots_list = [int(x) for x in os.environ.get("ROOTS", "1,66").split(",")]
queries_per_root = {"large": 16, "small": 1}
runs = [(kind, queries_per_root[kind], roots, kname, ring)
        for kind in os.environ.get("KINDS", "large,small").split(",") for roots in roots_list
        for kname, ring in kernels.items()]
report = {}
for kind, nq, roots, kname, ring in runs:
    res = report.setdefault(f"{kind}_roots{roots}_{kname}", {})
    for L in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        shape = T.TreeShape(node_len=(L,) * roots, node_parent=(-1,) * roots,
                            query_node=tuple(r for r in range(roots) for _ in range(nq)))
        pool = max(2 * T.runs_needed(shape) * T.DEFAULT_RUN, 1 << 16)
        tree = T.build_tree(shape, pool)
        tree = K.KVTree(tree.kv_indices.to(dev), tree.node_indptr, tree.node_parent, tree.query_node)
        q = torch.randn(shape.num_queries, HQ, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(pool, HKV, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        plan = K.plan_tree_decode(tree, HQ, HKV, D)
        cfg = STAGES.stage1_config(D, plan.large_rows, q.dtype, dev)
        if ring is None:
            fn = lambda: STAGES.launch_stage1(q, k, v, plan, D ** -0.5, 0.0, cfg)  # noqa: E731
        else:
            fn = lambda: R.launch(q, k, v, plan, D ** -0.5, 0.0, 16, *ring)  # noqa: E731
        res[L] = S.graph_time(fn, rep=40)
        assert plan.grid_items == roots, (plan.grid_items, roots)
    Ls = np.array(sorted(res), dtype=float)
    ts = np.array([res[x] for x in sorted(res)])
    slope, icpt = np.polyfit(Ls[Ls >= 256] / 32, ts[Ls >= 256], 1)
    res["us_per_block"], res["intercept_us"] = float(slope), float(icpt)
    print(kind, roots, kname, {x: round(res[x], 2) for x in sorted(k for k in res if isinstance(k, int))},
          f"{slope:.3f} us/block", flush=True)
report["kernel"] = STAGES.stage1_config(D, 64, torch.bfloat16, dev).kernel
json.dump(report, open(Path(os.environ.get("OUT", "/tmp")) / "block_latency.json", "w"), indent=1)
