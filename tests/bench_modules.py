"""benchmarks/trees.py and benchmarks/bench_kernels.py as modules, loaded once per process for every test
file that reads them (bench_kernels imports trees under the same registered name), and the random
q / K / V their small cases run on."""
from __future__ import annotations

import torch
from repo_modules import REPO, load_module

T = load_module("deft_bench_trees", REPO / "benchmarks" / "trees.py")
BENCH = load_module("deft_bench_kernels", REPO / "benchmarks" / "bench_kernels.py")


def random_qkv(num_queries: int, slots: int, seed: int, q_heads: int = 8, kv_heads: int = 2, dim: int = 16,
               dtype: torch.dtype = torch.float32):
    """Seeded q [num_queries, q_heads, dim] and a K / V pool [slots, kv_heads, dim] (K, V drawn first)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(slots, kv_heads, dim, generator=g).to(dtype)
    v = torch.randn(slots, kv_heads, dim, generator=g).to(dtype)
    q = torch.randn(num_queries, q_heads, dim, generator=g).to(dtype)
    return q, k, v
