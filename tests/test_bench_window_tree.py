"""benchmarks/bench_window_tree.py on a small fork: the counts it reports are the window tree's."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_window_tree", REPO / "benchmarks" / "bench_window_tree.py")
bw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bw)


def test_a_fork_of_different_lengths_is_reported_with_its_sharing():
    r = bw.run_case([3, 4, 5, 6], window=41, repeats=2, device=torch.device("cpu"))
    seq = [bw.PROMPT + n + 1 for n in (3, 4, 5, 6)]  # each branch with this step's token
    assert r["attended_tokens"] == 4 * 41 and r["starts"] == 4 and r["build_us"] > 0
    # one run from the latest start: that branch's window once (less its private tail), the others' earlier
    # positions privately, and the four private tails
    latest = max(seq) - 41
    want = (bw.PROMPT - latest) + sum(latest - (n - 41) for n in seq) + sum(n + 1 for n in (3, 4, 5, 6))
    assert r["unique_tokens"] == want and r["ratio"] == round(4 * 41 / want, 3)
