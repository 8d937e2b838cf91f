"""Scratch: which part of (stage 1 with counts, stage 2 spinning, launched by PDL) hangs in a CUDA graph.
VARIANT=A: spin, no PDL; B: spin + PDL; C: no spin + PDL; E: eager spin + PDL. Prints per replay."""
import os
import sys
from pathlib import Path

import torch
import triton

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
import kernel_trees as KT  # noqa: E402
from sglang_deft import kernels as K  # noqa: E402
import importlib  # noqa: E402
TD = importlib.import_module("sglang_deft.kernels.tree_decode")

var = os.environ["VARIANT"]
spin, pdl = {"A": (True, False), "B": (True, True), "C": (False, True), "E": (True, True), "API": (True, True)}[var]
hq, hkv, d = 32, 8, 128
torch.manual_seed(0)
if os.environ.get("CASE", "one") == "one":
    tree = KT.make_tree([-1, 0, 0], [40, 5, 7], [1, 2])
else:
    tree = KT.make_tree([-1] + [0] * 16, [4096] + [256] * 16, list(range(1, 17)))
tree = K.KVTree(tree.kv_indices.cuda(), tree.node_indptr, tree.node_parent, tree.query_node)
Sn = int(tree.kv_indices.max()) + 1
B = tree.query_node.numel()
q = torch.randn(B, hq, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(Sn, hkv, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
plan = K.plan_tree_decode(tree, hq, hkv, d)
ref = K.attention_reference(q, k, v, tree, 0.1)
out = torch.empty_like(q)
cfg = TD.stage1_config(d, plan.large_rows)
po, pl = plan.partial_out, plan.partial_lse


def step():
    if var == "API":
        K.tree_decode(q, k, v, plan, 0.1, out=out)
        return
    TD._tree_decode_stage1[(plan.num_kv_heads, plan.grid_items)](
        q, k, v, plan.kv_indices, plan.qperm, plan.items, plan.counts, po, pl, plan.merge_count,
        0.1, 0.0, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        po.stride(0), po.stride(1), pl.stride(0), plan.merge_count.stride(0),
        GROUP=plan.group_size, HEAD_DIM=d, BLOCK_D=d, LARGE_M=plan.large_rows, SMALL_M=16,
        LARGE_N=cfg.block_n_large, SMALL_N=cfg.block_n_small, USE_CAP=False, IEEE=False, TILES=0, OVERLAP=True,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    TD._tree_decode_stage2[(plan.grid_queries, hq)](
        po, pl, plan.merge_indptr, plan.merge_slots, plan.counts, plan.merge_count, out,
        po.stride(0), po.stride(1), pl.stride(0), plan.merge_count.stride(0), out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=d, BLOCK_P=16, OVERLAP=spin, num_warps=2, **({"launch_pdl": True} if pdl else {}))


for i in range(2):
    step()
    torch.cuda.synchronize()
print(var, "eager ok, err", float((out.float() - ref.float()).abs().max()), "counts", int(plan.merge_count.abs().sum()), flush=True)
if var == "E":
    sys.exit(0)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    step()
print(var, "captured; counts", int(plan.merge_count.abs().sum()), flush=True)
flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda")
for i in range(int(os.environ.get("N", 3))):
    flush.zero_()
    g.replay()
    torch.cuda.synchronize()
    print(var, "replay", i, "err", float((out.float() - ref.float()).abs().max()), "counts", int(plan.merge_count.abs().sum()), flush=True)
