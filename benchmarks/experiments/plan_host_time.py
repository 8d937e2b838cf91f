"""Where ``plan_tree_decode``'s host time goes on the GPU host (issue 3's 300-node, 256-query target).

Times, in one process and alternating rounds, the whole call as ``bench_kernels.py`` does (metadata on
the CPU, kv_indices on the device, synchronised after) for this checkout's kernels and, with
``OLD=dir``, for the kernels package in ``dir`` (e.g. ``git archive <sha> kernels | tar -x -C dir``);
then its parts: a planner re-planning the same tree, the schedule alone (``build_schedule``: with OLD,
also the old one), the device allocations, the upload, an empty synchronise. Last, 100 calls back to
back (as the benchmark times them) in four conditions: as they come, right after ~1 s of waiting for the
device, without the garbage collector, and with flashinfer's and SGLang's modules loaded (with and
without the collector's objects frozen), by ``bench_kernels.time_plan``: wall time and the thread's
CPU time (``cpu_*``).

On the GPU host (the overlay on PYTHONPATH, as scripts/gpu_session.sh builds it):
    OLD=.scratch/old OUT=$OUT python3 benchmarks/experiments/plan_host_time.py
Writes $OUT/plan_host_time.json (medians in us).
"""
import gc
import importlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import bench_kernels as B  # noqa: E402
import trees as T  # noqa: E402
from sglang_deft import kernels as K  # noqa: E402
from sglang_deft.kernels import plan as P  # noqa: E402

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
shape = T.plan_tree_300()
built = T.build_tree(shape, 2 * T.runs_needed(shape) * T.DEFAULT_RUN)
tree = K.KVTree(built.kv_indices.to(dev), built.node_indptr, built.node_parent, built.query_node)
ni, npar, qn = (np.asarray(t.numpy(), np.int32) for t in (built.node_indptr, built.node_parent, built.query_node))

variants = {"plan_tree_decode": lambda: K.plan_tree_decode(tree, 32, 8, 128, device=dev)}
if os.environ.get("OLD"):
    sys.path.insert(0, os.environ["OLD"])
    old = importlib.import_module("kernels")
    old_tree = old.KVTree(tree.kv_indices, tree.node_indptr, tree.node_parent, tree.query_node)
    variants["plan_tree_decode_old"] = lambda: old.plan_tree_decode(old_tree, 32, 8, 128, device=dev)
warm = K.TreeDecodePlanner(32, 8, 128)
variants["planner_same_tree"] = lambda: warm.plan(tree, dev)  # a held planner (the server's way)
sched_kw = dict(group_size=4, head_dim=128, kv_elem_bytes=2, num_kv_heads=8, num_sms=132)
variants["schedule"] = lambda: P.build_schedule(ni, npar, qn, **sched_kw)  # unpacked, as the tests use it
if os.environ.get("OLD"):
    old_plan = importlib.import_module("kernels.plan")
    variants["schedule_old"] = lambda: old_plan.build_schedule(ni, npar, qn, **sched_kw)
host = np.zeros(4096, np.int32)
ring = P.thread_staging_ring(dev)
variants["upload_16KB"] = lambda: ring.upload(host)
variants["three_empty"] = lambda: (torch.empty(1000, 32, 128, device=dev), torch.empty(1000, 32, device=dev),
                                   torch.empty(4096, dtype=torch.int32, device=dev))
variants["sync_only"] = lambda: None

times = {n: [] for n in variants}
for _ in range(5):
    for name, fn in variants.items():
        for _ in range(60):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e6)


report = {n: B._quantiles_us(t) for n, t in times.items()}
# The same call timed as bench_kernels.py times it (its median of 100 calls came out 573 us at 8691874,
# twice this script's; then with one untimed call first, as here), in the conditions it meets there:
# after the device kept the host waiting, without the garbage collector, and with the benchmark's other
# imports loaded. time_plan reports the thread's CPU time of the same calls too (cpu_*).
case = T.Case("plan", "plan", shape)


def timed(name):
    report[name] = B.time_plan(K, tree, case, dev, 100, warmup=1)


timed("straight")
if dev.type == "cuda":
    torch.cuda._sleep(2_000_000_000)  # ~1 s of device work the host waits for, as after the rate tests
    sync()
    timed("straight_after_device_wait")
gc.disable()
timed("straight_gc_disabled")
gc.enable()
for mod in ("flashinfer", "sglang.srt.layers.attention.triton_ops.decode_attention"):
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001
        print(f"import {mod}: {e}")
timed("straight_with_imports")
gc.collect()
gc.freeze()
timed("straight_with_imports_gc_frozen")
gc.unfreeze()
report["device"] = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
print(json.dumps(report, indent=1))
json.dump(report, open(Path(os.environ.get("OUT", "/tmp")) / "plan_host_time.json", "w"), indent=1)
