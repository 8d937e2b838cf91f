"""End to end: a decode batch preempted as a whole by a higher-priority request
(``--enable-priority-scheduling``) and re-prefilled into the same ``req_to_token`` row.

With the overlap scheduler (SGLang's default) the preempted request's in-flight decode step is
dropped, so after its re-prefill it decodes exactly one token on, as the same ``Req``; with
``--max-running-requests 1`` its row is the one it had; with ``--disable-radix-cache`` its last node is
``None`` both times. Every check of a steady step held, but the re-prefill had written new KV slots
into the row, and the old ones (freed; here, in a 1024-token pool, reused by the high-priority
prompt) were read: other tokens from the first step after the preemption on (logprobs 0.1 off
before). The reference server (SGLang's own decode, same flags) is given the request alone.

On CPU the deft server runs the GPU path's Triton kernels interpreted; with
``SGLANG_DEFT_E2E_DEVICE=cuda`` (``scripts/gpu_session.sh features``) both servers run on the GPU as
``test_e2e_cpu.py``'s do (float16, CUDA graphs, SGLang's triton decode as the reference).
"""
from __future__ import annotations

import re
import threading
import time

import pytest

from sglang_deft.server_process import ServerProcess
from server_group import serving
from test_e2e_cpu import (CONTEXT, ON_GPU, REFERENCE_DECODE, SERVER_ARGS, STARTUP_TIMEOUT_S, assert_same_generation,
                          greedy, ids_and_logprobs, server_launch)
from test_e2e_cpu_triton import interpreted_deft

ARGS = SERVER_ARGS + ["--enable-priority-scheduling", "--max-running-requests", "1", "--max-total-tokens", "1024",
                      "--disable-radix-cache"]
# ~700 tokens: with the running request's ~400 it needs the slots the preempted request freed.
URGENT = " ".join(f"Quantum ledger {i} balances in the dark; count it twice." for i in range(13))


# On a GPU 40 tokens are decoded before the test has read the log once.
NEW_TOKENS = 300 if ON_GPU else 40
POLL_S = 0.02 if ON_GPU else 0.5
TRACE = {"SGLANG_DEFT_TRACE_PLANS": "1"}  # a log line per planned step: steady or planned in full


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("preemption")
    deft = (ServerProcess("deft", ARGS + ["--decode-attention-backend", "deft"], log_dir / "deft.log",
                          **server_launch(**TRACE)) if ON_GPU else interpreted_deft(ARGS, log_dir, **TRACE))
    running = {"deft": deft,
               "reference": ServerProcess("reference", ARGS + ["--decode-attention-backend", REFERENCE_DECODE],
                                          log_dir / "reference.log", **server_launch())}
    with serving(running, STARTUP_TIMEOUT_S):
        yield running


def test_a_batch_preempted_into_its_own_row_decodes_on_correctly(servers):
    deft = servers["deft"]
    low = {"text": CONTEXT + " Summary:", "sampling_params": greedy(NEW_TOKENS), "return_logprob": True,
           "priority": 0}
    urgent = {"text": URGENT, "sampling_params": greedy(0), "priority": 100}  # prefill only, as a fork's prefix
    offset = len(deft.log())
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("low", deft.generate(low)[0]))
    worker.start()
    deadline = time.monotonic() + 300
    while deft.log()[offset:].count("steady=1") < 4:  # mid-decode, on steady steps
        assert time.monotonic() < deadline and worker.is_alive(), deft.log()[-3000:]
        time.sleep(POLL_S)
    sent_at = len(deft.log())
    deft.generate(urgent)
    worker.join()
    log = deft.log()
    assert "#queue-req: 1" in log[offset:]  # the urgent prefill ran with the low-priority request preempted
    # The low-priority request's re-prefill is the last prefill; its first decode step must be planned in
    # full (steady=0), not as the next step of its plan from before. (SGLang logs that step's plan before
    # the prefill's line; the second step after any prefill is planned in full on a GPU anyway.)
    prefills = re.findall(r"Prefill batch, #new-seq: 1, #new-token: (\d+), #cached-token: (\d+)", log[sent_at:])
    assert len(prefills) == 2, prefills  # the urgent prompt's, then the preempted request's
    resumed_len = sum(map(int, prefills[-1])) + 1
    first_step = re.search(rf"steady=(\d) seq_lens=\[{resumed_len}\]", log[sent_at:])
    assert first_step and first_step.group(1) == "0", log[sent_at:][-3000:]
    ids, lps = ids_and_logprobs(out["low"]["meta_info"])
    ref_ids, ref_lps = ids_and_logprobs(servers["reference"].generate(low)[0]["meta_info"])
    assert_same_generation(ids, lps, ref_ids, ref_lps)
    # In float16 the two may part at a near tie (assert_same_generation); the tokens compared must
    # still reach past the preemption. Output token i (i >= 1) is decoded at seq_len prompt + i.
    resumed_at = resumed_len - out["low"]["meta_info"]["prompt_tokens"]
    compared = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), len(ids))
    print(f"preempted before token {resumed_at}; tokens 0-{compared - 1} of {len(ids)} equal the reference's")
    assert 0 < resumed_at < compared - 4, (resumed_at, compared)
