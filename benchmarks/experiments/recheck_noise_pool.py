"""Recompute the divergence allowance of every committed ``e2e_correctness*.json`` with the ``n_gt_1``
workload's identical greedy copies counted once in the model-wide noise rate (``scripts/gpu_e2e.py``'s
``distinct_pairs``, session 38); before, its k samples of one prompt counted k times. Prints each workload
whose allowance changes and whether deft's divergences are still within it, and (session 39) whether each
noise pair passes the noise-floor check as far as the JSON records it. Exits 1 if a workload the JSON records as
passing fails the recheck; the workloads it records as failing (a committed run that failed) are listed apart.

    python3 benchmarks/experiments/recheck_noise_pool.py

From the JSON alone (it keeps each request's ``diverged_at``, not its tokens): the n_gt_1 copies count
as one request when they all diverged at the same step or none did, which is what identical copies do.
"""
from __future__ import annotations

import glob
import json
import math
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from gpu_e2e import Criterion  # noqa: E402  (stdlib only at import)


def main() -> int:
    failed = recorded_failures = 0
    for path in sorted(glob.glob(str(RESULTS / "e2e_correctness*.json"))):
        report = json.loads(Path(path).read_text())
        params = report.get("criterion_params") or {}
        k, frac = params.get("k", 2.0), params.get("div_floor_frac", 0.125)
        if params.get("noise_pool", "model") != "model":
            continue
        lines = []
        for model, m in (report.get("models") or {}).items():
            workloads = m.get("workloads") or {}
            if not workloads or any("noise" not in w for w in workloads.values()):
                continue  # absolute criterion: nothing pooled
            divergences = requests = 0
            for name, w in workloads.items():
                at = w["noise"]["diverged_at"]
                if name == "n_gt_1" and len(set(map(str, at))) == 1:
                    at = at[:1]
                requests += len(at)
                divergences += sum(x is not None for x in at)
            rate = divergences / max(1, requests)
            # The ceiling of the model's dtype (since 2026-12-07): the JSON's own, else the 8b shape's bf16 or the
            # tiny models' --tiny-dtype.
            dtype = m.get("dtype") or ("bfloat16" if model.startswith("8b") else report.get("tiny_dtype", "float16"))
            noise_lp_max = Criterion().for_dtype(dtype).noise_lp_max
            for name, w in workloads.items():
                rel, n = w["relative"], w["requests"]
                allowed = round(k * max(rel["noise_divergences"], rate * n) + max(1, math.ceil(frac * n)), 3)
                ok = rel["deft_divergences"] <= allowed
                # Session 39's noise-floor check, as far as the JSON shows it: the noise pair's difference at
                # most the dtype's noise_lp_max and its widest divergence a near-tie at the workload's scale (whether its
                # tokens were in the top-k is not recorded before session 39).
                noise_gap = w["noise"].get("max_tie_gap")
                noise_ok = (w["noise"]["max_abs_logprob_diff"] <= noise_lp_max
                            and (noise_gap is None or noise_gap <= rel["allowed_tie_gap"]))
                if not noise_ok:
                    lines.append(f"  {model}/{name}: noise floor unusable (diff {w['noise']['max_abs_logprob_diff']:.4f},"
                                 f" widest divergence gap {noise_gap} against {rel['allowed_tie_gap']:.4f})")
                ok = ok and noise_ok
                recorded = bool(w.get("ok"))
                failed += recorded and not ok
                recorded_failures += not recorded and not ok
                if allowed != rel["allowed_divergences"] or not ok:
                    verdict = "ok" if ok else ("FAILS" if recorded else "fails, as recorded")
                    lines.append(f"  {model}/{name}: deft {rel['deft_divergences']} divergences, allowed "
                                 f"{rel['allowed_divergences']} -> {allowed:g}: {verdict}")
        if lines:
            print(Path(path).name, *lines, sep="\n")
    print(f"{failed} workloads recorded as passing fail the recheck" if failed
          else "every recorded pass holds (n_gt_1 counted once, noise floor checked)",
          f"{recorded_failures} recorded failures fail again", sep="; ")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
