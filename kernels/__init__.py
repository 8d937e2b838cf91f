"""Tree decode attention kernels (torch and triton only: this package never imports sglang)."""
from .kv_tree import KVTree
from .reference import attention_reference, tree_decode_reference

__all__ = ["KVTree", "attention_reference", "tree_decode_reference"]
