"""Tensor parallelism on the CPU: a deft server with ``--tp 2`` against one with ``--tp 1``.

Each TP rank holds half the query and KV heads and its own DeftAttnBackend (same KV tree, planned
per rank); the criterion is the one of the GPU issue: the same tokens as TP=1 (and, in fp32, the
same logprobs up to the all-reduce's summation order). SGLang's CPU engine binds each rank to cores
(``SGLANG_CPU_OMP_THREADS_BIND``, one core each on this 2-core machine).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from sglang_deft.server_process import ServerProcess
from sglang_deft.sharing_metrics import parse_sharing_lines
from server_group import serving
from test_e2e_cpu import ON_GPU, CONTEXT, SERVER_ARGS, STARTUP_TIMEOUT_S, assert_same_output, greedy

pytestmark = pytest.mark.skipif(
    ON_GPU, reason="CPU only: its two ranks are CPU processes (TP on GPUs: scripts/gpu_e2e.py)")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tp_servers(tmp_path_factory, tiny_servers):
    """The TP=2 server, and test_e2e_cpu's deft server as TP=1 (the same arguments but for
    ``--enable-streaming-session``, which leaves other requests as they are)."""
    args = SERVER_ARGS + ["--decode-attention-backend", "deft", "--tp", "2"]
    env = dict(os.environ, SGLANG_CPU_OMP_THREADS_BIND="0|1")
    running = {"tp2": ServerProcess("tp2", args, tmp_path_factory.mktemp("tp2") / "tp2.log", cwd=REPO, env=env)}
    with serving(running, STARTUP_TIMEOUT_S):
        yield {**running, "tp1": tiny_servers["deft"]}


def test_tp2_generates_what_tp1_does(tp_servers):
    prompts = [CONTEXT + f" Question {c}:" for c in "ABCD"]
    batch = {"text": prompts, "sampling_params": greedy(), "return_logprob": True}
    sampled = {"text": CONTEXT + " Summary:", "sampling_params": greedy(n=3), "return_logprob": True}
    for payload in (batch, sampled):
        outs = {name: server.generate(payload) for name, server in tp_servers.items()}
        assert len(outs["tp2"]) == (len(prompts) if payload is batch else 3)
        for tp2, tp1 in zip(outs["tp2"], outs["tp1"], strict=True):
            assert_same_output(tp2, tp1)
    rows = parse_sharing_lines(tp_servers["tp2"].log())
    assert rows and max(r["ratio"] for r in rows) > 2.0  # the branches' shared prompt was read once
    assert "TP1" in tp_servers["tp2"].log()  # a second rank really ran
