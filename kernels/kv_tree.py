"""The KV tree: the one description of a decode batch's shared KV that every kernel takes."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVTree:
    """KV segments arranged as a forest; each query attends its whole root-to-node path.

    Node i owns the KV slots ``kv_indices[node_indptr[i]:node_indptr[i+1]]`` (slot ids into the
    per-layer ``k_buffer``/``v_buffer``), in token order along the path. A node may be empty (length
    0) and a node may be used by no query; both cost nothing at run time. Slot ids that come on the
    host are checked (``plan_tree_decode`` refuses negative ones, ``tree_decode`` ones past the buffers);
    ids already on the device are trusted: checking them would synchronise every layer.
    """

    kv_indices: torch.Tensor  # [T] int32, any device: KV slots of all nodes, node after node
    node_indptr: torch.Tensor  # [N + 1] int32, any device: node i owns kv_indices[indptr[i]:indptr[i+1]]
    node_parent: torch.Tensor  # [N] int32, any device: parent node, -1 for a root; parent[i] < i
    query_node: torch.Tensor  # [B] int32, any device: the node query b's path ends at

    @property
    def num_nodes(self) -> int:
        return self.node_parent.numel()

    @property
    def num_queries(self) -> int:
        return self.query_node.numel()

    def validate(self) -> None:
        """Check the structural invariants on the host; raises ValueError naming the broken one.

        Synchronises with the device when the tensors live there: call it when building trees in
        tests or at the edge of the API, never in the kernels' per-layer path (the reference path,
        ``reference.path_nodes``, validates at every call: its trees are host tensors).
        """
        for name in ("kv_indices", "node_indptr", "node_parent", "query_node"):
            t = getattr(self, name)
            if t.dtype != torch.int32 or t.dim() != 1:
                raise ValueError(f"KVTree.{name} must be a 1-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
        n = self.num_nodes
        indptr = self.node_indptr.cpu()
        parent = self.node_parent.cpu()
        qnode = self.query_node.cpu()
        if indptr.numel() != n + 1:
            raise ValueError(f"KVTree.node_indptr has {indptr.numel()} entries for {n} nodes (needs {n + 1})")
        if int(indptr[0]) != 0 or bool((indptr[1:] < indptr[:-1]).any()):
            raise ValueError("KVTree.node_indptr must start at 0 and never decrease")
        if int(indptr[-1]) != self.kv_indices.numel():
            raise ValueError(
                f"KVTree.node_indptr ends at {int(indptr[-1])} but kv_indices has {self.kv_indices.numel()} slots"
            )
        # parent[i] < i makes the forest acyclic by construction and lets planners walk it in order.
        idx = torch.arange(n, dtype=torch.int32)
        if bool(((parent >= idx) | (parent < -1)).any()):
            raise ValueError("KVTree.node_parent[i] must be -1 (a root) or a node index smaller than i")
        if qnode.numel() and bool(((qnode < 0) | (qnode >= n)).any()):
            raise ValueError(f"KVTree.query_node must index a node in [0, {n})")
