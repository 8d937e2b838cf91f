"""One launch that grows every private tail of a plan by its newest KV token (a steady decode step), and one
that moves nodes' starts one position on (a sliding-window plan's windows, ``advance_starts``).

A plan's tails can grow in place when the plan left room after each of them. The update's operands
are one int64 tensor of four equal parts, one entry per possible tail:

    next   flat index into req_to_token of the tail's next token's KV slot
    end    the tail's next position in the plan's kv_indices
    field  flat index into the plan's items of the tail's last item's kv_len
    inc    1 for a tail, 0 for an unused entry

Per entry: ``kv_indices[end] = req_to_token[next]``, ``items[field] += inc``, ``next += inc``,
``end += inc``. Unused entries point at a scratch position past the plan's KV (all of them write
it; what they write is never read) and add zero to any field. The fields are added atomically
because an unused entry's field may be a tail's: a plain read-modify-write could lose the tail's
+1.

It is one Triton kernel rather than four torch ops (index_select, index_copy_, index_add_, add) in a
CUDA graph of the backend's own: with that graph captured, SGLang 0.5.10's first prefill after a
``/flush_cache`` (which calls ``torch.cuda.empty_cache()``) failed with an illegal memory access in
its piecewise CUDA graphs, on the H200, with and without SGLang's decode graphs; without it the
same server went on. Which memory the graph left behind is not established.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256


@triton.jit
def _advance_tails_kernel(req_to_token, operands, kv_indices, items, cap, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cap
    nxt = tl.load(operands + offs, mask=mask, other=0)
    end = tl.load(operands + cap + offs, mask=mask, other=0)
    field = tl.load(operands + 2 * cap + offs, mask=mask, other=0)
    inc = tl.load(operands + 3 * cap + offs, mask=mask, other=0)
    slot = tl.load(req_to_token + nxt, mask=mask, other=0)
    tl.store(kv_indices + end, slot.to(kv_indices.dtype.element_ty), mask=mask)
    tl.atomic_add(items + field, inc.to(tl.int32), mask=mask)
    tl.store(operands + offs, nxt + inc, mask=mask)
    tl.store(operands + cap + offs, end + inc, mask=mask)


def advance_tails(req_to_token: torch.Tensor, operands: torch.Tensor, kv_indices: torch.Tensor,
                  items: torch.Tensor) -> None:
    """The update above, in place (``operands`` int64 [4 x cap]; ``items`` the plan's int32 items)."""
    cap = operands.numel() // 4
    _advance_tails_kernel[(triton.cdiv(cap, BLOCK),)](req_to_token, operands, kv_indices, items, cap, BLOCK=BLOCK)


@triton.jit
def _advance_starts_kernel(operands, items, cap, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cap
    field = tl.load(operands + offs, mask=mask, other=0)
    inc = tl.load(operands + cap + offs, mask=mask, other=0).to(tl.int32)
    # Unused entries (inc 0) all name item 0: hundreds of atomic +0s on one address, skipped.
    mask = mask & (inc != 0)
    tl.atomic_add(items + field, inc, mask=mask)
    tl.atomic_add(items + field + 1, -inc, mask=mask)


def advance_starts(operands: torch.Tensor, items: torch.Tensor) -> None:
    """Move items' KV ranges' starts on, in place: ``operands`` int64 [2 x cap] is, per entry, the flat index in
    ``items`` (the plan's int32 items) of an item's kv_start and 1 (0 for an unused entry, which may name any
    item); per entry ``items[field] += inc``, ``items[field + 1] -= inc`` (kv_start, then kv_len); unused entries
    write nothing. (A tail's last item may be one of these: advance_tails grows its kv_len in a launch of its
    own.)"""
    cap = operands.numel() // 2
    _advance_starts_kernel[(triton.cdiv(cap, BLOCK),)](operands, items, cap, BLOCK=BLOCK)
