"""End to end on CPU with the Triton kernels (interpreted): the GPU decode path in a live SGLang
scheduler.

The deft server runs with ``SGLANG_DEFT_DECODE_IMPL=triton TRITON_INTERPRET=1``, so its decode
steps go through what a GPU server runs (the plan buffers, ``DecodeStepPlanner``'s full plans and
steady steps, stage 1 and 2) instead of the PyTorch reference; the reference server decodes with
SGLang's torch_native. An ``n > 1`` request (full plans, then steady steps) with a second request
joining it midway (a full plan, then steady steps of the new batch) must give the reference's
tokens and logprobs (a room running out, and the full plan that follows, is tested in
test_step_planner and test_cuda_graph_plan). The interpreter makes a decode step take
~1 s, so the workload is small.
"""
from __future__ import annotations

import os
import re
import threading
import time

import pytest

from sglang_deft.server_process import ServerProcess
from sglang_deft.sharing_metrics import parse_sharing_lines
from server_group import serving
from test_e2e_cpu import ON_GPU, CONTEXT, REPO, SERVER_ARGS, STARTUP_TIMEOUT_S, assert_same_output, greedy

pytestmark = pytest.mark.skipif(
    ON_GPU, reason="CPU only: the Triton interpreter's run of the GPU path (on a GPU the features tests run it "
                   "compiled)")

LONG = 40  # tokens


def interpreted_deft(args: list[str], log_dir, **env: str) -> ServerProcess:
    """A deft server with ``args`` on the interpreted Triton path, launched."""
    triton = dict(os.environ, SGLANG_DEFT_DECODE_IMPL="triton", TRITON_INTERPRET="1", **env)
    return ServerProcess("deft", args + ["--decode-attention-backend", "deft"], log_dir / "deft.log", cwd=REPO,
                         env=triton)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_servers):
    """The interpreted deft server, and test_e2e_cpu's torch_native-decode reference (same arguments)."""
    running = {"deft": interpreted_deft(SERVER_ARGS, tmp_path_factory.mktemp("servers"))}
    with serving(running, STARTUP_TIMEOUT_S):
        yield {**running, "reference": tiny_servers["reference"]}


def test_triton_path_in_a_live_scheduler_matches_the_reference(servers):
    forked = {"text": CONTEXT + " Summary:", "sampling_params": greedy(LONG, n=3), "return_logprob": True}
    joining = {"text": CONTEXT + " Question:", "sampling_params": greedy(12), "return_logprob": True}
    outs = {}

    def send(name, key, payload, delay_s=0.0):
        time.sleep(delay_s)
        outs[(name, key)] = servers[name].generate(payload)

    threads = [threading.Thread(target=send, args=("deft", "forked", forked)),
               threading.Thread(target=send, args=("deft", "joining", joining, 8.0))]  # joins midway
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key, payload in (("forked", forked), ("joining", joining)):
        send("reference", key, payload)
        deft, ref = outs[("deft", key)], outs[("reference", key)]
        deft, ref = (deft if isinstance(deft, list) else [deft]), (ref if isinstance(ref, list) else [ref])
        assert len(deft) == len(ref) == (3 if key == "forked" else 1)
        for d, r in zip(deft, ref):
            assert_same_output(d, r)

    log = servers["deft"].log()
    # The join really joined: the three branches and the new request decoded as one batch of four.
    assert re.search(r"Decode batch[^\n]*#running-req: 4,", log), "the joining request never decoded with the fork"
    rows = parse_sharing_lines(log)
    steps, steady = sum(r["steps"] for r in rows), sum(r["steady_steps"] for r in rows)
    assert steps >= LONG and max(r["ratio"] for r in rows) > 2.0
    assert steady > 0.5 * steps, f"{steady} of {steps} decode steps were steady"
    assert steady < steps  # and full plans: the first batch, the join
