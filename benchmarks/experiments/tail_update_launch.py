"""Host time of a steady decode step's device update, three ways, in one process (CUDA):

* ``kernel``: ``kernels/tail_update.advance_tails``, one Triton launch (what main runs);
* ``torch_ops``: the same update as four eager torch ops (index_select, index_copy_, index_add_, add);
* ``graph``: those ops captured once in a CUDA graph and replayed (main's way until 8e3fc22; dropped
  because, captured in a server, SGLang's first prefill after /flush_cache crashed).

Median host µs per call over ``--reps`` calls (no synchronisation between calls; the device keeps
up), operands of 256 entries (200 tails) as a 256-request plan's. Writes ``$OUT/tail_update_launch.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from sglang_deft.kernels.tail_update import advance_tails


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=500)
    args = ap.parse_args()
    dev = torch.device("cuda")
    cap, tails, rows, width, kv = 256, 200, 256, 4096, 300_000
    req_to_token = torch.randint(0, 1 << 20, (rows, width), dtype=torch.int32, device=dev)
    kv_indices = torch.zeros(kv, dtype=torch.int32, device=dev)
    items = torch.zeros(8 * 1024, dtype=torch.int32, device=dev)
    host = torch.zeros(4 * cap, dtype=torch.int64)
    host[:tails] = torch.arange(tails) * width
    host[cap:cap + tails] = torch.arange(tails) * 100
    host[cap + tails:2 * cap] = kv - 1
    host[2 * cap:2 * cap + tails] = torch.arange(tails) * 8 + 1
    host[2 * cap + tails:3 * cap] = 1
    host[3 * cap:3 * cap + tails] = 1
    operands = host.to(dev)
    inc32 = torch.zeros(cap, dtype=torch.int32, device=dev)
    new_slots = torch.zeros(cap, dtype=torch.int32, device=dev)

    def torch_ops():
        pos, kv_len, inc = operands[:2 * cap].view(2, cap), operands[2 * cap:3 * cap], operands[3 * cap:]
        torch.index_select(req_to_token.view(-1), 0, pos[0], out=new_slots)
        kv_indices.index_copy_(0, pos[1], new_slots)
        inc32.copy_(inc)
        items.index_add_(0, kv_len, inc32)
        pos += inc

    def kernel():
        advance_tails(req_to_token, operands, kv_indices, items)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch_ops()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        torch_ops()

    results = {}
    for name, fn in (("kernel", kernel), ("torch_ops", torch_ops), ("graph", graph.replay)) * 2:
        operands.copy_(host.to(dev))
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        times = []
        for i in range(args.reps):
            if i % 100 == 0:  # the operands only grow: keep them inside the buffers
                torch.cuda.synchronize()
                operands.copy_(host.to(dev))
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
        results.setdefault(name, []).append(round(statistics.median(times), 1))
    print(json.dumps(results))
    out = Path(os.environ.get("OUT", "."))
    (out / "tail_update_launch.json").write_text(json.dumps(
        {"gpu": torch.cuda.get_device_name(), "reps": args.reps, "median_host_us_per_round": results}, indent=1))


if __name__ == "__main__":
    main()
