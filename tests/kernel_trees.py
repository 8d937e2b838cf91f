"""Small KV trees for kernel tests: named shapes with the edge cases the kernels must handle."""
from __future__ import annotations

import torch

from sglang_deft.kernels import KVTree


def make_tree(parent: list[int], lengths: list[int], query_node: list[int], pool: int | None = None,
              seed: int = 0) -> KVTree:
    """A tree whose nodes hold distinct KV slots drawn at random from a pool."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    pool = pool or max(2 * total, 16)
    kv = torch.randperm(pool, generator=g)[:total].to(torch.int32)
    indptr = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    indptr[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return KVTree(kv, indptr, torch.tensor(parent, dtype=torch.int32), torch.tensor(query_node, dtype=torch.int32))


def random_forest(num_nodes: int, num_queries: int, max_len: int, seed: int, roots: int = 2) -> KVTree:
    g = torch.Generator().manual_seed(seed)
    parent = [-1 if i < roots else int(torch.randint(0, i, (1,), generator=g)) for i in range(num_nodes)]
    lengths = torch.randint(0, max_len + 1, (num_nodes,), generator=g).tolist()
    qnode = torch.randint(0, num_nodes, (num_queries,), generator=g).tolist()
    return make_tree(parent, lengths, qnode, seed=seed)


def named_trees() -> dict[str, KVTree]:
    chain = 64
    return {
        "one_node": make_tree([-1], [37], [0, 0, 0]),
        "one_token": make_tree([-1], [1], [0]),
        "deep_chain_64": make_tree([-1] + list(range(chain - 1)), [3] * chain, [chain - 1, chain - 1, 10]),
        "fanout_256": make_tree([-1] + [0] * 256, [129] + [1] * 256, list(range(1, 257))),
        "odd_lengths": make_tree([-1, 0, 0, 1, 1], [129, 7, 1, 65, 33], [3, 4, 2, 3]),
        "inner_queries": make_tree([-1, 0, 1, 1, 2], [40, 1, 1, 1, 1], [0, 1, 2, 3, 4, 4]),
        "forest": make_tree([-1, -1, 0, 1, 1], [20, 31, 5, 6, 7], [2, 3, 4, 0]),
        "unused_and_empty_nodes": make_tree([-1, 0, 0, 1, 2], [17, 0, 9, 5, 3], [3, 3]),
        # Queries 0, 2, 3, 5 have no KV on their paths (as CUDA-graph padding queries): zeros.
        "empty_paths": make_tree([-1, 0, -1, 2, -1], [0, 5, 0, 0, 4], [0, 1, 2, 3, 1, 3, 4]),
        "no_sharing": make_tree([-1, -1, -1], [70, 1, 130], [0, 1, 2]),
        "random_forest": random_forest(30, 24, 40, seed=3),
    }
