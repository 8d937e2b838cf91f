"""Tree decode attention kernels (torch, triton and the planner's C schedule: this package never imports sglang)."""
from .kv_tree import KVTree
from .plan import PlanCapacity, PlanCapacityError, TreeDecodePlan, TreeDecodePlanner, plan_tree_decode
from .reference import ReferencePlan, attention_reference, max_abs_score, plan_reference, tree_decode_reference
from .tree_decode import Stage1Config, tree_decode

__all__ = ["KVTree", "PlanCapacity", "PlanCapacityError", "ReferencePlan", "Stage1Config", "TreeDecodePlan",
           "TreeDecodePlanner", "attention_reference", "max_abs_score", "plan_reference", "plan_tree_decode",
           "tree_decode", "tree_decode_reference"]
