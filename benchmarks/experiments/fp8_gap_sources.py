"""Why deft's logprobs sit further from the reference over an fp8 KV cache than over a float16 one.

test_e2e_cpu.py's fp8 test on the H200: deft against torch_native decode differ by up to 0.043 in
logprob over an fp8_e4m3 cache and by under 0.009 over a float16 cache (fp8_kv_gpu_tests_h200.json).
Two explanations predict different things:
  (a) deft reads fp8 less accurately than torch_native does: then a decode computed in fp32 from the
      same cache (deft's PyTorch reference, ``SGLANG_DEFT_DECODE_IMPL=reference``) sits close to
      torch_native and far from deft's kernels;
  (b) any rounding difference is carried further over an fp8 cache (each new token's K/V, written from
      slightly different hidden states, can round to a neighbouring fp8 value, 1/16 apart instead of
      1/2048): then the fp32 decode sits as far from both as they sit from each other, and the gaps
      grow with the step rather than starting large.

Per cache dtype, three servers on the same model (triton prefill, eager, no overlap scheduler): deft's
kernels, deft's fp32 reference and torch_native; the test's workloads (common prefix prefilled first);
per pair the largest logprob gap at each generated position, and the gaps of a larger sample (more
prompts, longer generations) as quantiles, so that one rounding event does not decide the comparison. Run on the GPU host from the overlay:

    SGLANG_DEFT_E2E_DEVICE=cuda python3 benchmarks/experiments/fp8_gap_sources.py --heads 16,4,64 --out F.json
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("SGLANG_DEFT_E2E_DEVICE", "cuda")

from sglang_deft.server_process import ServerProcess  # noqa: E402
from server_group import serving  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

import test_e2e_cpu as e2e  # noqa: E402

DECODES = {
    "kernels": (["--decode-attention-backend", "deft"], {}),
    "fp32": (["--decode-attention-backend", "deft"], {"SGLANG_DEFT_DECODE_IMPL": "reference"}),
    "torch_native": (["--decode-attention-backend", "torch_native"], {}),
}


def server_args(model: Path, kv_dtype: str) -> list[str]:
    args = [str(model) if a == str(e2e.MODEL) else a for a in e2e.SERVER_ARGS]
    return args + ["--kv-cache-dtype", kv_dtype, "--disable-cuda-graph", "--disable-overlap-schedule"]


def workload(server: ServerProcess, extra_prompts: int, extra_tokens: int) -> dict[str, list]:
    """The fp8 test's requests (4 prompts on a common prefix, prefilled alone first, then n=4) and, for
    a larger sample, ``extra_prompts`` more on the same prefix, ``extra_tokens`` tokens each."""
    common = e2e.CONTEXT + " Question "
    server.generate({"text": common, "sampling_params": e2e.greedy(max_new_tokens=0)})
    outs = server.generate({"text": [common + f"{c}:" for c in "ABCD"], "sampling_params": e2e.greedy(),
                            "return_logprob": True})
    outs += server.generate({"text": e2e.CONTEXT + " Summary:", "sampling_params": e2e.greedy(n=4),
                             "return_logprob": True})
    more = server.generate({"text": [common + f"{i}:" for i in range(extra_prompts)],
                            "sampling_params": e2e.greedy(max_new_tokens=extra_tokens), "return_logprob": True})
    return {"test": [e2e.ids_and_logprobs(o["meta_info"]) for o in outs],
            "sample": [e2e.ids_and_logprobs(o["meta_info"]) for o in outs + more]}


def gap_quantiles(a, b) -> dict:
    """All compared gaps of a larger sample pooled: count, median, 90th and 99th percentile, largest."""
    gaps = sorted(abs(x - y) for (ids, lps), (ref_ids, ref_lps) in zip(a, b)
                  for i, (x, y) in enumerate(zip(lps, ref_lps))
                  if ids[:i + 1] == ref_ids[:i + 1])
    q = lambda f: round(gaps[min(len(gaps) - 1, int(f * len(gaps)))], 6)  # noqa: E731
    return {"gaps": len(gaps), "median": q(0.5), "p90": q(0.9), "p99": q(0.99), "largest": round(gaps[-1], 6)}


def gaps_by_position(a, b) -> dict:
    """Per generated position, the largest |logprob gap| over the sequences, compared up to where their
    tokens part; and how many sequences parted."""
    per_pos: dict[int, float] = {}
    parted = 0
    for (ids, lps), (ref_ids, ref_lps) in zip(a, b):
        same = next((i for i, (x, y) in enumerate(zip(ids, ref_ids)) if x != y), min(len(ids), len(ref_ids)))
        parted += same < min(len(ids), len(ref_ids))
        for i in range(same):
            per_pos[i] = max(per_pos.get(i, 0.0), abs(lps[i] - ref_lps[i]))
    return {"largest": round(max(per_pos.values()), 6), "by_position": [round(per_pos[i], 6) for i in sorted(per_pos)],
            "sequences_parted": parted}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", default="", help="Q,KV,D of the tiny model's variant ('' = the bundled model)")
    ap.add_argument("--kv-dtypes", default="fp8_e4m3,auto")
    ap.add_argument("--extra-prompts", type=int, default=24)
    ap.add_argument("--extra-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model = tiny_model(args.heads or None)
    base_env, cwd = e2e.server_launch()["env"], e2e.server_launch()["cwd"]
    log_dir = Path(tempfile.mkdtemp(prefix="fp8_gap_sources_"))
    servers = {}
    for kv_dtype in args.kv_dtypes.split(","):
        for name, (extra, env) in DECODES.items():
            key = f"{kv_dtype}/{name}"
            servers[key] = ServerProcess(key.replace("/", "_"), server_args(model, kv_dtype) + extra,
                                         log_dir / f"{key.replace('/', '_')}.log", cwd=cwd, env={**base_env, **env})
    report = {"heads": args.heads or "bundled (8,2,32)", "model": str(model), "kv_dtypes": {}}
    with contextlib.ExitStack() as stack:
        stack.enter_context(serving(servers, e2e.STARTUP_TIMEOUT_S))
        for kv_dtype in args.kv_dtypes.split(","):
            outs = {name: workload(servers[f"{kv_dtype}/{name}"], args.extra_prompts, args.extra_tokens)
                    for name in DECODES}
            report["kv_dtypes"][kv_dtype] = {
                f"{x} vs {y}": {**gaps_by_position(outs[x]["test"], outs[y]["test"]),
                                "sample": gap_quantiles(outs[x]["sample"], outs[y]["sample"])}
                for x, y in itertools.combinations(DECODES, 2)}
        for key, server in servers.items():
            log = server.log()
            if "kernels" in key or "fp32" in key:
                assert "decode_backend=deft" in log, f"{key}: deft did not decode"
    args.out.write_text(json.dumps(report, indent=1))
    for kv_dtype, pairs in report["kv_dtypes"].items():
        for pair, g in pairs.items():
            print(f"{kv_dtype:9s} {pair:26s} test: largest {g['largest']:.4f} parted {g['sequences_parted']} "
                  f"by position {g['by_position']}; sample: {g['sample']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
