"""Tune DeFT's stage-1 launch parameters and the planner's tiles on a GPU.

A config is the planner's (large_rows, programs_per_sm) and a ``Stage1Config`` of the Triton stage-1 kernel
(``stage1_config``'s choice without a device: on an H200 ``tree_decode`` runs the Gluon kernel of
``stage1_hopper`` instead, whose shape is fixed there and whose variants were measured by
``benchmarks/experiments/ab_stage1.py``). Each is timed over
the benchmark's trees as bench_kernels.py times (one call in a CUDA graph, replayed under do_bench
with L2 flushed before each replay), and its output checked against the fp32 reference (bench_kernels.check: absolute and per-query relative error)
and against the eager step's, bitwise (``replays_equal_eager``).

    python benchmarks/sweep_stage1.py --out $OUT [--cases p4k_16,nosharing] [--grids blocks,tiles]

Grids run in the order given, each around the best config so far (the lowest geomean time over the
cases): ``blocks`` varies the KV block lengths and the pipeline depth; ``tiles`` varies tile rows
(with their warps), separate launches and programs per SM; ``quick`` is one config for a smoke run. The
current default is always timed first, and its two stages apart (``stage1_us``, ``stage2_us``: a
graph of one stage's launch each; their sum exceeds the step's median by one launch's overhead).

Writes ``$OUT/sweep_stage1.json`` (every cell, with the compiled stage-1 kernel's shared memory,
registers and spills; rewritten after every config) and ``$OUT/sweep_stage1.md`` (per config: each
case's median and the geomean ratio against the current default).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# The benchmark's trees, kernel import, output check and --cases names.
# (report_files as bench_kernels loaded it, not a second copy)
from bench_kernels import REPORT_FILES, T, _kernels, check, select_cases, write_replacing  # noqa: E402

K = _kernels()
PLAN = importlib.import_module(K.__name__ + ".plan")
STAGES = importlib.import_module(K.__name__ + ".tree_decode")


def graph_time(fn, rep: int = 50) -> float:
    """Median us of ``fn`` captured in one CUDA graph and replayed under do_bench (L2 flushed)."""
    import triton.testing
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, rep=rep, return_mode="median") * 1e3


def alternating_graph_times(fns: dict, rounds: int = 3) -> dict:
    """``graph_time`` of every function, in ``rounds`` rounds that alternate between them (so drifts
    in clocks and temperature fall on all alike); per name the middle round's median us."""
    times = {n: [] for n in fns}
    for _ in range(rounds):
        for n, fn in fns.items():
            times[n].append(graph_time(fn))
    return {n: sorted(t)[len(t) // 2] for n, t in times.items()}


def load_module(path: str):
    """A kernel module from a file (a baseline or experiment copy beside the package's)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclasses.dataclass(frozen=True)
class Config:
    large_rows: int
    programs_per_sm: int
    launch: K.Stage1Config

    def key(self) -> str:
        c = self.launch
        return (f"rows {self.large_rows} ppsm {self.programs_per_sm}; N {c.block_n_large}/{c.block_n_small} "
                f"w{c.num_warps} s{c.num_stages}{' sep' if c.separate_launches else ''}")


def default_config(head_dim: int) -> Config:
    return Config(PLAN.LARGE_ROWS, PLAN.PROGRAMS_PER_SM, STAGES.stage1_config(head_dim, PLAN.LARGE_ROWS))


def _with(base: Config, large_rows=None, programs_per_sm=None, **launch) -> Config:
    return Config(large_rows or base.large_rows, programs_per_sm or base.programs_per_sm,
                  dataclasses.replace(base.launch, **launch))


def blocks_grid(base: Config) -> list[Config]:
    return [_with(base, block_n_large=nl, block_n_small=ns, num_stages=st)
            for nl, ns, st in ((32, 32, 2), (32, 32, 4), (64, 32, 3), (64, 64, 2), (64, 64, 3), (32, 16, 3), (16, 16, 4))]


def tiles_grid(base: Config) -> list[Config]:
    return [_with(base, large_rows=128, num_warps=8), _with(base, large_rows=128, num_warps=8, block_n_large=64),
            _with(base, large_rows=32), _with(base, programs_per_sm=2), _with(base, programs_per_sm=6),
            _with(base, separate_launches=True)]


def quick_grid(base: Config) -> list[Config]:
    return [_with(base, num_stages=4)]


def d256_grid(base: Config) -> list[Config]:
    """Head dim 256 on the Triton kernel (which serves it off Hopper; on the H200 the Hopper kernel does since
    e738671): 16- or 32-token blocks, 4 or 8 warps, 2-4 stages, and each tile size in its own launch."""
    return [_with(base, block_n_large=nl, block_n_small=ns, num_warps=w, num_stages=st)
            for nl, ns, w, st in ((16, 16, 4, 3), (16, 16, 4, 4), (16, 16, 8, 4), (16, 16, 8, 2), (32, 32, 8, 2),
                                  (32, 16, 8, 2), (16, 32, 8, 2))] + [_with(base, separate_launches=True)]


GRIDS = {"blocks": blocks_grid, "tiles": tiles_grid, "quick": quick_grid, "d256": d256_grid}


class Case:
    """One benchmark tree with its q, KV pool and fp32 reference, on the GPU (the pool in ``kv_dtype``,
    bf16 by default; the reference over the pool as stored)."""

    def __init__(self, case, device, kv_dtype=torch.bfloat16):
        shape = case.shape
        pool = max(2 * T.runs_needed(shape) * T.DEFAULT_RUN, 1 << 16)
        tree = T.build_tree(shape, pool)
        torch.manual_seed(0)
        self.case = case
        self.q = torch.randn(shape.num_queries, case.num_qo_heads, case.head_dim, device=device, dtype=torch.bfloat16)
        self.k = torch.randn(pool, case.num_kv_heads, case.head_dim, device=device, dtype=torch.bfloat16).to(kv_dtype)
        self.v = torch.randn(self.k.shape, device=device, dtype=torch.bfloat16).to(kv_dtype)
        self.tree = K.KVTree(tree.kv_indices.to(device), tree.node_indptr, tree.node_parent, tree.query_node)
        self.scale = case.head_dim ** -0.5

    @functools.cached_property
    def ref(self):
        # On first use: a capped or q-scaled run (ab_stage1.py) checks against its own reference instead.
        return K.attention_reference(self.q, self.k, self.v, self.tree, self.scale)

    def plan(self, cfg: Config):
        c = self.case
        # The pool's dtype: the planner's cost model counts its bytes per KV element.
        return K.plan_tree_decode(self.tree, c.num_qo_heads, c.num_kv_heads, c.head_dim, kv_dtype=self.k.dtype,
                                  large_rows=cfg.large_rows, programs_per_sm=cfg.programs_per_sm)


def measure(case: Case, cfg: Config, rep: int, split: bool) -> dict:
    import triton.testing
    plan = case.plan(cfg)
    q, k, v, scale, lc = case.q, case.k, case.v, case.scale, cfg.launch
    out = torch.full_like(q, float("nan"))
    cell = {"items": plan.grid_items}
    try:
        compiled = STAGES.launch_stage1(q, k, v, plan, scale, 0.0, lc)
        STAGES.launch_stage2(plan, out)
        torch.cuda.synchronize()
        eager = out.clone()
        if compiled is not None:
            cell.update(shared_bytes=compiled.metadata.shared, regs=compiled.n_regs, spills=compiled.n_spills)
        g = torch.cuda.CUDAGraph()
        out.fill_(float("nan"))
        with torch.cuda.graph(g):
            K.tree_decode(q, k, v, plan, scale, out=out, config=lc)
        # The eager run's partials too: stage 2 in the replays must read what stage 1 in the replays wrote.
        plan.partial_out.fill_(float("nan"))
        plan.partial_lse.fill_(float("nan"))
        med, p20, p80 = triton.testing.do_bench(g.replay, rep=rep, quantiles=[0.5, 0.2, 0.8])
        # The output of the timed replays, against bench_kernels' criterion (absolute and per-query relative)
        cell.update(median_us=med * 1e3, p20_us=p20 * 1e3, p80_us=p80 * 1e3, **check(out, case.ref),
                    replays_equal_eager=bool(torch.equal(out, eager)))
        if split:
            for name, fn in (("stage1_us", lambda: STAGES.launch_stage1(q, k, v, plan, scale, 0.0, lc)),
                             ("stage2_us", lambda: STAGES.launch_stage2(plan, out))):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn()
                cell[name] = triton.testing.do_bench(g.replay, rep=rep, return_mode="median") * 1e3
    except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
        cell["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return cell


def run_metadata() -> dict:
    """What a sweep's report names: the GPU, the UTC date and the commit (``report_files.commit_label``)."""
    return {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": REPORT_FILES.commit_label()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default="p4k_16,p4k_64,p16k_64,p1k_256,tree3,nosharing,spec")
    ap.add_argument("--grids", default="blocks,tiles")
    ap.add_argument("--rep", type=int, default=60, help="do_bench rep (ms)")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    cases = {c.key: Case(c, device) for c in select_cases(args.cases)}
    head_dims = {case.case.head_dim for case in cases.values()}
    if len(head_dims) != 1:
        raise SystemExit(f"one head dim per sweep (its default config depends on it): {sorted(head_dims)}")
    default = default_config(head_dims.pop())
    report = {"metadata": run_metadata(), "default": default.key(), "configs": {}}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every config, whole or not at all: gpu_session.sh's timeout keeps what was measured
        write_replacing(args.out / "sweep_stage1.json", json.dumps(report, indent=1))
        write_replacing(args.out / "sweep_stage1.md", markdown(report))

    def run(cfg: Config) -> None:
        if cfg.key() in report["configs"]:
            return
        cells = {key: measure(case, cfg, args.rep, split=cfg == default) for key, case in cases.items()}
        report["configs"][cfg.key()] = cells
        print(cfg.key(), {k: round(c.get("median_us", float("nan")), 1) for k, c in cells.items()}, flush=True)
        save()

    run(default)
    best = default
    for name in args.grids.split(","):
        for cfg in GRIDS[name](best):
            run(cfg)
        best = min((c for c in [best, *GRIDS[name](best)]), key=lambda c: _geo(report, c.key(), default.key()))
        print(f"best after {name}: {best.key()} ({_geo(report, best.key(), default.key()):.3f})", flush=True)
    report["best"] = best.key()
    save()
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
    meta = report.get("metadata", {})
    lines = [f"{meta.get('gpu', '?')}, {meta.get('date', '?')}, commit {meta.get('commit', '?')}", "",
             f"Default: {default}. Best: {report.get('best')}", "",
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
