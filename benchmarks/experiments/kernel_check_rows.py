"""How far the kernel check's per-row bound (``sglang_deft.kernel_check``: each (query, head) row's difference at most
``ROW_FACTOR`` roundings of its own largest |out|) sits from what the real kernels give, on the benchmark's trees, in
bf16, fp16 (also over an fp8 e4m3 cache) and fp32, so that the bound makes no false alarm on a correct kernel.
``Q_SCALE`` (default 1) scales q: scores like real models' (30-60 at 8), which float32's bound grows with.

On the GPU host, with the overlay first on PYTHONPATH (a script's own directory, not the working one, leads sys.path,
so running it from inside the overlay alone imports the repository's sglang_deft, which has no ``kernels``):
    OV=$(python3 scripts/gpu_e2e.py --make-overlay /tmp/sglang_deft_overlay)
    PYTHONPATH=$OV:$PYTHONPATH OUT=$OUT python3 benchmarks/experiments/kernel_check_rows.py
Writes $OUT/kernel_check_rows.json: per (case, dtype, KV dtype), check_layer's figures on tree_decode's output and
``row_ratio`` (max_row_rel_diff over the bound: 1 is the bound) and ``batch_ratio`` (max_abs_diff over the
batch-wide bound); the run fails (exit 1) if any check is outside the tolerance.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import trees as T  # noqa: E402

from sglang_deft.kernel_check import ROW_FACTOR, allowed_diff, check_layer, roundoff  # noqa: E402
from sglang_deft.kernels import KVTree, plan_tree_decode, tree_decode  # noqa: E402

CASES = os.environ.get("CASES", "p4k_16,p16k_64,p1k_256,tree3,nosharing,spec,p16k_64_h64")
HEAD_DIMS = (64, 128, 256)
Q_SCALE = float(os.environ.get("Q_SCALE", "1"))
DTYPES = {"all": ((torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float8_e4m3fn),
                 (torch.float32, None)),
          "fp16": ((torch.float16, None),), "fp32": ((torch.float32, None),)}


def main() -> int:
    device = torch.device(os.environ.get("DEVICE", "cuda"))  # DEVICE=cpu DTYPES=fp16: a dry run (TRITON_INTERPRET=1)
    out_dir = Path(os.environ.get("OUT", "."))
    rows, worst = [], 0.0
    cases = {c.key: c for c in T.all_cases()}
    for key in CASES.split(","):
        case = cases[key]
        for dtype, kv in DTYPES[os.environ.get("DTYPES", "all")]:
            for head_dim in (HEAD_DIMS if key == "p4k_16" else (case.head_dim,)):
                t0 = time.perf_counter()
                shape = case.shape
                slots = T.runs_needed(shape) * T.DEFAULT_RUN + 64
                tree = T.build_tree(shape, slots, seed=1)
                g = torch.Generator(device="cpu").manual_seed(0)
                hq, hkv = case.num_qo_heads, case.num_kv_heads
                k = torch.randn(slots, hkv, head_dim, generator=g)
                v = torch.randn(slots, hkv, head_dim, generator=g)
                q = (torch.randn(tree.num_queries, hq, head_dim, generator=g) * Q_SCALE).to(device, dtype)
                k, v = ((x.to(kv) if kv is not None else x.to(dtype)).to(device) for x in (k, v))
                dev_tree = KVTree(tree.kv_indices.to(device), tree.node_indptr, tree.node_parent, tree.query_node)
                plan = plan_tree_decode(dev_tree, hq, hkv, head_dim, device, kv_dtype=k.dtype)
                out = tree_decode(q, k, v, plan, head_dim ** -0.5, 0.0)
                row = check_layer(out, q, k, v, dev_tree, head_dim ** -0.5, 0.0, step=0, layer_id=0)
                row.update(case=key, head_dim=head_dim, kv_dtype=str(kv or dtype).removeprefix("torch."),
                           row_ratio=row["max_row_rel_diff"] / (ROW_FACTOR * roundoff(row["dtype"],
                                                                                       row["max_abs_score"])),
                           batch_ratio=row["max_abs_diff"] / allowed_diff(row["dtype"], row["max_abs_out"],
                                                                          row["max_abs_score"]),
                           seconds=round(time.perf_counter() - t0, 2))
                rows.append(row)
                worst = max(worst, row["row_ratio"], row["batch_ratio"])
                print(f"{key:12s} {row['dtype']:9s} kv {row['kv_dtype']:14s} d{head_dim:<4d} row_ratio "
                      f"{row['row_ratio']:.3f} batch_ratio {row['batch_ratio']:.3f} within {row['within_tolerance']}",
                      flush=True)
    report = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "commit": os.environ.get("DEFT_COMMIT"),
              "date": time.strftime("%Y-%m-%d"), "row_factor": ROW_FACTOR, "q_scale": Q_SCALE, "worst_ratio": worst,
              "rows": rows}
    (out_dir / "kernel_check_rows.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"worst ratio to a bound {worst:.3f}; all within: {all(r['within_tolerance'] for r in rows)}")
    return 0 if all(r["within_tolerance"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
