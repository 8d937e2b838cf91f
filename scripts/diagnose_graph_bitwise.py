"""Which tiny-model servers agree bitwise, and from which generated token on they differ.

Written when ``tests/test_cuda_graph_gpu.py::test_servers_with_and_without_cuda_graphs_agree_bitwise``
failed (e66257d to 8691874) although the graphed and the eager deft server planned every decode step
identically (SGLANG_DEFT_TRACE_PLANS). It runs the test's workloads on several servers at once
(``VARIANTS`` below; ``SERVERS=a,b`` picks some) and reports, per pair, the first token whose id or
logprob differs, each server's first logprob per workload, and whether the plan traces are equal.
Its run on the H200 (benchmarks/results/graph_bitwise_diagnosis_h200.json) found the cause: only the
eager deft server with SGLang's piecewise prefill graphs differed, from its first token (a prefill
output); that server made its plan buffers after those graphs were captured.

On the GPU host, with .kit carried (the overlay makes sglang_deft.kernels importable, as in
scripts/gpu_session.sh):
    source .kit/bootstrap.sh && OV=$(python3 scripts/gpu_e2e.py --make-overlay /tmp/ov) \
      && PYTHONPATH=$OV:$PYTHONPATH OUT=$OUT python3 scripts/diagnose_graph_bitwise.py
Writes $OUT/graph_bitwise.json and each server's deft/batch log lines ($OUT/<server>.txt); ~2-3 min
(six servers start together, ~135 s on the H200).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from pathlib import Path

if __name__ == "__main__":  # --help before the test module's import, which skips without a GPU
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import test_cuda_graph_gpu as T  # noqa: E402  (the test's server arguments, workloads and helpers)
from server_group import gpu_package_env, serving  # noqa: E402
from sglang_deft.server_process import ServerProcess  # noqa: E402

KEEP = re.compile(r"deft trace|deft plan buffers|Prefill batch|Decode batch|DeFT decode sharing|tree decode stage 1")


def first_difference(a: list, b: list) -> dict | None:
    """The first (request, token) whose id or logprob differs between two servers' generations, or where one
    answered fewer requests or tokens than the other."""
    for r, ((ids_a, lp_a), (ids_b, lp_b)) in enumerate(zip(a, b)):
        for t, (ia, ib, la, lb) in enumerate(zip(ids_a, ids_b, lp_a, lp_b)):
            if ia != ib or la != lb:
                return {"request": r, "token": t, "ids_differ": ia != ib, "logprobs": [la, lb]}
        if (len(ids_a), len(lp_a)) != (len(ids_b), len(lp_b)):
            return {"request": r, "token": min(len(ids_a), len(ids_b)), "lengths": [len(ids_a), len(ids_b)]}
    if len(a) != len(b):
        return {"request": min(len(a), len(b)), "requests": [len(a), len(b)]}
    return None


# Server variants: name -> arguments added to the test's SERVER_ARGS.
VARIANTS = {
    "deft_graph": ["--decode-attention-backend", "deft"],
    "deft_eager": ["--decode-attention-backend", "deft", "--disable-cuda-graph"],
    "triton_graph": [],
    "triton_eager": ["--disable-cuda-graph"],
    # SGLang 0.5.10 runs prefill in piecewise CUDA graphs by default, with or without --disable-cuda-graph.
    "deft_graph_nopcg": ["--decode-attention-backend", "deft", "--disable-piecewise-cuda-graph"],
    "deft_eager_nopcg": ["--decode-attention-backend", "deft", "--disable-cuda-graph",
                         "--disable-piecewise-cuda-graph"],
}


def main() -> int:
    out = Path(os.environ.get("OUT", "graph_bitwise_out"))
    out.mkdir(parents=True, exist_ok=True)
    env, cwd = gpu_package_env()
    env["SGLANG_DEFT_TRACE_PLANS"] = "1"
    names = os.environ.get("SERVERS", ",".join(VARIANTS)).split(",")
    model = ["--model-path", str(T.server_test_model())]  # (the test's fixture adds it to SERVER_ARGS, as here)
    servers = {name: ServerProcess(name, model + T.SERVER_ARGS + VARIANTS[name], out / f"{name}.log", cwd=cwd,
                                   env=env)
               for name in names}
    with serving(servers, 600):
        startup = {name: len(T.prefill_batches(s)) for name, s in servers.items()}
        results = {name: T.run_workloads(s) for name, s in servers.items()}
        batches = {name: T.prefill_batches(s)[startup[name]:] for name, s in servers.items()}
        logs = {name: s.log() for name, s in servers.items()}
    report = {"pairs": {}, "same_prefill_batches": {},
              "first_token": {name: {w: r[w][0][1][0] for w in T.WORKLOADS} for name, r in results.items()}}
    for a, b in itertools.combinations(servers, 2):
        report["same_prefill_batches"][f"{a} vs {b}"] = batches[a] == batches[b]
        report["pairs"][f"{a} vs {b}"] = {w: first_difference(results[a][w], results[b][w]) for w in T.WORKLOADS}
    traces = {name: [re.sub(r"^\[[^]]*\] |deft trace \w+", "", line) for line in log.splitlines() if "deft trace" in line]
              for name, log in logs.items()}
    report["plans_equal"] = {f"{a} vs {b}": traces[a] == traces[b] for a, b in itertools.combinations(servers, 2)}
    for name, log in logs.items():
        (out / f"{name}.txt").write_text("\n".join(line for line in log.splitlines() if KEEP.search(line)))
        (out / f"{name}.log").unlink()
    (out / "graph_bitwise.json").write_text(json.dumps(report, indent=1))
    for pair, diffs in report["pairs"].items():
        print(pair, "plans equal" if report["plans_equal"][pair] else "PLANS DIFFER",
              {w: "equal" if d is None else f"differs at request {d['request']} token {d['token']}"
               for w, d in diffs.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
