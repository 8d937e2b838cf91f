"""End to end on CPU with the Triton kernels (interpreted): a decode batch preempted as a whole by a
higher-priority request (``--enable-priority-scheduling``) and re-prefilled into the same
``req_to_token`` row.

With the overlap scheduler (SGLang's default) the preempted request's in-flight decode step is
dropped, so after its re-prefill it decodes exactly one token on, as the same ``Req``; with
``--max-running-requests 1`` its row is the one it had; with ``--disable-radix-cache`` its last node is
``None`` both times. Every check of a steady step held, but the re-prefill had written new KV slots
into the row, and the old ones (freed; here, in a 1024-token pool, reused by the high-priority
prompt) were read: other tokens from the first step after the preemption on (logprobs 0.1 off
before). The reference server (torch_native decode, same flags) is given the request alone.
"""
from __future__ import annotations

import threading
import time

import pytest

from test_e2e_cpu import ON_GPU, CONTEXT, SERVER_ARGS, assert_same_output, greedy
from test_e2e_cpu_triton import interpreted_deft_and_reference

pytestmark = pytest.mark.skipif(ON_GPU, reason="CPU only: the Triton interpreter's run of the GPU path")

ARGS = SERVER_ARGS + ["--enable-priority-scheduling", "--max-running-requests", "1", "--max-total-tokens", "1024",
                      "--disable-radix-cache"]
# ~700 tokens: with the running request's ~400 it needs the slots the preempted request freed.
URGENT = " ".join(f"Quantum ledger {i} balances in the dark; count it twice." for i in range(13))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    yield from interpreted_deft_and_reference(ARGS, tmp_path_factory.mktemp("preemption"),
                                              SGLANG_DEFT_TRACE_PLANS="1")


def test_a_batch_preempted_into_its_own_row_decodes_on_correctly(servers):
    deft = servers["deft"]
    low = {"text": CONTEXT + " Summary:", "sampling_params": greedy(40), "return_logprob": True, "priority": 0}
    urgent = {"text": URGENT, "sampling_params": greedy(0), "priority": 100}  # prefill only, as a fork's prefix
    offset = len(deft.log())
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("low", deft.generate(low)[0]))
    worker.start()
    deadline = time.monotonic() + 300
    while deft.log()[offset:].count("steady=1") < 4:  # mid-decode, on steady steps
        assert time.monotonic() < deadline and worker.is_alive(), deft.log()[-3000:]
        time.sleep(0.5)
    deft.generate(urgent)
    worker.join()
    log = deft.log()[offset:]
    assert "#queue-req: 1" in log  # the urgent prefill ran with the low-priority request preempted
    assert_same_output(out["low"], servers["reference"].generate(low)[0])
