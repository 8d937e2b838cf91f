"""benchmarks/bench_window_tree.py on a small fork: the counts it reports are the window tree's."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from repo_modules import REPO, load_module

bw = load_module("bench_window_tree", REPO / "benchmarks" / "bench_window_tree.py")


def test_a_fork_of_different_lengths_is_reported_with_its_sharing():
    r = bw.run_case([3, 4, 5, 6], window=41, repeats=2, device=torch.device("cpu"))
    seq = [bw.PROMPT + n + 1 for n in (3, 4, 5, 6)]  # each branch with this step's token
    assert r["attended_tokens"] == 4 * 41 and r["starts"] == 4 and r["build_us"] > 0
    # one run from the latest start: that branch's window once (less its private tail), the others' earlier
    # positions privately, and the four private tails
    latest = max(seq) - 41
    want = (bw.PROMPT - latest) + sum(latest - (n - 41) for n in seq) + sum(n + 1 for n in (3, 4, 5, 6))
    assert r["unique_tokens"] == want and r["ratio"] == round(4 * 41 / want, 3)


def test_steady_steps_read_what_fresh_trees_read_while_the_runs_hold():
    """Branches of 3-6 tokens on the 1000-token prompt, windows of 41 starting at four places of it: one run,
    which a fresh tree keeps choosing, so the steady steps read exactly what fresh trees would."""
    r = bw.steady_reads([3, 4, 5, 6], window=41, steps=8, device=torch.device("cpu"))
    assert r["steady_steps"] == 6 and r["steady_read_tokens"] == r["fresh_read_tokens"]


def test_steady_steps_keep_runs_a_fresh_tree_would_split():
    """Four branches of 3 tokens and one of 13 on a 100-token prompt, 53-token windows: one run at first. Every
    step each run's shared part of the prompt shrinks by a position, so after a few steps a fresh tree reads
    fewer positions with two runs, while the steady steps keep the full plan's one."""
    r = bw.steady_reads([3] * 4 + [13], window=53, steps=24, device=torch.device("cpu"), prompt_len=100)
    assert r["steady_steps"] >= 20 and r["steady_read_tokens"] > r["fresh_read_tokens"]


def test_the_script_runs_its_steady_steps_on_a_cpu_without_triton_interpret_set():
    """Its Run line has no TRITON_INTERPRET: without it the steady steps' Triton kernel found no driver on a CPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_window_tree.py"), "--repeats", "1",
                             "--steps", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("2 steps (0 steady)") == len(bw.CASES)


def test_starts_counts_where_the_windows_start_not_the_branch_lengths():
    """'starts' was the number of distinct branch lengths: with a window longer than every request all windows start
    at 0, and it said 4."""
    assert bw.run_case([3, 4, 5, 6], window=5000, repeats=1, device=torch.device("cpu"))["starts"] == 1
    # two branches of one length, and windows inside the prompt: two lengths, two starts
    assert bw.run_case([3, 3, 6, 6], window=41, repeats=1, device=torch.device("cpu"))["starts"] == 2


def test_arguments_that_cannot_run_are_refused_before_any_case(capsys):
    import pytest

    for flag, value, says in (("--repeats", "0", "--repeats must be at least 1"),
                              ("--steps", "-1", "--steps must be at least 0"),
                              ("--window", "0", "--window must be at least 1 token")):
        with pytest.raises(SystemExit) as exited:
            bw.main([flag, value])
        assert exited.value.code == 2 and says in capsys.readouterr().err
