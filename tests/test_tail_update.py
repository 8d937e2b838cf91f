"""kernels/tail_update.advance_tails and advance_starts against NumPy references (Triton interpreter on CPU,
compiled on a GPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sglang_deft.kernels.tail_update import BLOCK, advance_starts, advance_tails

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(req_to_token: np.ndarray, operands: np.ndarray, kv_indices: np.ndarray, items: np.ndarray):
    cap = operands.size // 4
    nxt, end, field, inc = operands.reshape(4, cap)
    kv, it = kv_indices.copy(), items.copy()
    kv[end] = req_to_token.reshape(-1)[nxt]  # duplicate ends: only the scratch entry, whose value is never read
    np.add.at(it, field, inc.astype(it.dtype))
    return np.concatenate([nxt + inc, end + inc, field, inc]), kv, it


# (BLOCK + 3, BLOCK): two programs; (BLOCK + 3, BLOCK + 3): entries in the second (a grid rounded down skipped them)
@pytest.mark.parametrize("cap, tails", [(1, 1), (16, 5), (BLOCK + 3, BLOCK), (BLOCK + 3, BLOCK + 3)])
def test_advance_tails_matches_reference(cap, tails):
    rng = np.random.default_rng(cap)
    rows, width, kv_len, n_items = cap, 64, 4 * cap + 8, 8 * cap
    req_to_token = rng.integers(0, 1 << 20, (rows, width)).astype(np.int32)
    scratch = kv_len - 1
    nxt = np.zeros(cap, np.int64)
    end = np.full(cap, scratch, np.int64)
    field = np.ones(cap, np.int64)  # unused entries: any field, + 0
    inc = np.zeros(cap, np.int64)
    nxt[:tails] = np.arange(tails) * width + rng.integers(0, width - 1, tails)
    end[:tails] = rng.permutation(scratch)[:tails]
    # Item fields (the kv_len field of every 8th item), some shared by several tails: the kernel adds
    # atomically, as np.add.at does in the reference.
    field[:tails] = rng.permutation(np.arange(n_items) // 8 * 8 + 1)[:tails]
    field[:tails][0] = 1  # a tail sharing its field with every unused entry: the +1 must survive
    inc[:tails] = 1
    operands = np.concatenate([nxt, end, field, inc])
    kv_indices = rng.integers(0, 1 << 20, kv_len).astype(np.int32)
    items = rng.integers(0, 1000, n_items).astype(np.int32)
    want_ops, want_kv, want_items = reference(req_to_token, operands, kv_indices, items)

    t = {name: torch.from_numpy(a).to(DEVICE) for name, a in
         (("r2t", req_to_token), ("ops", operands), ("kv", kv_indices), ("items", items))}
    advance_tails(t["r2t"], t["ops"], t["kv"], t["items"])
    np.testing.assert_array_equal(t["ops"].cpu().numpy(), want_ops)
    np.testing.assert_array_equal(t["items"].cpu().numpy(), want_items)
    got_kv = t["kv"].cpu().numpy()
    np.testing.assert_array_equal(np.delete(got_kv, scratch), np.delete(want_kv, scratch))


@pytest.mark.parametrize("cap, moving", [(1, 1), (16, 5), (BLOCK + 3, BLOCK), (BLOCK + 3, BLOCK + 3)])
def test_advance_starts_matches_reference(cap, moving):
    """Each moving item's kv_start + 1 and kv_len - 1; unused entries (field 0, + 0) name item 0, which may itself
    move: its change must survive theirs."""
    rng = np.random.default_rng(cap)
    n_items = 2 * cap
    items = rng.integers(10, 1000, (n_items, 5)).astype(np.int32)
    field = np.zeros(cap, np.int64)
    inc = np.zeros(cap, np.int64)
    field[:moving] = rng.permutation(np.arange(1, n_items))[:moving] * 5
    field[0] = 0
    inc[:moving] = 1
    want = items.copy()
    np.add.at(want[:, 0], field // 5, inc.astype(np.int32))
    np.add.at(want[:, 1], field // 5, -inc.astype(np.int32))
    operands = torch.from_numpy(np.concatenate([field, inc])).to(DEVICE)
    got = torch.from_numpy(items).to(DEVICE)
    advance_starts(operands, got.view(-1))
    np.testing.assert_array_equal(got.cpu().numpy(), want)
