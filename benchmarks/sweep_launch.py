"""Tune DeFT's launch parameters (both stages) and the planner's tiles on a GPU.

A config is the planner's (large_rows, programs_per_sm), the dtype partial results are kept in
between the stages (``kv``: the KV dtype, as the planner does; ``fp32``), and a ``TreeDecodeConfig``.
Each is timed over the benchmark's trees as bench_kernels.py times (one call in a CUDA graph,
replayed under do_bench with L2 flushed before each replay), and checked against the fp32 reference.

    python benchmarks/sweep_launch.py --out $OUT [--cases p4k_16,nosharing] [--grids stage2,stage1]

Grids run in the order given. ``stage2`` varies the merge (heads and partials per program, warps,
programmatic dependent launch) and the partials' dtype around the current default; ``stage1`` varies
tile rows, KV block lengths, warps, pipeline depth and separate launches, each with the best stage-2
settings found so far (the lowest geomean over the cases). ``quick`` is three configs for a smoke run.
The current default is always timed first, and its two stages apart (``stage1_us``, ``stage2_us``:
a graph of one stage's launch each; their sum exceeds the step's median by one launch's overhead).

Writes ``$OUT/sweep_launch.json`` (every cell, with the compiled stage-1 kernel's shared memory,
registers and spills; rewritten after every config) and ``$OUT/sweep_launch.md`` (per config: each
case's median and the geomean ratio against the current default).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
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


@dataclasses.dataclass(frozen=True)
class Config:
    large_rows: int
    programs_per_sm: int
    partials: str  # "kv" or "fp32"
    launch: K.TreeDecodeConfig

    def key(self) -> str:
        c = self.launch
        sep = f" sep(w{c.small_num_warps or c.num_warps})" if c.separate_launches else ""
        return (f"rows {self.large_rows} ppsm {self.programs_per_sm}; N {c.block_n_large}/{c.block_n_small} "
                f"w{c.num_warps} s{c.num_stages}{sep}; merge h{c.merge_heads} p{c.merge_partials} "
                f"w{c.merge_warps}{' pdl' if c.pdl else ''}; partials {self.partials}")


def default_config() -> Config:
    return Config(PLAN.LARGE_ROWS, PLAN.PROGRAMS_PER_SM, "kv", STAGES.tree_decode_config(128, PLAN.LARGE_ROWS))


def stage2_grid(base: Config) -> list[Config]:
    merges = [(1, 16, 2), (2, 16, 2), (4, 8, 4), (4, 16, 4), (8, 4, 4), (8, 8, 4), (8, 8, 8)]
    return [dataclasses.replace(base, partials=p, launch=dataclasses.replace(
                base.launch, merge_heads=h, merge_partials=n, merge_warps=w, pdl=pdl))
            for p in ("kv", "fp32") for h, n, w in merges for pdl in (False, True)]


def stage1_grid(base: Config) -> list[Config]:
    # (rows, N large, N small, warps, stages, separate, small warps, programs per SM)
    shapes = [(64, 32, 32, 4, 3, False, None, 4), (64, 64, 32, 4, 3, True, 4, 4), (64, 64, 64, 4, 3, False, None, 4),
              (128, 32, 32, 8, 3, True, 4, 4), (128, 64, 32, 8, 2, True, 4, 4), (128, 64, 32, 8, 3, True, 4, 4),
              (128, 64, 32, 8, 3, True, 4, 2), (128, 128, 32, 8, 2, True, 4, 4), (64, 32, 32, 4, 3, True, 4, 4),
              (64, 32, 32, 4, 4, False, None, 4)]
    return [dataclasses.replace(base, large_rows=r, programs_per_sm=pp, launch=dataclasses.replace(
                base.launch, block_n_large=nl, block_n_small=ns, num_warps=w, num_stages=st, separate_launches=sep,
                small_num_warps=sw))
            for r, nl, ns, w, st, sep, sw, pp in shapes]


def quick_grid(base: Config) -> list[Config]:
    return [dataclasses.replace(base, launch=dataclasses.replace(base.launch, merge_heads=4, merge_partials=8,
                                                                  merge_warps=4, pdl=pdl)) for pdl in (False, True)]


GRIDS = {"stage2": stage2_grid, "stage1": stage1_grid, "quick": quick_grid}


class Case:
    """One benchmark tree with its q, KV pool and fp32 reference, on the GPU."""

    def __init__(self, case, device):
        shape = case.shape
        pool = max(2 * T.runs_needed(shape) * T.DEFAULT_RUN, 1 << 16)
        tree = T.build_tree(shape, pool)
        torch.manual_seed(0)
        self.case = case
        self.q = torch.randn(shape.num_queries, case.num_qo_heads, case.head_dim, device=device, dtype=torch.bfloat16)
        self.k = torch.randn(pool, case.num_kv_heads, case.head_dim, device=device, dtype=torch.bfloat16)
        self.v = torch.randn_like(self.k)
        self.tree = K.KVTree(tree.kv_indices.to(device), tree.node_indptr, tree.node_parent, tree.query_node)
        self.scale = case.head_dim ** -0.5
        self.ref = K.attention_reference(self.q, self.k, self.v, self.tree, self.scale)

    def plan(self, cfg: Config):
        c = self.case
        plan = K.plan_tree_decode(self.tree, c.num_qo_heads, c.num_kv_heads, c.head_dim,
                                  large_rows=cfg.large_rows, programs_per_sm=cfg.programs_per_sm)
        if cfg.partials == "fp32":
            plan = dataclasses.replace(plan, partial_out=torch.empty_like(plan.partial_out, dtype=torch.float32))
        return plan


def measure(case: Case, cfg: Config, rep: int, split: bool) -> dict:
    import triton.testing
    plan = case.plan(cfg)
    q, k, v, scale, lc = case.q, case.k, case.v, case.scale, cfg.launch
    out = torch.full_like(q, float("nan"))
    cell = {"items": plan.grid_items}
    try:
        compiled = STAGES.launch_stage1(q, k, v, plan, scale, 0.0, lc)
        STAGES.launch_stage2(plan, out, lc)
        torch.cuda.synchronize()
        if compiled is not None:
            cell.update(shared_bytes=compiled.metadata.shared, regs=compiled.n_regs, spills=compiled.n_spills)
        g = torch.cuda.CUDAGraph()
        out.fill_(float("nan"))
        with torch.cuda.graph(g):
            K.tree_decode(q, k, v, plan, scale, out=out, config=lc)
        med, p20, p80 = triton.testing.do_bench(g.replay, rep=rep, quantiles=[0.5, 0.2, 0.8])
        err = (out.float() - case.ref).abs().max().item()  # the output of the timed replays
        cell.update(median_us=med * 1e3, p20_us=p20 * 1e3, p80_us=p80 * 1e3, max_abs_err=err, ok=err < 2e-2)
        if split:
            for name, fn in (("stage1_us", lambda: STAGES.launch_stage1(q, k, v, plan, scale, 0.0, lc)),
                             ("stage2_us", lambda: STAGES.launch_stage2(plan, out, lc))):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn()
                cell[name] = triton.testing.do_bench(g.replay, rep=rep, return_mode="median") * 1e3
    except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
        cell["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return cell


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default="p4k_16,p4k_64,p16k_64,p1k_256,tree3,nosharing,spec")
    ap.add_argument("--grids", default="stage2,stage1")
    ap.add_argument("--rep", type=int, default=60, help="do_bench rep (ms)")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    by_key = {c.key: c for c in T.all_cases()}
    cases = {key: Case(by_key[key], device) for key in args.cases.split(",")}
    default = default_config()
    report = {"default": default.key(), "configs": {}}
    args.out.mkdir(parents=True, exist_ok=True)

    def run(cfg: Config) -> None:
        if cfg.key() in report["configs"]:
            return
        cells = {key: measure(case, cfg, args.rep, split=cfg == default) for key, case in cases.items()}
        report["configs"][cfg.key()] = cells
        print(cfg.key(), {k: round(c.get("median_us", float("nan")), 1) for k, c in cells.items()}, flush=True)
        (args.out / "sweep_launch.json").write_text(json.dumps(report, indent=1))
        (args.out / "sweep_launch.md").write_text(markdown(report))

    run(default)
    best = default
    for name in args.grids.split(","):
        for cfg in GRIDS[name](best):
            run(cfg)
        best = min((c for c in [best, *GRIDS[name](best)]), key=lambda c: _geo(report, c.key(), default.key()))
        print(f"best after {name}: {best.key()} ({_geo(report, best.key(), default.key()):.3f})", flush=True)
    report["best"] = best.key()
    (args.out / "sweep_launch.json").write_text(json.dumps(report, indent=1))
    (args.out / "sweep_launch.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def _geo(report, key: str, default_key: str) -> float:
    """Geomean time ratio against the default; inf if any case failed or errored."""
    cells, base = report["configs"][key], report["configs"][default_key]
    ratios = []
    for k, c in cells.items():
        if "median_us" not in c or not c.get("ok") or "median_us" not in base[k]:
            return float("inf")
        ratios.append(c["median_us"] / base[k]["median_us"])
    return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else float("inf")


def markdown(report) -> str:
    default = report["default"]
    keys = list(report["configs"][default])
    lines = [f"Default: {default}. Best: {report.get('best')}", "",
             "| config | " + " | ".join(keys) + " | geomean vs default | smem KB |",
             "|---|" + "---|" * (len(keys) + 2)]
    for cfg in sorted(report["configs"], key=lambda c: _geo(report, c, default)):
        cells = report["configs"][cfg]
        vals = [(f"{c['median_us']:.1f}" + ("" if c.get("ok") else " ✗")) if "median_us" in c else "err"
                for c in cells.values()]
        smem = max((c.get("shared_bytes", 0) for c in cells.values()), default=0) / 1024
        lines.append(f"| {cfg} | " + " | ".join(vals) + f" | {_geo(report, cfg, default):.3f} | {smem:.0f} |")
    split = [f"{k} {c['stage1_us']:.1f} + {c['stage2_us']:.1f}" for k, c in report["configs"][default].items()
             if "stage1_us" in c]
    if split:
        lines += ["", "Default, stage 1 + stage 2 alone (us): " + "; ".join(split)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
