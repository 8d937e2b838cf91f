"""Host time of the deft backend's per-step work, outside a server: what ``plan_host_us`` in the
server's sharing line measures, broken down.

Per decode step of a CUDA-graph replay (the default), ``DeftAttnBackend.deft_prepare_graph_replay``
builds the KV tree from the radix tree (``DecodeKVTreeBuilder``) and plans it into the graphs'
fixed buffers (``plan_graph_step``). This script makes the same calls on the batches of
``bench_e2e.py``'s fork cases, driven through real SGLang memory objects (``tests/radix_sim.py``:
radix cache, request-to-token pool, requests), and times them per step:

* ``idle``: the device has nothing queued;
* ``busy`` (CUDA only): a ~3 ms device kernel is queued first, as in the server, where the previous
  step is still running while the next one is planned. A host-to-device copy that waits for the
  device shows up here.

Run: ``python benchmarks/bench_step_host.py [--device cuda] [--out DIR]`` (CPU: the device ops run
on the host, so only the Python/numpy part means anything).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # radix_sim: real SGLang memory objects on the host

CASES = {  # key: (shared prefix tokens, branches, private tokens per branch) as in bench_e2e.py
    "p16k_64": (16000, 64, 8),
    "p4k_64": (4000, 64, 8),
    "p1k_256": (1000, 256, 8),
    "nosharing_64x2k": (0, 64, 2048),
}
HEADS = (32, 8, 128)  # llama3-8b: q heads, kv heads, head_dim
MAX_BS = 256  # --cuda-graph-max-bs on the H200


def make_batch(prefix: int, branches: int, private: int, steps: int):
    from radix_sim import RadixSim

    sim = RadixSim(max_reqs=branches, max_context=prefix + private + steps + 8,
                   kv_slots=prefix + branches * (private + steps + 8))
    prompt = sim.tokens(prefix)
    if prefix:
        sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.fresh(private)) for _ in range(branches)])
    return sim, reqs


def run_case(key: str, device: torch.device, steps: int, warmup: int, busy: bool) -> dict:
    from sglang_deft.kernels import TreeDecodePlanner
    from sglang_deft.kv_tree_builder import DecodeKVTreeBuilder, build_decode_kv_tree
    from sglang_deft.tree_attention import new_graph_plan, plan_graph_step, plan_limits

    prefix, branches, private = CASES[key]
    sim, reqs = make_batch(prefix, branches, private, steps + warmup)
    hq, hkv, d = HEADS
    limits = plan_limits(MAX_BS, hq, hkv, device)
    graph_plan = new_graph_plan(limits, MAX_BS, sim.kv_slots, hq, hkv, d, torch.bfloat16, device)
    planner = TreeDecodePlanner(hq, hkv, d, kv_dtype=torch.bfloat16)
    r2t = sim.req_to_token.to(device)
    builder = DecodeKVTreeBuilder(r2t)  # the backend's: keeps the last step's radix part
    build_us, plan_us, total_us = [], [], []
    for step in range(steps + warmup):
        seq_lens = sim.prepare_decode(reqs)
        r2t.copy_(sim.req_to_token)  # the server's table lives on the device (not timed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            if busy:
                torch.cuda._sleep(6_000_000)  # ~3 ms at H200 clocks: the previous step, still running
        t0 = time.perf_counter()
        built = builder.build(reqs, seq_lens, kv_out=graph_plan.kv_indices)
        t1 = time.perf_counter()
        if plan_graph_step(graph_plan, built.tree, branches, torch.bfloat16, planner) is None:
            raise RuntimeError(f"{key}: the step does not fit the graph buffers")
        t2 = time.perf_counter()
        if step in (0, 1, steps + warmup - 1):  # the device-built tree against a fresh host build
            want = build_decode_kv_tree(reqs, sim.req_to_token, seq_lens).tree
            for name in ("kv_indices", "node_indptr", "node_parent", "query_node"):
                if not torch.equal(getattr(built.tree, name).cpu(), getattr(want, name)):
                    raise AssertionError(f"{key} step {step}: {name} differs from a fresh build on the host")
        if step >= warmup:
            build_us.append(1e6 * (t1 - t0))
            plan_us.append(1e6 * (t2 - t1))
            total_us.append(1e6 * (t2 - t0))
        sim.finish_decode(reqs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    med = statistics.median
    return {"case": key, "batch": branches, "nodes": built.tree.num_nodes, "kv_tokens": built.unique_tokens,
            "mode": "busy" if busy else "idle", "checked_against_fresh_build": True, "build_us": round(med(build_us), 1),
            "plan_us": round(med(plan_us), 1), "total_us": round(med(total_us), 1),
            "total_us_p90": round(sorted(total_us)[int(0.9 * len(total_us))], 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help="writes step_host_<device>.json there")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if not torch.cuda.is_available():  # SGLang importable without CUDA, as in the tests
        import sglang_deft.cpu_compat

        sglang_deft.cpu_compat.install()
    rows = []
    for key in args.cases.split(","):
        for busy in ([False, True] if device.type == "cuda" else [False]):
            r = run_case(key, device, args.steps, args.warmup, busy)
            rows.append(r)
            print(f"{r['case']:>16} B={r['batch']:<4} {r['mode']:<4} nodes={r['nodes']:<4} "
                  f"build {r['build_us']:7.1f} us  plan {r['plan_us']:7.1f} us  total {r['total_us']:7.1f} us "
                  f"(p90 {r['total_us_p90']:.1f})", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        (args.out / f"step_host_{device.type}.json").write_text(json.dumps(
            {"device": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": os.environ.get("DEFT_COMMIT"),
             "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
