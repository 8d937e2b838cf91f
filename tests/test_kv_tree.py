"""KVTree.validate: every structural invariant is checked, and a broken one is named."""
from __future__ import annotations

import pytest
import torch

from sglang_deft.kernels import KVTree


def tree(kv=6, indptr=(0, 4, 6), parent=(-1, 0), qnode=(1, 0), dtype=torch.int32):
    i32 = lambda x: torch.tensor(x, dtype=dtype)  # noqa: E731
    kv_indices = torch.arange(kv, dtype=dtype) if isinstance(kv, int) else kv
    return KVTree(kv_indices, i32(indptr), i32(parent), i32(qnode))


@pytest.mark.parametrize("t", [
    tree(),
    tree(kv=0, indptr=(0,), parent=(), qnode=()),  # no nodes, no queries
    tree(kv=6, indptr=(0, 0, 6, 6), parent=(-1, 0, 1), qnode=(2, 0, 0)),  # empty nodes, a query on each
    tree(indptr=(0, 4, 6), parent=(-1, -1), qnode=()),  # two roots, no queries
], ids=["fork", "empty_forest", "empty_nodes", "roots_without_queries"])
def test_valid_trees_pass(t):
    t.validate()


@pytest.mark.parametrize("t, match", [
    (tree(dtype=torch.int64), "KVTree.kv_indices must be a 1-D int32 tensor, got torch.int64"),
    (tree(kv=torch.arange(6, dtype=torch.int32).view(2, 3)), r"KVTree.kv_indices must be a 1-D int32 tensor.*\(2, 3\)"),
    (KVTree(torch.arange(6, dtype=torch.int32), torch.tensor([0, 4, 6], dtype=torch.int32),
            torch.tensor([-1, 0]), torch.tensor([1], dtype=torch.int32)), "KVTree.node_parent must be a 1-D int32"),
    (tree(indptr=(0, 4, 5, 6)), "node_indptr has 4 entries for 2 nodes"),
    (tree(indptr=(0, 6)), "node_indptr has 2 entries for 2 nodes"),
    (tree(indptr=(2, 4, 6)), "must start at 0"),
    # No nodes: the one entry must still be 0 (the planner refused what validate accepted).
    (KVTree(torch.arange(3, dtype=torch.int32), torch.tensor([3], dtype=torch.int32),
            torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)), "must start at 0"),
    (tree(indptr=(0, 5, 4, 6), parent=(-1, 0, 0)), "never decrease"),
    (tree(kv=7), "ends at 6 but kv_indices has 7 slots"),
    (tree(kv=5), "ends at 6 but kv_indices has 5 slots"),
    (tree(parent=(-1, 1)), "node_parent"),  # its own parent: a cycle
    (tree(parent=(0, -1)), "node_parent"),  # a parent after the node
    (tree(parent=(-1, -2)), "node_parent"),
    (tree(qnode=(1, -1)), r"query_node must index a node in \[0, 2\)"),
    (tree(qnode=(2,)), r"query_node must index a node in \[0, 2\)"),
], ids=["int64", "kv_2d", "parent_int64", "indptr_long", "indptr_short", "indptr_start", "indptr_start_no_nodes",
         "indptr_decreases",
        "kv_longer", "kv_shorter", "parent_self", "parent_later", "parent_below_root", "query_negative",
        "query_past_nodes"])
def test_a_broken_invariant_is_named(t, match):
    with pytest.raises(ValueError, match=match):
        t.validate()


@pytest.mark.parametrize("slot", [-1, 6, 2**31 - 1])
@pytest.mark.parametrize("which", ["attention_reference", "tree_decode_reference"])
def test_the_reference_refuses_a_slot_outside_the_buffers(which, slot):
    """torch indexing takes slot -1 as the buffers' last slot: the reference (deft's CPU decode path) read
    another token's K/V without a word where the kernels read out of bounds."""
    from sglang_deft.kernels import reference

    kv = torch.arange(6, dtype=torch.int32)
    kv[3] = slot
    q, k = torch.randn(2, 4, 8), torch.randn(6, 2, 8)
    with pytest.raises(ValueError, match=f"holds slot {slot}, outside the KV buffers' 6 slots"):
        getattr(reference, which)(q, k, k, tree(kv=kv), 0.3)
    getattr(reference, which)(q, k, k, tree(), 0.3)  # every slot in range
