"""Tree decode attention: DeFT (ours) vs FlashInfer decode, FlashInfer cascade and SGLang's triton
decode kernel, with the byte and FLOP floors, on one GPU.

    python benchmarks/bench_kernels.py --out $OUT [--commit SHA] [--quick] [--cases p4k_16,spec]

Writes ``$OUT/kernels_<tag>.json`` (tag: the GPU's, ``h200``, ``h100`` ...) and ``$OUT/kernels_<tag>.md``, rewritten
after every measurement so a crash keeps what was done. ``benchmarks/plot_kernels.py`` draws the PNG
from the JSON (on any machine). Method, tolerance and layout are described in benchmarks/README.md;
the short version:

* Every provider gets the same q, the same KV pool and the same tree; its metadata (plan, page lists,
  cascade levels, split counts) is built once outside the timing, as a server does once per step.
* Timing: one call is captured in a CUDA graph, and ``triton.testing.do_bench`` times graph replays
  (it zeroes a 256 MB buffer before every replay, outside the timed events, so every run reads KV
  from HBM as a real layer does; ``do_bench_cudagraph`` would not flush L2, and several cases fit
  in the H200's L2). A provider that cannot be captured is timed eagerly with ``do_bench``; the
  ``timing`` field of every cell says which. ``--hot`` adds L2-warm ``do_bench_cudagraph`` numbers.
* Correctness: the output of the timed path (the graph replay, into an output buffer filled with
  NaN first) is compared with ``attention_reference`` (fp32) in the same run. A cell fails when any
  value is non-finite, or max |err| > 2e-2, or any query's relative L2 error
  ||out_b - ref_b|| / ||ref_b|| > 1e-2 (bf16 rounding alone gives ~2.3e-3; dropping one 256-token
  leaf from a 16k path gives ~0.12 but a max |err| of only ~7e-3, hence the relative criterion). deft's
  plan is also read back: every query's partials must cover exactly its path's KV slots once each, which
  the output check cannot see for one token of a 16k path.
  Failed cells are still timed, flagged ``ok: false``, and never count as the best baseline.
* Floors: ``floor_us`` = unique bytes (K and V of every attended node once, plus q and out) / the
  device-to-device copy bandwidth measured in this run (read + write bytes of a 2 GiB copy);
  ``flop_floor_us`` = 4 * Hq * D * (path tokens summed over queries) / the bf16 matmul rate measured
  in this run (8192^3).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _load_sibling(stem: str):
    # By file, so the benchmark runs as a script from anywhere; shared with tests that load it first.
    name = f"deft_bench_{stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / f"{stem}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


T = _load_sibling("trees")
REPORT_FILES = _load_sibling("report_files")
write_replacing = REPORT_FILES.write_replacing


def _kernels():
    try:
        import sglang_deft.kernels as k
    except ImportError:
        sys.path.insert(0, str(ROOT))
        import kernels as k  # type: ignore[no-redef]
    return k


# FlashInfer's decode both ways: with tensor cores (issue 3's baseline; SGLang's choice for an fp8 cache or a GQA
# group of 4 or more) and without (SGLang's choice otherwise: flashinfer_backend.should_use_tensor_core).
BASELINES = ("flashinfer_decode", "flashinfer_decode_cc", "flashinfer_cascade", "sglang_triton")
DEFAULT_PROVIDERS = ("deft", "sglang_triton", "flashinfer_decode", "flashinfer_decode_cc", "flashinfer_cascade")
DEBUG_PROVIDERS = ("torch_paged", "torch_cascade")  # plain PyTorch over the baselines' arrays
PROVIDER_LABEL = {
    "deft": "deft (ours)",
    "flashinfer_decode": "FlashInfer decode (TC)",
    "flashinfer_decode_cc": "FlashInfer decode (CUDA cores)",
    "flashinfer_cascade": "FlashInfer cascade",
    "sglang_triton": "SGLang triton",
    "torch_paged": "torch paged (debug)",
    "torch_cascade": "torch cascade (debug)",
}
MAX_ABS_ERR = 2e-2
MAX_REL_ERR = 1e-2
# Over an fp8 cache SGLang's triton decode rounds P to the cache's dtype for its P x V product, as it does in its
# servers (tl.dot(p.to(v.dtype), v)): 2.4-2.6e-2 per query over e4m3 on the H200, which 1e-2 failed and left out of
# the best baseline. Half the dtype's unit roundoff (e4m3 2^-4, e5m2 2^-3) takes that rounding; a wrong path or mask is
# still far past it. deft and FlashInfer keep P in bf16 there (~2.3e-3) and keep 1e-2: looser for them, a deft
# regression of a few percent would pass.
MAX_REL_ERR_KV = {"fp8_e4m3": 2.0 ** -5, "fp8_e5m2": 2.0 ** -4}
ROUNDS_P_TO_THE_CACHE = ("sglang_triton",)


def max_rel_err(kv_dtype: str, provider: str) -> float:
    """The per-query relative error ``provider``'s output may have over a KV cache of ``kv_dtype`` (--kv-dtype)."""
    return MAX_REL_ERR_KV.get(kv_dtype, MAX_REL_ERR) if provider in ROUNDS_P_TO_THE_CACHE else MAX_REL_ERR
SGLANG_MAX_KV_SPLITS = 8  # server_args.triton_attention_num_kv_splits default in 0.5.10.post1
FLASHINFER_WORKSPACE = 384 * 1024 * 1024  # SGLANG_FLASHINFER_WORKSPACE_SIZE default


class Skip(Exception):
    """A provider that cannot express the case; the message is recorded as the reason."""


@dataclass
class Ctx:
    case: object
    tree: object  # KVTree, CPU int32
    kv_dev: torch.Tensor  # [T] int32 on the device
    q: torch.Tensor
    k_buffer: torch.Tensor
    v_buffer: torch.Tensor
    sm_scale: float
    device: torch.device
    args: argparse.Namespace
    workspace: torch.Tensor | None
    logit_cap: float = 0.0  # SGLang's tanh soft cap (cap * tanh(score / cap)); 0 = none
    _paged: tuple | None = None

    def paged(self):
        if self._paged is None:
            indptr, idx = T.paged_arrays(self.tree)
            self._paged = (indptr, idx)
        return self._paged


@dataclass
class Prepared:
    fn: Callable[[], torch.Tensor]  # the timed call; returns the output in the provider's query order
    to_original: Callable[[torch.Tensor], torch.Tensor] = lambda o: o
    # What the timed call writes before it reads it (its output, and intermediates such as partial results
    # that an earlier call left correct): filled with NaN before the checked replay, so that the check sees
    # what the replay computed.
    out_buffers: tuple = ()
    info: dict | None = None
    capturable: bool = True
    # What a provider's own check of its metadata found wrong (deft: a query whose partials do not read exactly
    # its path's KV slots); a cell with one fails, whatever its output's error.
    metadata_error: str | None = None


# ---------------------------------------------------------------------------------------------
# Providers


def setup_deft(ctx: Ctx) -> Prepared:
    K = _kernels()
    c = ctx.case
    tree = K.KVTree(ctx.kv_dev, ctx.tree.node_indptr, ctx.tree.node_parent, ctx.tree.query_node)
    plan = K.plan_tree_decode(tree, c.num_qo_heads, c.num_kv_heads, c.head_dim, device=ctx.device,
                              kv_dtype=ctx.k_buffer.dtype)
    plan_us = time_plan(K, tree, c, ctx.device, ctx.args.plan_reps, kv_dtype=ctx.k_buffer.dtype)
    out = torch.empty_like(ctx.q)
    q, k, v, s = ctx.q, ctx.k_buffer, ctx.v_buffer, ctx.sm_scale
    kernel = importlib.import_module(K.__name__ + ".tree_decode").stage1_config(
        c.head_dim, plan.large_rows, q.dtype, ctx.device, k.dtype).kernel
    cap = ctx.logit_cap
    return Prepared(fn=lambda: K.tree_decode(q, k, v, plan, s, logit_cap=cap, out=out),
                    out_buffers=(out, plan.partial_out, plan.partial_lse),
                    info={"plan_us": plan_us, "stage1_kernel": kernel},
                    metadata_error=plan_coverage_error(K, plan, ctx.tree))


def plan_coverage_error(K, plan, tree) -> str | None:
    """None when every query's partials, read back from the plan, cover exactly its path's KV slots once
    each; else the first query that differs. The output check cannot see one token dropped or read twice on a
    16k-token path (a ~1e-4 change, under bf16's rounding); this check sees any."""
    reads = importlib.import_module(K.__name__ + ".reference").plan_kv_reads(plan)
    for b, want in enumerate(T.query_slots(tree)):
        got = sorted(reads[b]) if b < len(reads) else []
        if got != sorted(want.tolist()):
            return (f"query {b}: the plan reads {len(got)} KV slots ({len(set(got))} distinct), its path has "
                    f"{want.numel()}")
    if len(reads) != tree.num_queries:
        return f"the plan merges {len(reads)} queries, the tree has {tree.num_queries}"
    return None


def time_plan(K, tree, c, device, reps: int, warmup: int = 20, kv_dtype: torch.dtype = torch.bfloat16) -> dict:
    """Host wall time of plan_tree_decode (metadata on the CPU, kv_indices on the device, as the
    server has them) until its device buffers are ready (synchronised), and the planning thread's CPU
    time of the same calls up to their return, before that wait (``cpu_*``: what issue 3's target names; on the GPU host, a VM, the wall
    time of the same code varies by up to 2x between runs). Medians over ``reps`` calls after
    ``warmup`` untimed ones (a server plans every step: the timed calls find the host warm). ``kv_dtype``: the
    KV cache's, which the planner's cost model reads (plan_tree_decode's default, bf16, unless given)."""
    wall, cpu = [], []
    for i in range(warmup + max(reps, 1)):
        _sync(device)
        t0, c0 = time.perf_counter(), time.thread_time()
        K.plan_tree_decode(tree, c.num_qo_heads, c.num_kv_heads, c.head_dim, device=device, kv_dtype=kv_dtype)
        c1 = time.thread_time()  # the synchronize below spins on the CPU: not the planner's work
        _sync(device)
        if i >= warmup:
            wall.append((time.perf_counter() - t0) * 1e6)
            cpu.append((c1 - c0) * 1e6)
    q_cpu = _quantiles_us(cpu)
    return {**_quantiles_us(wall), **{f"cpu_{k}": v for k, v in q_cpu.items() if k != "n"}}


def setup_flashinfer_decode(ctx: Ctx, tensor_cores: bool = True) -> Prepared:
    import flashinfer

    c = ctx.case
    indptr, idx = ctx.paged()
    B = ctx.q.shape[0]
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ctx.workspace, "NHD", use_tensor_cores=tensor_cores)
    w.plan(indptr.to(ctx.device), idx.to(ctx.device), torch.ones(B, dtype=torch.int32, device=ctx.device),
           c.num_qo_heads, c.num_kv_heads, c.head_dim, 1, pos_encoding_mode="NONE",
           q_data_type=ctx.q.dtype, kv_data_type=ctx.k_buffer.dtype, sm_scale=ctx.sm_scale,
           logits_soft_cap=ctx.logit_cap or None)
    out = torch.empty_like(ctx.q)
    q, kv = ctx.q, (ctx.k_buffer, ctx.v_buffer)
    return Prepared(fn=lambda: w.run(q, kv, out=out), out_buffers=(out,),
                    info={"backend": str(getattr(w, "_backend", "?"))})


def setup_flashinfer_cascade(ctx: Ctx) -> Prepared:
    c = ctx.case
    layout = T.cascade_layout(ctx.tree)
    info = {"levels": len(layout.levels), "empty_requests": layout.empty_requests,
            "inner_queries": layout.inner_queries}
    if layout.empty_requests and ctx.args.cascade_empty_levels == "skip":
        raise Skip(f"{layout.empty_requests} (query, level) pairs have no node at that depth "
                   f"({layout.inner_queries} queries end at inner nodes): one-level-per-depth cascade "
                   f"needs empty-KV requests there; skipped (--cascade-empty-levels skip)")
    import flashinfer

    w = flashinfer.MultiLevelCascadeAttentionWrapper(len(layout.levels), ctx.workspace, "NHD")
    d = ctx.device
    w.plan([lv.qo_indptr.to(d) for lv in layout.levels], [lv.kv_indptr.to(d) for lv in layout.levels],
           [lv.kv_indices.to(d) for lv in layout.levels], [lv.last_page_len.to(d) for lv in layout.levels],
           c.num_qo_heads, c.num_kv_heads, c.head_dim, 1, causal=False, sm_scale=ctx.sm_scale,
           q_data_type=ctx.q.dtype, kv_data_type=ctx.k_buffer.dtype, logits_soft_cap=ctx.logit_cap or None)
    perm = layout.perm.to(d)
    qp = ctx.q[perm].contiguous()  # queries in tree preorder; a server would batch them that way
    kv = (ctx.k_buffer, ctx.v_buffer)

    def to_original(o):
        res = torch.empty_like(o)
        res[perm] = o
        return res

    if layout.empty_requests:
        info["note"] = f"queries ending above a level get empty-KV requests there ({layout.empty_requests})"
    return Prepared(fn=lambda: w.run(qp, kv), to_original=to_original, info=info)


def setup_sglang_triton(ctx: Ctx) -> Prepared:
    from sglang.srt.layers.attention.triton_ops.decode_attention import decode_attention_fwd

    c = ctx.case
    indptr, idx = ctx.paged()
    B, Hq, D = ctx.q.shape
    d = ctx.device
    seq_lens = (indptr[1:] - indptr[:-1]).tolist()
    cores = torch.cuda.get_device_properties(d).multi_processor_count
    host = T.sglang_num_kv_splits(seq_lens, Hq, c.num_kv_heads, SGLANG_MAX_KV_SPLITS, cores)
    info = {"max_kv_splits": SGLANG_MAX_KV_SPLITS}
    try:  # the scheduler SGLang itself runs, when its backend module imports here
        import triton
        from sglang.srt.layers.attention.triton_backend import get_num_kv_splits_triton

        nks = torch.empty(B, dtype=torch.int32, device=d)
        sl = torch.tensor(seq_lens, dtype=torch.int32, device=d)
        sched = 256 if B < 256 else triton.next_power_of_2(B)
        get_num_kv_splits_triton[(1,)](nks, sl, B, 1, Hq, c.num_kv_heads, SGLANG_MAX_KV_SPLITS, cores,
                                       MAX_NUM_SEQ=sched)
        num_kv_splits = nks
        info["num_kv_splits_from"] = "sglang get_num_kv_splits_triton"
        if nks.tolist() != host:
            info["num_kv_splits_host_copy_mismatch"] = True
    except Exception as e:  # noqa: BLE001 - fall back to the host copy, and say so
        num_kv_splits = torch.tensor(host, dtype=torch.int32, device=d)
        info["num_kv_splits_from"] = f"host copy of get_num_kv_splits_triton ({type(e).__name__})"
    info["num_kv_splits"] = sorted(set(num_kv_splits.tolist()))
    # As SGLang's triton backend builds them: int32 kv_indptr, int64 kv_indices.
    kv_indptr, kv_indices = indptr.to(d), idx.to(device=d, dtype=torch.int64)
    attn_logits = torch.empty(B, Hq, SGLANG_MAX_KV_SPLITS, D, dtype=torch.float32, device=d)
    attn_lse = torch.empty(B, Hq, SGLANG_MAX_KV_SPLITS, dtype=torch.float32, device=d)
    out = torch.empty_like(ctx.q)
    q, k, v, s, cap = ctx.q, ctx.k_buffer, ctx.v_buffer, ctx.sm_scale, ctx.logit_cap

    def fn():
        decode_attention_fwd(q, k, v, out, kv_indptr, kv_indices, attn_logits, attn_lse, num_kv_splits,
                             SGLANG_MAX_KV_SPLITS, s, 1.0, 1.0, cap)
        return out

    return Prepared(fn=fn, out_buffers=(out, attn_logits, attn_lse), info=info)


def _no_logit_cap(ctx: Ctx) -> None:
    if ctx.logit_cap:
        raise Skip("plain PyTorch debug provider: no logit cap (--logit-cap)")


def setup_torch_paged(ctx: Ctx) -> Prepared:
    _no_logit_cap(ctx)
    indptr, idx = ctx.paged()
    q, k, v, s = ctx.q, ctx.k_buffer, ctx.v_buffer, ctx.sm_scale
    return Prepared(fn=lambda: T.paged_attention_torch(q, k, v, indptr, idx, s), capturable=False)


def setup_torch_cascade(ctx: Ctx) -> Prepared:
    _no_logit_cap(ctx)
    layout = T.cascade_layout(ctx.tree)
    q, k, v, s = ctx.q, ctx.k_buffer, ctx.v_buffer, ctx.sm_scale
    return Prepared(fn=lambda: T.cascade_attention_torch(q, k, v, layout, s), capturable=False)


SETUP = {
    "deft": setup_deft,
    "flashinfer_decode": setup_flashinfer_decode,
    "flashinfer_decode_cc": lambda ctx: setup_flashinfer_decode(ctx, tensor_cores=False),
    "flashinfer_cascade": setup_flashinfer_cascade,
    "sglang_triton": setup_sglang_triton,
    "torch_paged": setup_torch_paged,
    "torch_cascade": setup_torch_cascade,
}


# ---------------------------------------------------------------------------------------------
# Timing and checking


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles_us(times_us: list[float]) -> dict:
    xs = sorted(times_us)

    def q(p):
        if len(xs) == 1:
            return xs[0]
        i = p * (len(xs) - 1)
        lo = math.floor(i)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)

    return {"median_us": q(0.5), "p20_us": q(0.2), "p80_us": q(0.8), "n": len(xs)}


def bench(fn: Callable, device, args) -> dict:
    """median/p20/p80 in microseconds of fn, L2 flushed before each call on CUDA."""
    if device.type != "cuda":
        times = []
        for _ in range(args.cpu_reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return _quantiles_us(times)
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, quantiles=[0.5, 0.2, 0.8])
    return {"median_us": med * 1e3, "p20_us": p20 * 1e3, "p80_us": p80 * 1e3}


def check(out: torch.Tensor, ref: torch.Tensor, max_rel_allowed: float = MAX_REL_ERR) -> dict:
    o = out.float()
    finite = bool(torch.isfinite(o).all())
    diff = (o - ref).nan_to_num(nan=float("inf"))
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    num = diff.flatten(1).norm(dim=1)
    den = ref.flatten(1).norm(dim=1).clamp_min(1e-6)
    max_rel = float((num / den).max()) if num.numel() else 0.0
    ok = finite and max_abs <= MAX_ABS_ERR and max_rel <= max_rel_allowed
    # JSON has no inf/NaN: a non-finite output reports finite=false and no error size.
    return {"ok": ok, "finite": finite, "max_abs_err": max_abs if finite else None,
            "max_rel_err": max_rel if finite else None}


def _fmt_err(x) -> str:
    return "n/a" if x is None else f"{x:.2e}"


def run_provider(name: str, ctx: Ctx, ref: torch.Tensor) -> dict:
    device, args = ctx.device, ctx.args
    cell: dict = {"provider": name}
    t0 = time.perf_counter()
    try:
        prep = SETUP[name](ctx)
    except Skip as e:
        return {**cell, "status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - a missing library or an API error: record it, go on
        traceback.print_exc()
        return {**cell, "status": "error", "reason": f"setup: {type(e).__name__}: {e}"[:500]}
    if prep.info:
        cell.update(prep.info)
    graph = None
    try:
        out = prep.fn()  # first call: JIT compilation, autotuning
        _sync(device)
        cell["setup_s"] = round(time.perf_counter() - t0, 2)
        timed = prep.fn
        cell["timing"] = "cpu wall clock (debug)" if device.type != "cuda" else "eager, do_bench (L2 flushed)"
        if device.type == "cuda" and prep.capturable and not args.no_graph:
            try:
                s = torch.cuda.Stream(device)
                s.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(s):
                    for _ in range(2):
                        prep.fn()
                torch.cuda.current_stream(device).wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    gout = prep.fn()
                for buf in (gout, *prep.out_buffers):
                    buf.fill_(float("nan"))  # the check below must see what the replay wrote
                graph.replay()
                _sync(device)
                out, timed = gout, graph.replay
                cell["timing"] = "cuda graph replay, do_bench (L2 flushed)"
            except Exception as e:  # noqa: BLE001 - not capturable: time it eagerly, say so
                graph = None
                _sync(device)
                cell["timing"] = "eager, do_bench (L2 flushed)"
                cell["graph_error"] = f"{type(e).__name__}: {e}"[:300]
        if graph is None:
            # Eager (--no-graph, a capture that failed, the CPU): the check must see what a call wrote, not what the
            # buffers held (a buffer the caching allocator handed on from the last provider can hold its answer).
            for buf in prep.out_buffers:
                buf.fill_(float("nan"))
            out = prep.fn()
            _sync(device)
        cell.update(check(prep.to_original(out), ref, max_rel_err(args.kv_dtype, name)))
        if prep.metadata_error:
            cell.update(ok=False, metadata_error=prep.metadata_error)
        cell.update(bench(timed, device, args))
        cell["status"] = "ok" if cell["ok"] else "failed_check"
        if args.hot and device.type == "cuda":
            try:  # an extra figure: its failure leaves the checked, timed cell as it is
                import triton.testing

                hot = triton.testing.do_bench_cudagraph(prep.fn, rep=20, quantiles=[0.5, 0.2, 0.8])
                cell["hot_median_us"] = hot[0] * 1e3
            except Exception as e:  # noqa: BLE001
                cell["hot_error"] = f"{type(e).__name__}: {e}"[:300]
                _sync(device)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        cell.update(status="error", reason=f"run: {type(e).__name__}: {e}"[:500])
        _sync(device)
    finally:
        del graph
    return cell


# ---------------------------------------------------------------------------------------------
# Device rates (measured in the same run)


def measure_copy_gbps(device, args) -> float:
    n = (2 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    r = bench(lambda: dst.copy_(src), device, args)
    return 2 * n / (r["median_us"] * 1e-6) / 1e9  # read + write bytes


def measure_matmul_tflops(device, dtype, args) -> float:
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    r = bench(lambda: torch.matmul(a, b), device, args)
    return 2 * n ** 3 / (r["median_us"] * 1e-6) / 1e12


# ---------------------------------------------------------------------------------------------
# Report


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001
        return None


def summarize(row: dict, providers: list[str]) -> None:
    """Fill the flat per-case fields: <provider>_us, best_baseline, speedup."""
    cells = row["providers"]
    for p in providers:
        c = cells.get(p, {})
        med = c.get("median_us")
        row[f"{p}_us"] = med
        row[f"{p}_p20_us"] = c.get("p20_us")
        row[f"{p}_p80_us"] = c.get("p80_us")
        row[f"{p}_ok"] = c.get("ok") if "ok" in c else None
    # Only cells whose run ended checked and timed ("ok"): an error after the check leaves ok set.
    ok_base = [(cells[p]["median_us"], p) for p in BASELINES
               if p in cells and cells[p].get("status") == "ok" and cells[p].get("median_us") is not None]
    if ok_base:
        us, p = min(ok_base)
        row["best_baseline"], row["best_baseline_us"] = p, us
    else:
        row["best_baseline"], row["best_baseline_us"] = None, None
    d = cells.get("deft", {})
    row["deft_us"] = d.get("median_us")
    row["deft_plan_us"] = (d.get("plan_us") or {}).get("median_us")
    deft_ok = d.get("status") == "ok" and row["deft_us"]
    row["speedup_vs_best"] = row["best_baseline_us"] / row["deft_us"] if deft_ok and row["best_baseline_us"] else None
    # Over the higher of the two floors: the step can beat neither.
    floor = max((f for f in (row.get("floor_us"), row.get("flop_floor_us")) if f), default=None)
    row["deft_over_floor"] = row["deft_us"] / floor if deft_ok and floor else None


def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _fmt(x, nd=1):
    if x is None:
        return "—"
    return f"{x:.{nd}f}" if x < 1000 else f"{x:.0f}"


def against_eager_baseline(row: dict) -> bool:
    """Whether ``row``'s speedup is over a best baseline timed eagerly (launch overhead included) against deft's graph
    replay (a run without deft compares nothing)."""
    bb = row.get("best_baseline")
    return bool(bb) and "eager" in row["providers"][bb].get("timing", "") and \
        "eager" not in row["providers"].get("deft", {}).get("timing", "eager")


def markdown(report: dict) -> str:
    meta, rows = report["metadata"], report["cases"]
    display = ("deft",) + BASELINES + DEBUG_PROVIDERS
    providers = [p for p in display if p in meta["providers"]]
    head = ["case", "floor µs", "FLOP floor µs"] + [PROVIDER_LABEL.get(p, p) for p in providers] + \
        ["best baseline", "deft speedup", "deft / floor", "plan µs (host)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in rows:
        cells = [r["case"], _fmt(r["floor_us"]), _fmt(r["flop_floor_us"])]
        for p in providers:
            c = r["providers"].get(p, {})
            st = c.get("status")
            if st == "ok":
                txt = _fmt(c["median_us"])
                if "eager" in c.get("timing", ""):
                    txt += " ᵉ"
            elif st == "failed_check":
                txt = f"{_fmt(c.get('median_us'))} ✗"
                notes.append(f"{r['case']} / {p}: output check failed (finite: {c.get('finite')}, max rel err "
                             f"{_fmt_err(c.get('max_rel_err'))}, max abs err {_fmt_err(c.get('max_abs_err'))}"
                             + (f"; plan: {c['metadata_error']}" if c.get("metadata_error") else "") + ")")
            elif st in ("skipped", "error"):
                txt = st
                notes.append(f"{r['case']} / {p}: {st}: {c.get('reason', '')}")
            else:
                txt = "—"
            cells.append(txt)
        bb = r.get("best_baseline")
        cells.append(f"{PROVIDER_LABEL.get(bb, bb)} {_fmt(r['best_baseline_us'])}" if bb else "—")
        if against_eager_baseline(r):
            notes.append(f"{r['case']}: the best baseline ({PROVIDER_LABEL.get(bb, bb)}) could not be captured in a "
                         "CUDA graph and was timed eagerly, launch overhead included, against deft's graph replay: "
                         "the speedup is against a slower figure than its kernel's")
        cells.append(f"{r['speedup_vs_best']:.2f}x" if r.get("speedup_vs_best") else "—")
        cells.append(f"{r['deft_over_floor']:.2f}x" if r.get("deft_over_floor") else "—")
        cells.append(_fmt(r.get("deft_plan_us")))
        lines.append("| " + " | ".join(cells) + " |")
    gm = report.get("geomean_speedup_design_shared")
    n_design = sum(1 for r in rows if r.get("design_shared"))
    out = [f"# Tree decode attention, {meta['gpu']} ({REPORT_FILES.precision_label(meta)}), {meta['date']}, "
           f"commit {meta['commit']}", "",
           "Median µs of one decode-attention step (p20/p80 in the JSON). floor = unique KV bytes (+q, out) / "
           f"measured copy rate {_fmt(meta['copy_gbps'], 0)} GB/s; FLOP floor = FLOPs / measured {meta['dtype']} "
           f"matmul rate {_fmt(meta['matmul_tflops'], 0)} TFLOP/s. ᵉ = timed eagerly (not capturable in a CUDA graph); "
           "✗ = output check failed. Speedup = best correct baseline / deft; deft / floor: over the higher of the two "
           "floors. deft's stage-1 kernel (head dim 128; each case's deft cell records its own): "
           f"{meta.get('deft_stage1_kernel', 'triton')}.", ""]
    out += lines
    if gm:
        out += ["", f"Geomean deft speedup on DESIGN.md's shared trees ({n_design} of 5 run), per tree "
                    f"{geomean_label(report)}: {gm:.2f}x"]
    elif n_design:
        out += ["", "Geomean speedup: not available (a shared DESIGN.md tree without a correct deft and "
                    "baseline pair)."]
    else:
        out.append("")
    if meta.get("plan_300node_256q_us"):
        out.append(f"`plan_tree_decode`, 256 queries on a 300-node tree (host, until the device buffers are "
                   f"ready): {meta['plan_300node_256q_us']['median_us']:.0f} µs median wall time"
                   + (f", {meta['plan_300node_256q_us']['cpu_median_us']:.0f} µs median CPU time of the planning "
                      "thread" if "cpu_median_us" in meta["plan_300node_256q_us"] else "") + ".")
    if notes:
        out += ["", "Notes:"] + [f"- {n}" for n in notes]
    if not meta.get("complete"):
        out += ["", "**Incomplete run**: the benchmark stopped before the end."]
    return "\n".join(out) + "\n"


def geomean_baselines(report: dict) -> tuple[list[str], list[str], list[str]]:
    """The baselines of BASELINES by what the shared trees' geomean holds of them: correct on every shared tree that
    ran; correct on some (each tree's speedup is over the best baseline correct on that tree, so these count where
    they were); on none (not run, or failed or skipped everywhere), against which the geomean says nothing."""
    design = [r for r in report["cases"] if r.get("design_shared")]
    ok = {p: [r["providers"].get(p, {}).get("status") == "ok" for r in design] for p in BASELINES}
    every = [p for p in BASELINES if design and all(ok[p])]
    some = [p for p in BASELINES if p not in every and any(ok[p])]
    return every, some, [p for p in BASELINES if p not in every and p not in some]


def geomean_label(report: dict) -> str:
    """What the geomean is over, for the report and the console: the baselines, and those it holds in part or not."""
    every, some, missing = geomean_baselines(report)
    label = "over the best of " + (", ".join(PROVIDER_LABEL[p] for p in every) or "no baseline on every tree")
    if some:
        label += f" (and {', '.join(PROVIDER_LABEL[p] for p in some)} on the shared trees where it ran correctly)"
    if missing:
        label += (f" (partial: without {', '.join(PROVIDER_LABEL[p] for p in missing)}, not run or not correct on "
                  "any shared tree)")
    return label


def write_report(report: dict, out_dir: Path, tag: str) -> None:
    design = [r.get("speedup_vs_best") for r in report["cases"] if r.get("design_shared")]
    # Only when every shared tree that ran has a speedup: a partial geomean would flatter.
    report["geomean_speedup_design_shared"] = geomean(design) if design and all(design) else None
    (report["geomean_baselines"], report["geomean_baselines_partial"],
     report["geomean_baselines_missing"]) = geomean_baselines(report)
    # The shared trees whose speedup is over a baseline timed eagerly (launch overhead included) against deft's graph
    # replay: the table's note said so, the JSON's geomean did not.
    report["geomean_eager_baselines"] = [r["key"] for r in report["cases"]
                                         if r.get("design_shared") and against_eager_baseline(r)]
    write_replacing(out_dir / f"kernels_{tag}.json", json.dumps(report, indent=1) + "\n")
    write_replacing(out_dir / f"kernels_{tag}.md", markdown(report))


# ---------------------------------------------------------------------------------------------


KV_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def pool_dtype(args) -> torch.dtype:
    """The KV pool's dtype: --kv-dtype's fp8, or the benchmark dtype."""
    return KV_DTYPES.get(args.kv_dtype, getattr(torch, args.dtype))


def run_suffix(args) -> str:
    """The default file name's part for a run other than the whole bf16 one: another --dtype, an fp8 --kv-dtype, a
    --logit-cap, some cases (--cases other than 'all', --quick). Each of them wrote kernels_<card>.json over a whole
    run's under the same name."""
    keys = [] if args.cases == "all" else [k.strip() for k in args.cases.split(",") if k.strip()]
    if args.quick and keys == list(T.quick_cases()):  # --quick's own cases (parse_args put them in --cases)
        keys = []
    settings = ([args.dtype] if args.dtype != "bfloat16" else []) + (
        [args.kv_dtype] if args.kv_dtype != "same" else []) + ([f"cap{args.logit_cap:g}"] if args.logit_cap else [])
    return "".join(f"_{s}" for s in settings) + ("_quick" if args.quick else "") + "".join(f"_{k}" for k in keys)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_kernels_out")),
                    help="output folder (default $OUT, else ./bench_kernels_out; results to commit are copied to "
                         "benchmarks/results by hand)")
    ap.add_argument("--tag", default=None,
                    help="file name tag: kernels_<tag>.json/.md (default: the GPU's, h200 or h100 ..., as nvidia-smi "
                         "names it; cpu with --device cpu; then --dtype unless bfloat16, --kv-dtype's fp8, _cap<--logit-cap>, and "
                         "the --cases asked for, or _quick, unless all)")
    ap.add_argument("--commit", default=None, help="git commit to record (else $DEFT_COMMIT, else git describe --always --dirty)")
    ap.add_argument("--cases", default="all",
                    help="comma-separated case keys (see --list), or 'all', or 'design' (DESIGN.md's six), "
                         "or 'low_concurrency' (batches of 1-16 queries) or 'head_dims' (head dims 64, 96, 256), "
                         "neither in 'all'")
    ap.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS),
                    help=f"comma-separated; default {','.join(DEFAULT_PROVIDERS)}; debug: {','.join(DEBUG_PROVIDERS)}")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 cases, short timing")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="float32 only for CPU smoke runs")
    ap.add_argument("--kv-dtype", default="same", choices=["same", "fp8_e4m3", "fp8_e5m2"],
                    help="the KV pool's dtype: the benchmark dtype, or an fp8 cache (--kv-cache-dtype's names) "
                         "that every provider reads with scales 1.0")
    ap.add_argument("--logit-cap", type=float, default=0.0,
                    help="SGLang's tanh soft cap on the scores, for every provider (Gemma-2 uses 50, Grok 30); "
                         "0 = none (default)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--run-len", type=int, default=T.DEFAULT_RUN, help="KV slot run length (1 = fully random slots)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shrink", type=int, default=1, help="divide every node length by this (CPU smoke runs)")
    ap.add_argument("--warmup", type=int, default=None, help="do_bench warmup, ms (default 25; 5 with --quick)")
    ap.add_argument("--rep", type=int, default=None, help="do_bench repetition time, ms (default 100; 20 with --quick)")
    ap.add_argument("--cpu-reps", type=int, default=3)
    ap.add_argument("--plan-reps", type=int, default=None, help="timed plans (default 30; 10 with --quick)")
    ap.add_argument("--no-graph", action="store_true", help="time every provider eagerly")
    ap.add_argument("--hot", action="store_true", help="also record L2-warm do_bench_cudagraph medians")
    ap.add_argument("--cascade-empty-levels", choices=["try", "skip"], default="try",
                    help="cascade on trees whose queries end at different depths: try empty-KV requests "
                         "(checked like every cell) or skip the cell")
    ap.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                    help="run the cases in a child process and restart it after a crash, so that a CUDA error "
                         "(which poisons its process) costs only the rest of that case; auto = yes on CUDA")
    ap.add_argument("--case-timeout", type=int, default=450,
                    help="seconds per case (the first includes FlashInfer JIT compiles) before its process is ended")
    ap.add_argument("--rates", default=None, help=argparse.SUPPRESS)  # "copy_gbps,matmul_tflops" from the parent
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # --quick's shorter timing where these are not given (it overrode them when they were)
    for flag, full, quick in (("warmup", 25, 5), ("rep", 100, 20), ("plan_reps", 30, 10)):
        if getattr(args, flag) is None:
            setattr(args, flag, quick if args.quick else full)
    for flag in ("run_len", "shrink", "cpu_reps", "plan_reps", "rep", "case_timeout"):
        if getattr(args, flag) < 1:  # each divides, or is a count of timings a median is taken over
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        ap.error("--warmup must be at least 0")
    if not (math.isfinite(args.logit_cap) and args.logit_cap >= 0):
        ap.error(f"--logit-cap must be a finite number >= 0 (0 = none), not {args.logit_cap}")
    if args.quick and args.cases == "all":
        args.cases = ",".join(T.quick_cases())
    return args


def child_argv(args, case_keys: str, out_dir: Path, tag: str, meta: dict, providers: list[str]) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--isolate", "no", "--cases", case_keys,
            "--out", str(out_dir), "--tag", tag,
            "--providers", ",".join(providers), "--dtype", args.dtype, "--kv-dtype", args.kv_dtype,
            "--device", args.device, "--logit-cap", repr(args.logit_cap),
            "--run-len", str(args.run_len), "--seed", str(args.seed), "--shrink", str(args.shrink),
            "--warmup", str(args.warmup), "--rep", str(args.rep), "--cpu-reps", str(args.cpu_reps),
            "--plan-reps", str(args.plan_reps), "--cascade-empty-levels", args.cascade_empty_levels,
            "--case-timeout", str(args.case_timeout),
            "--commit", args.commit or "unknown"]
    if meta.get("copy_gbps") and meta.get("matmul_tflops"):
        argv += ["--rates", f"{meta['copy_gbps']!r},{meta['matmul_tflops']!r}"]
    if args.no_graph:
        argv.append("--no-graph")
    if args.hot:
        argv.append("--hot")
    return argv


def shrink_shape(shape, factor: int):
    if factor <= 1:
        return shape
    return T.TreeShape(tuple(max(1, n // factor) if n > 1 else n for n in shape.node_len),
                       shape.node_parent, shape.query_node)


def make_row(case, shape, meta: dict, elem_bytes: int, qo_elem_bytes: int) -> dict:
    model = T.byte_flop_model(shape, case.num_qo_heads, case.num_kv_heads, case.head_dim, elem_bytes, qo_elem_bytes)
    row = {"case": case.name, "key": case.key, "design_shared": case.design_shared,
           "num_qo_heads": case.num_qo_heads, "num_kv_heads": case.num_kv_heads, "head_dim": case.head_dim,
           **model,
           "floor_us": model["unique_bytes"] / (meta["copy_gbps"] * 1e9) * 1e6 if meta["copy_gbps"] else None,
           "path_bytes_floor_us": (model["path_bytes"] / (meta["copy_gbps"] * 1e9) * 1e6
                                   if meta["copy_gbps"] else None),
           "flop_floor_us": (model["flops"] / (meta["matmul_tflops"] * 1e12) * 1e6
                             if meta["matmul_tflops"] else None),
           "providers": {}}
    if case.note:
        row["note"] = case.note
    return row


def _print_case(row: dict) -> None:
    sp = row.get("speedup_vs_best")
    print(f"[bench] {row['key']:12s} floor {_fmt(row['floor_us'])} us, best baseline {row['best_baseline']} "
          f"{_fmt(row['best_baseline_us'])} us, deft {_fmt(row['deft_us'])} us"
          + (f", speedup {sp:.2f}x" if sp else ""), flush=True)


class _Watchdog:
    """Ends a child process whose case runs past --case-timeout, even when the main thread is
    blocked inside a CUDA call (a hung kernel never returns to Python to see a signal)."""

    EXIT_CODE = 124

    def __init__(self, enabled: bool):
        self.deadline = None
        if enabled:
            import threading

            threading.Thread(target=self._watch, daemon=True).start()

    def arm(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def _watch(self) -> None:
        while True:
            time.sleep(1.0)
            if self.deadline is not None and time.monotonic() > self.deadline:
                print("[bench] case timed out: ending this process", flush=True)
                os._exit(self.EXIT_CODE)


def run_cases_here(args, cases, shapes, providers, device, dtype, report) -> None:
    """Every case in this process (the child's job, or --no-isolate)."""
    meta = report["metadata"]
    # One KV pool for every case: twice the runs the largest case needs, so slots spread out.
    hkv = max(c.num_kv_heads for c in cases)
    hd = max(c.head_dim for c in cases)
    runs = max(T.runs_needed(shapes[c.key], args.run_len) for c in cases)
    pool_slots = 2 * runs * args.run_len
    k_pool = torch.randn(pool_slots, hkv, hd, dtype=dtype, device=device).to(pool_dtype(args))
    v_pool = torch.randn(pool_slots, hkv, hd, dtype=dtype, device=device).to(pool_dtype(args))
    meta["pool_slots"] = pool_slots
    meta["pool_bytes"] = 2 * k_pool.numel() * k_pool.element_size()
    workspace = (torch.zeros(FLASHINFER_WORKSPACE, dtype=torch.uint8, device=device)
                 if device.type == "cuda" and any(p.startswith("flashinfer") for p in providers) else None)
    K = _kernels()
    watchdog = _Watchdog(enabled=args.child)
    for case in cases:
        shape = shapes[case.key]
        tree = T.build_tree(shape, pool_slots, args.run_len, args.seed)
        tree.validate()
        k_buffer = k_pool[:, :case.num_kv_heads, :case.head_dim]
        v_buffer = v_pool[:, :case.num_kv_heads, :case.head_dim]
        if not k_buffer.is_contiguous():
            k_buffer, v_buffer = k_buffer.contiguous(), v_buffer.contiguous()
        q = torch.randn(shape.num_queries, case.num_qo_heads, case.head_dim, dtype=dtype, device=device)
        sm_scale = 1.0 / math.sqrt(case.head_dim)
        ref = K.attention_reference(q, k_buffer, v_buffer, tree, sm_scale, logit_cap=args.logit_cap)
        # The floors count the KV cache's bytes and q's and out's (the model's dtype; they differ over fp8).
        row = make_row(case, shape, meta, k_buffer.element_size(), q.element_size())
        report["cases"].append(row)
        write_report(report, args.out, args.tag)  # the parent learns which case a crash hit
        watchdog.arm(args.case_timeout)
        ctx = Ctx(case, tree, tree.kv_indices.to(device), q, k_buffer, v_buffer, sm_scale, device, args, workspace,
                  args.logit_cap)
        for p in providers:
            cell = run_provider(p, ctx, ref)
            row["providers"][p] = cell
            summarize(row, providers)
            write_report(report, args.out, args.tag)
            st = cell.get("status")
            extra = (f"{cell.get('median_us', 0):9.1f} us  rel_err {_fmt_err(cell.get('max_rel_err'))}  "
                     f"{cell.get('timing', '')}" if st in ("ok", "failed_check") else cell.get("reason", "")[:200])
            print(f"[bench] {case.key:12s} {p:19s} {st:12s} {extra}", flush=True)
        del ctx, ref, q
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not args.child:  # the parent prints the merged row
            _print_case(row)
    watchdog.deadline = None  # every case done: nothing left to time out (a caller may go on in this process)


def run_cases_isolated(args, cases, shapes, providers, device, report) -> None:
    """Cases run in a child process; if it dies (a CUDA error poisons its process for good), the
    case it was on keeps its finished cells, the rest of that case is recorded as an error, and a
    fresh child goes on with the following cases. Normally this costs one process start."""
    import tempfile

    meta = report["metadata"]
    tmp = Path(tempfile.mkdtemp(prefix="deft_bench_"))
    elem = torch.empty(0, dtype=pool_dtype(args)).element_size()
    qo_elem = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    remaining = list(cases)
    attempt = 0
    while remaining:
        attempt += 1
        tag = f"part{attempt}"
        argv = child_argv(args, ",".join(c.key for c in remaining), tmp, tag, meta, providers)
        print(f"[bench] child process {attempt}: {', '.join(c.key for c in remaining)}", flush=True)
        stopped = None
        try:
            # The child's watchdog enforces the per-case limit; this one is a backstop.
            rc = subprocess.run(argv, timeout=args.case_timeout * len(remaining) + 120).returncode
        except subprocess.TimeoutExpired:
            rc = -1
        except (SystemExit, KeyboardInterrupt) as e:  # stopped (SIGTERM, ^C): subprocess.run has killed the child
            stopped, rc = e, -2
        why = (f"the case ran past --case-timeout ({args.case_timeout} s)" if rc in (_Watchdog.EXIT_CODE, -1) else
               "the benchmark was stopped during this case" if stopped is not None else
               f"the benchmark process exited with code {rc} during this case (a CUDA error poisons a process)")
        path = tmp / f"kernels_{tag}.json"
        child = json.loads(path.read_text()) if path.exists() else {"cases": [], "metadata": {}}
        rows = child["cases"]  # the child appends a row when it starts a case: a prefix of `remaining`
        for f in DEVICE_FIELDS:  # measured by the first child; later children get the rates passed
            if meta.get(f) is None and child["metadata"].get(f) is not None:
                meta[f] = child["metadata"][f]
        if child["metadata"].get("pool_slots"):
            meta.setdefault("pool_slots_per_child", []).append(child["metadata"]["pool_slots"])
        if rc == 0:
            by_key = {r["key"]: r for r in rows}
            finished = [by_key.get(c.key) or make_row(c, shapes[c.key], meta, elem, qo_elem) for c in remaining]
            remaining = []
        else:
            # Died on its last row's case (or, with no row, before the first case began).
            finished = rows or [make_row(remaining[0], shapes[remaining[0].key], meta, elem, qo_elem)]
            for p in providers:
                finished[-1]["providers"].setdefault(p, {"provider": p, "status": "error", "reason": why})
            remaining = remaining[len(finished):]
        for row in finished:
            summarize(row, providers)
            report["cases"].append(row)
            write_report(report, args.out, args.tag)
            _print_case(row)
        if stopped is not None:  # what the child measured is in the report; the cases it never began are not
            raise stopped


DEVICE_FIELDS = ("gpu", "sm_count", "deft_stage1_kernel", "copy_gbps", "matmul_tflops", "plan_300node_256q_us",
                 "plan_300node_256q_error")


def measure_plan_300(args, device, meta) -> None:
    """Planning cost target of issue 3: 256 queries on a 300-node tree (host work and the copies)."""
    try:
        K = _kernels()
        shape = T.plan_tree_300()
        tr = T.build_tree(shape, 2 * T.runs_needed(shape, args.run_len) * args.run_len, args.run_len, args.seed)
        tr = K.KVTree(tr.kv_indices.to(device), tr.node_indptr, tr.node_parent, tr.query_node)
        kv_dtype = pool_dtype(args)
        K.plan_tree_decode(tr, 32, 8, 128, device=device, kv_dtype=kv_dtype)
        meta["plan_300node_256q_us"] = time_plan(K, tr, T.Case("plan", "plan", shape), device, 100, kv_dtype=kv_dtype)
    except Exception as e:  # noqa: BLE001
        meta["plan_300node_256q_us"] = None
        meta["plan_300node_256q_error"] = f"{type(e).__name__}: {e}"[:300]


def select_cases(spec: str) -> list:
    """The cases ``--cases`` names, in run order: keys and the sets ``all``, ``design``,
    ``low_concurrency`` and ``head_dims``."""
    known = T.every_case()
    if spec == "all":
        return T.all_cases()
    keys = set()
    for key in (k.strip() for k in spec.split(",") if k.strip()):
        if key == "design":
            keys |= {c.key for c in known if c.design_shared} | {"nosharing"}
        elif key == "low_concurrency":
            keys |= {c.key for c in T.low_concurrency_cases()}
        elif key == "head_dims":
            keys |= {c.key for c in T.head_dim_cases()}
        elif key in {c.key for c in known}:
            keys.add(key)
        else:
            raise SystemExit(f"unknown case {key!r}; --list shows them")
    if not keys:  # an empty --cases (an unset variable in a script) wrote a "complete" report of no cases over the last
        raise SystemExit(f"--cases {spec!r} names no case; --list shows them")
    return [c for c in known if c.key in keys]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for c in T.every_case():
            print(f"{c.key:14s} {c.name}  [{c.num_qo_heads}q/{c.num_kv_heads}kv/{c.head_dim}]")
        return 0
    cases = select_cases(args.cases)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    for p in providers:
        if p not in SETUP:
            raise SystemExit(f"unknown provider {p}; known: {', '.join(SETUP)}")
    # The riskiest cells run last in a case: a crash there loses nothing else. DeFT's kernel is
    # the newest code; the cascade with empty-KV levels (spec tree) is the least-trodden API path.
    risk = {"deft": 1, "flashinfer_cascade": 2}
    providers.sort(key=lambda p: risk.get(p, 0))
    want_cuda = args.device.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():  # the results would be a CPU run's under a GPU's name
        raise SystemExit(f"--device {args.device}, but torch sees no CUDA device here; for a CPU smoke run pass "
                         "--device cpu --dtype float16 with TRITON_INTERPRET=1 (benchmarks/README.md)")
    if args.tag is None:
        # torch.device parses "cuda:1" without a CUDA context (an isolating parent must not create one)
        args.tag = _load_sibling("card_tag").card_tag(index=torch.device(args.device).index or 0) if want_cuda else "cpu"
        args.tag += run_suffix(args)
    isolated = not args.child and (args.isolate == "yes" or (args.isolate == "auto" and want_cuda))
    device = torch.device(args.device)  # (an isolating parent never touches it: no context next to the child's)
    dtype = getattr(torch, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    shapes = {c.key: shrink_shape(c.shape, args.shrink) for c in cases}
    args.commit = REPORT_FILES.commit_label(args.commit)

    if not args.child:
        print(f"[bench] device {device}, {len(cases)} cases, providers {providers}", flush=True)
    meta = {
        "gpu": None,
        "sm_count": None,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": args.commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "flashinfer": _version("flashinfer-python") or _version("flashinfer_python"),
        "sglang": _version("sglang"),
        "dtype": args.dtype,
        "kv_dtype": args.kv_dtype,
        "logit_cap": args.logit_cap,
        "deft_stage1_kernel": None,
        "providers": providers,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "timing": "CUDA graph of one call, replayed under triton.testing.do_bench (L2 flushed before every "
                  "replay); eager do_bench for a provider that cannot be captured (cell field 'timing')",
        "quantiles": "median, p20, p80 over do_bench repetitions",
        "tolerance": {"max_abs_err": MAX_ABS_ERR, "max_rel_err_per_query": MAX_REL_ERR,
                      "max_rel_err_per_query_rounding_p_to_the_cache": {
                          p: max_rel_err(args.kv_dtype, p) for p in ROUNDS_P_TO_THE_CACHE},
                      "reference": "attention_reference (fp32) on the same inputs"},
        "kv_layout": f"each node in runs of {args.run_len} consecutive slots, runs shuffled over the pool",
        "inputs": "q, K, V ~ N(0, 1) in the benchmark dtype, sm_scale = 1/sqrt(head_dim)",
        "shrink": args.shrink,
        "isolated_cases": isolated,
        "copy_gbps": None,
        "matmul_tflops": None,
        "complete": False,
    }
    t_start = time.perf_counter()
    report = {"metadata": meta, "cases": []}
    if not isolated:
        if device.type == "cuda":
            meta["gpu"] = torch.cuda.get_device_name(device)
            meta["sm_count"] = torch.cuda.get_device_properties(device).multi_processor_count
        else:
            meta["gpu"] = platform.processor() or "cpu"
        # Which stage-1 kernel deft runs here for head dim 128 (stage1_config), as the table's header says; the
        # head-dim cases' deft cells record their own (setup_deft).
        kmod = _kernels()
        meta["deft_stage1_kernel"] = importlib.import_module(kmod.__name__ + ".tree_decode").stage1_config(
            128, importlib.import_module(kmod.__name__ + ".plan").LARGE_ROWS, dtype, device,
            pool_dtype(args)).kernel
        if args.rates:
            meta["copy_gbps"], meta["matmul_tflops"] = (float(x) for x in args.rates.split(","))
        else:
            meta["copy_gbps"] = measure_copy_gbps(device, args)
            meta["matmul_tflops"] = measure_matmul_tflops(device, dtype, args)
            print(f"[bench] copy {meta['copy_gbps']:.0f} GB/s, matmul {meta['matmul_tflops']:.0f} TFLOP/s",
                  flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the copy test's 4 GiB
            if "deft" in providers:
                measure_plan_300(args, device, meta)
        write_report(report, args.out, args.tag)  # the rates reach the parent even if a case crashes
        run_cases_here(args, cases, shapes, providers, device, dtype, report)
    else:
        # gpu_session.sh's timeout stops the parent with SIGTERM: as SystemExit, so that run_cases_isolated writes
        # what the child measured before the process ends (the child's report is in a temporary folder).
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        try:
            run_cases_isolated(args, cases, shapes, providers, device, report)
        finally:
            signal.signal(signal.SIGTERM, previous)

    meta["complete"] = True
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_report(report, args.out, args.tag)
    if not args.child:
        print(f"[bench] wrote {args.out / f'kernels_{args.tag}.json'} and .md in {meta['wall_s']} s", flush=True)
        gm = report.get("geomean_speedup_design_shared")
        if gm:
            n = sum(1 for r in report["cases"] if r.get("design_shared"))
            print(f"[bench] geomean speedup on {n} of DESIGN.md's 5 shared trees, {geomean_label(report)}: {gm:.2f}x",
                  flush=True)
    if args.child:  # 0: the parent reads the child's exit status as whether it died mid-case
        return 0
    failed = failed_deft_cells(report)
    if failed:
        print(f"[bench] deft did not pass on {', '.join(failed)}", flush=True)
    return 1 if failed else 0


def failed_deft_cells(report: dict) -> list[str]:
    """``case (status)`` for every case whose deft cell did not end checked and correct, a case with no deft cell
    at all ("missing") among them where the run was asked for deft: the run's exit status says so (1), for scripts
    that keep going on a benchmark's success."""
    if "deft" not in report["metadata"]["providers"]:
        return []
    return [f"{r['key']} ({r['providers'].get('deft', {}).get('status', 'missing')})" for r in report["cases"]
            if r["providers"].get("deft", {}).get("status") != "ok"]


if __name__ == "__main__":
    sys.exit(main())
