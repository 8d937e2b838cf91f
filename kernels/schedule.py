"""``schedule.c`` (the host half of planning a decode step) bound through ctypes.

``Schedule.run`` plans one step into a packed int32 host buffer laid out as the plan's device
metadata (see ``plan.py``); the buffer is the caller's and grows when a step needs more.
"""
from __future__ import annotations

import ctypes
from typing import NamedTuple

import numpy as np

from . import c_library

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p

# schedule.c's status codes, as the errors the planner raises.
_ERRORS = {
    -1: "KVTree.node_indptr must start at 0 and never decrease",
    -2: "KVTree.node_parent[i] must be -1 (a root) or a node index smaller than i",
    -3: "KVTree.query_node must index a node of the tree",
    -7: ("the planner's sizes and constants must be in range: MIN_CHUNK_TOKENS, programs per SM, the tile rows, "
         "head_dim, KV heads, SMs at least 1; SMALL_ROWS and PROGRAM_LATENCY_BYTES at least 0; FLOP_PER_BYTE "
         "positive and finite"),
}
_TOO_MANY_TILES, _BAD_CAPACITY, _NO_MEMORY = -4, -5, -6


class PlanCapacityError(ValueError):
    """A tree past a plan's capacity (fixed buffers, or the limits they were sized by): a valid step that
    needs buffers of its own, unlike a malformed tree or call."""


class ScheduleSizes(NamedTuple):
    """What a step's schedule came to; offsets are in int32 elements of the packed buffer."""

    packed_len: int  # elements of the packed buffer this step fills
    items: int
    large_items: int
    partials: int  # also the merge entries: each partial is merged once
    tiles: int
    o_items: int
    o_counts: int
    o_indptr: int
    o_slots: int


def _library() -> ctypes.CDLL:
    lib = c_library.load("schedule.c")
    fn = lib.deft_schedule
    if fn.restype is not _I64:
        # argtypes first: another thread that sees restype set takes the prototype as complete.
        fn.argtypes = [_PTR, _PTR, _I64, _PTR, _I64] + [_I64] * 9 + [ctypes.c_double] + [_I64] * 3 + [_PTR, _I64, _PTR]
        fn.restype = _I64
    return lib


class Schedule:
    """One caller's binding of ``deft_schedule`` with its host buffers (not thread-safe: one per planner)."""

    def __init__(self) -> None:
        self._fn = _library().deft_schedule
        self._info = np.zeros(9, np.int64)
        self._info_ptr = self._info.ctypes.data
        self._grow(1 << 12)

    def _grow(self, n: int) -> None:
        self.out = np.empty(n, np.int32)  # the packed buffer of the last step
        self._out_ptr = self.out.ctypes.data  # (the ctypes attribute costs a microsecond a call)

    def run(self, node_indptr: int, node_parent: int, num_nodes: int, query_node: int, num_queries: int, *,
            group_size: int, head_dim: int, kv_elem_bytes: int, num_kv_heads: int, num_sms: int, large_rows: int,
            programs_per_sm: int, small_rows: int, min_chunk_tokens: int, flop_per_byte: float,
            program_latency_bytes: int, cap_queries: int | None, cap_items: int | None) -> ScheduleSizes:
        """Plan one step into ``self.out``: the tree's arrays are addresses of contiguous int32 host
        memory (``node_indptr`` [num_nodes + 1], ``node_parent`` [num_nodes], ``query_node``
        [num_queries]). The layout has room for ``cap_queries`` queries and ``cap_items`` items (None:
        this step's numbers); chunks are coarsened until the items fit ``cap_items``. Raises
        ValueError for a malformed tree, PlanCapacityError (a ValueError) for more queries than
        ``cap_queries`` or more query tiles than ``cap_items``."""
        args = (node_indptr, node_parent, num_nodes, query_node, num_queries, group_size, head_dim, kv_elem_bytes,
                num_kv_heads, num_sms, large_rows, programs_per_sm, small_rows, min_chunk_tokens, flop_per_byte,
                program_latency_bytes, -1 if cap_queries is None else cap_queries,
                -1 if cap_items is None else cap_items)
        status = self._fn(*args, self._out_ptr, len(self.out), self._info_ptr)
        sizes = ScheduleSizes(*self._info.tolist())
        if status == 0 and sizes.packed_len > len(self.out):
            # Too small a buffer: plan again into one that fits (buffers only grow, so this is rare).
            self._grow(max(sizes.packed_len, 2 * len(self.out)))
            status = self._fn(*args, self._out_ptr, len(self.out), self._info_ptr)
            sizes = ScheduleSizes(*self._info.tolist())
        if status == 0:
            return sizes
        if status in _ERRORS:
            raise ValueError(_ERRORS[status])
        if status == _TOO_MANY_TILES:
            raise PlanCapacityError(f"the tree needs {sizes.tiles} work items, more than the plan capacity "
                                    f"{cap_items}")
        if status == _BAD_CAPACITY:
            raise PlanCapacityError(f"the tree needs {num_queries} queries, more than the plan capacity "
                                    f"{cap_queries}")
        if status == _NO_MEMORY:
            raise MemoryError("sglang-deft's planner could not allocate its host scratch memory")
        raise RuntimeError(f"deft_schedule returned an unknown status {status}")
