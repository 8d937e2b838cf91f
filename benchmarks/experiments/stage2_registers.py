"""Registers and spills of the stage-2 merge kernel as compiled on this GPU (each shape a step launches),
after a few steps of the benchmark's 1k x 256 tree. Stage 2 is held to <= 64 registers so that 32
one-warp merges fit on an SM (kernels/tree_decode.py); run it after a change to that kernel.

    python3 benchmarks/experiments/stage2_registers.py   (GPU; from the overlay, as gpu_session.sh runs tests)
"""
import sys
from pathlib import Path

import importlib

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import trees  # noqa: E402
from sglang_deft.kernels import plan_tree_decode, tree_decode  # noqa: E402
td = importlib.import_module("sglang_deft.kernels.tree_decode")  # the package exports a function of that name


def main() -> None:
    case = next(c for c in trees.all_cases() if c.key == "p1k_256")
    slots = case.shape.unique_tokens * 2
    host = trees.build_tree(case.shape, slots)
    tree = type(host)(host.kv_indices.cuda(), host.node_indptr, host.node_parent, host.query_node)
    hq, hkv, d = case.num_qo_heads, case.num_kv_heads, case.head_dim
    q = torch.randn(tree.num_queries, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(slots, hkv, d, device="cuda", dtype=torch.bfloat16)
    plan = plan_tree_decode(tree, hq, hkv, d, "cuda")
    tree_decode(q, k, k, plan, d ** -0.5)
    torch.cuda.synchronize()
    for caches in td._tree_decode_stage2.device_caches.values():
        for kernel in caches[0].values():
            kernel._init_handles()
            print(f"stage 2 {kernel.metadata.num_warps} warp(s): {kernel.n_regs} registers, {kernel.n_spills} spills")


if __name__ == "__main__":
    main()
