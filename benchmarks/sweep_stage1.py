"""Tune DeFT's stage-1 launch parameters and the planner's programs per SM on a GPU.

Sweeps stage-1 block lengths, pipeline depth, warps and tile rows with the planner's programs per SM
over the benchmark's trees, timed as bench_kernels.py times (one call in a CUDA graph, replayed
under do_bench with L2 flushed before each replay).

    python benchmarks/sweep_stage1.py --out $OUT [--cases p4k_16,nosharing] [--grid full|quick|near]

``--grid near`` varies tile rows, warps, block lengths and programs per SM around the current
default; every grid also times the default's two stages apart (``stage1_us``, ``stage2_us``: a graph
of one stage's launch each; their sum exceeds the step's median by one launch's overhead).

Writes ``$OUT/sweep_stage1.json`` (every cell, plus the compiled stage-1 kernel's shared memory,
registers and spills: stage 1 holds both tile sizes in one kernel, so its shared memory is sized by
the larger branch and bounds how many programs an SM keeps resident) and ``$OUT/sweep_stage1.md``
(per config: each case's median and the geomean ratio against the current defaults).
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_kernels import T, _kernels  # noqa: E402  (the benchmark's trees and kernel import)

K = _kernels()
PLAN = importlib.import_module(K.__name__ + ".plan")
STAGES = importlib.import_module(K.__name__ + ".tree_decode")


def grid(name: str):
    """(large_rows, block_n_large, block_n_small, num_warps, num_stages, programs_per_sm, separate)."""
    if name == "quick":
        return [(64, 64, 32, 4, 4, 2, False), (64, 64, 32, 4, 4, 2, True), (64, 32, 32, 4, 4, 2, False)]
    if name == "near":
        return [(lr, bl, bs, w, 3, pp, False) for lr in (32, 64, 128) for bl, bs in ((32, 32), (32, 16), (16, 16))
                for w in (4, 8) for pp in (4, 6)]
    blocks = [(64, 32), (32, 32), (64, 64)]  # (large, small) KV block lengths; 32/64 mixed never won
    return [(64, bl, bs, 4, st, pp, sep) for (bl, bs), st, pp, sep in
            itertools.product(blocks, [2, 3, 4], [1, 2, 4, 8], [False, True])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default="p4k_16,p4k_64,p16k_64,p1k_256,tree3,nosharing,spec")
    ap.add_argument("--grid", choices=("full", "quick", "near"), default="full")
    ap.add_argument("--rep", type=int, default=60, help="do_bench rep (ms)")
    args = ap.parse_args(argv)
    import triton
    import triton.testing

    plan_mod, td_mod = PLAN, STAGES
    device = torch.device("cuda")
    cases = {c.key: c for c in T.all_cases()}
    d = td_mod.stage1_config(128, plan_mod.LARGE_ROWS)
    default = (plan_mod.LARGE_ROWS, d.block_n_large, d.block_n_small, d.num_warps, d.num_stages,
               plan_mod.PROGRAMS_PER_SM, d.separate_launches)
    configs = grid(args.grid)
    if default not in configs:
        configs.insert(0, default)
    report = {"default": default, "fields": "large_rows, block_n_large, block_n_small, num_warps, num_stages, "
              "programs_per_sm, separate_launches", "cases": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for key in args.cases.split(","):
        case = cases[key]
        shape = case.shape
        pool = max(2 * T.runs_needed(shape) * T.DEFAULT_RUN, 1 << 16)
        tree = T.build_tree(shape, pool)
        torch.manual_seed(0)
        q = torch.randn(shape.num_queries, case.num_qo_heads, case.head_dim, device=device, dtype=torch.bfloat16)
        k = torch.randn(pool, case.num_kv_heads, case.head_dim, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        tree_d = K.KVTree(tree.kv_indices.to(device), tree.node_indptr, tree.node_parent, tree.query_node)
        scale = case.head_dim ** -0.5
        ref = K.attention_reference(q, k, v, tree_d, scale) if shape.num_queries <= 64 else None
        rows = []
        for lr, bnl, bns, warps, stages, ppsm, sep in configs:
            cfg = K.Stage1Config(bnl, bns, warps, stages, sep)
            plan = K.plan_tree_decode(tree_d, case.num_qo_heads, case.num_kv_heads, case.head_dim,
                                      large_rows=lr, programs_per_sm=ppsm)
            out = torch.empty_like(q)
            cell = {"config": [lr, bnl, bns, warps, stages, ppsm, sep], "items": plan.grid_items}
            try:
                compiled = td_mod.launch_stage1(q, k, v, plan, scale, 0.0, cfg)
                td_mod.launch_stage2(plan, out)
                torch.cuda.synchronize()
                if compiled is not None:
                    cell.update(shared_bytes=compiled.metadata.shared, regs=compiled.n_regs,
                                spills=compiled.n_spills)
                if ref is not None:
                    cell["max_abs_err"] = (out.float() - ref).abs().max().item()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    K.tree_decode(q, k, v, plan, scale, out=out, config=cfg)
                med, p20, p80 = triton.testing.do_bench(g.replay, rep=args.rep, quantiles=[0.5, 0.2, 0.8])
                cell.update(median_us=med * 1e3, p20_us=p20 * 1e3, p80_us=p80 * 1e3)
                if (lr, bnl, bns, warps, stages, ppsm, sep) == default:
                    cell.update(stage_times(q, k, v, plan, scale, cfg, out, args.rep))
            except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
                cell["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(cell)
            print(key, cell, flush=True)
        report["cases"][key] = rows
        (args.out / "sweep_stage1.json").write_text(json.dumps(report, indent=1))
    (args.out / "sweep_stage1.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def stage_times(q, k, v, plan, scale, cfg, out, rep) -> dict:
    """Median us of each stage alone, each captured in its own graph and timed like the step."""
    import triton.testing
    times = {}
    for name, fn in (("stage1_us", lambda: STAGES.launch_stage1(q, k, v, plan, scale, 0.0, cfg)),
                     ("stage2_us", lambda: STAGES.launch_stage2(plan, out))):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        times[name] = triton.testing.do_bench(g.replay, rep=rep, return_mode="median") * 1e3
    return times


def markdown(report) -> str:
    keys = list(report["cases"])
    by_cfg: dict[tuple, dict] = {}
    for key, rows in report["cases"].items():
        for r in rows:
            by_cfg.setdefault(tuple(r["config"]), {})[key] = r
    default = by_cfg.get(tuple(report["default"]), {})
    lines = [f"config = ({report['fields']}); default {tuple(report['default'])}", "",
             "| config | " + " | ".join(keys) + " | geomean vs default | smem KB |",
             "|---|" + "---|" * (len(keys) + 2)]
    for cfg, cells in sorted(by_cfg.items(), key=lambda kv: _geo(kv[1], default, keys)):
        vals = [f"{cells[k]['median_us']:.1f}" if "median_us" in cells.get(k, {}) else "err" for k in keys]
        smem = max((c.get("shared_bytes", 0) for c in cells.values()), default=0) / 1024
        lines.append(f"| {cfg} | " + " | ".join(vals) + f" | {_geo(cells, default, keys):.3f} | {smem:.0f} |")
    split = [f"{k} {c['stage1_us']:.1f} + {c['stage2_us']:.1f}" for k, c in default.items() if "stage1_us" in c]
    if split:
        lines += ["", "Default, stage 1 + stage 2 alone (us): " + "; ".join(split)]
    return "\n".join(lines) + "\n"


def _geo(cells, default, keys) -> float:
    ratios = [cells[k]["median_us"] / default[k]["median_us"] for k in keys
              if "median_us" in cells.get(k, {}) and "median_us" in default.get(k, {})]
    return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else float("inf")


if __name__ == "__main__":
    sys.exit(main())
