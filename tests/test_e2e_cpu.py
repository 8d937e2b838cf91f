"""End to end on CPU: a real SGLang server with deft decode gives the tokens SGLang's own backend gives.

Three servers from ``python -m sglang_deft.launch_server`` on the repo's tiny Llama (float32), all
with torch_native prefill; decode runs on ``deft`` in two, one with SGLang's overlap scheduler (its
default) and one with ``--disable-overlap-schedule``, and on ``torch_native`` in the third. All get
the same greedy workloads:
- a nested ``fork()`` program (sglang.lang): a prompt forked 2 ways, each branch forked 2 ways;
- an ``n > 1`` request (SGLang's parallel sampling: the prompt cached once, 4 branches);
- a batch of 4 prompts sharing a long prefix (branches that differ, with token logprobs).
Each deft server's tokens must be the reference's (and logprobs close); its sharing log lines must show the
decode steps read less KV than they attended. The tiny model's attention is sharp (see
scripts/make_tiny_model.py): :func:`test_workload_is_sensitive_to_context` shows that one early
prompt token changes the reference's tokens, so attending to the wrong KV would not pass unseen.

``SGLANG_DEFT_E2E_DEVICE=cuda`` runs these servers, and ``test_e2e_cpu_robustness.py``'s, on a GPU
(``bash scripts/gpu_session.sh features``) with what a GPU server runs: SGLang's triton prefill,
CUDA graphs and deft's Triton kernels (still float32, so the same comparisons hold); the reference
then decodes with SGLang's triton backend.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import sglang as sgl
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

from sglang_deft.server_process import ServerProcess
from sglang_deft.sharing_metrics import parse_sharing_lines
from server_group import gpu_package_env, serving

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "tiny-llama-deft"
STARTUP_TIMEOUT_S = 240
MAX_TOKENS = 12

# SGLANG_DEFT_E2E_DEVICE=cuda: the same tests on a GPU (see the module docstring).
ON_GPU = os.environ.get("SGLANG_DEFT_E2E_DEVICE", "cpu") == "cuda"
DEVICE_ARGS = (
    # --sampling-backend pytorch: see GPU_ARGS in scripts/gpu_e2e.py (the nested forks below mix greedy
    # and default sampling, which would JIT-compile FlashInfer's sampler mid-test on a fresh host).
    ["--attention-backend", "triton", "--mem-fraction-static", "0.8", "--sampling-backend", "pytorch"] if ON_GPU
    else ["--device", "cpu", "--attention-backend", "torch_native",
          "--sleep-on-idle"])  # two idle schedulers polling would share the CI machine's 2 cores with the busy one
SERVER_ARGS = [
    "--model-path", str(MODEL), "--dtype", "float32", "--grammar-backend", "none",
    "--max-total-tokens", "8192", "--max-running-requests", "16", "--log-level", "info",
    "--decode-log-interval", "2", *DEVICE_ARGS,
]
# On a GPU SGLang runs CUDA graphs, which its torch_native backend can't be captured in (SGLang would
# turn graphs off): the reference there is SGLang's triton decode.
REFERENCE_DECODE = "triton" if ON_GPU else "torch_native"
SERVERS = {"deft": ["--decode-attention-backend", "deft"],
           "deft_no_overlap": ["--decode-attention-backend", "deft", "--disable-overlap-schedule"],
           "reference": ["--decode-attention-backend", REFERENCE_DECODE]}


def server_launch(**env: str) -> dict:
    """``ServerProcess``'s cwd and env for these servers, with ``env`` added."""
    if ON_GPU:
        base, cwd = gpu_package_env()
        # Triton's float32 dots are TF32 unless told otherwise; SGLang's triton prefill would then give
        # a prompt prefilled in other chunks (a batch vs alone) logprobs further apart than LOGPROB_ATOL.
        base["TRITON_F32_DEFAULT"] = "ieee"
    else:
        base, cwd = dict(os.environ), REPO
    return {"cwd": cwd, "env": {**base, **env}}


DEFT_SERVERS = ("deft", "deft_no_overlap")

# ~300 tokens of the tiny byte-level tokenizer; the shared prefix of every workload.
CONTEXT = (
    "The archive held letters from seven harbours, each sealed with wax of a different colour. "
    "Mira sorted them by the tides recorded in their margins, then by the names of the ships, "
    "and finally by the faint smell of salt that clung to the oldest pages. Three letters spoke "
    "of a lighthouse that had gone dark for a single night; two described a storm that no "
    "almanac remembered; the last two were addressed to someone who had never lived in the town. "
)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("servers")
    launch = server_launch()
    running = {name: ServerProcess(name, SERVER_ARGS + extra, log_dir / f"{name}.log", **launch)
               for name, extra in SERVERS.items()}
    with serving(running, STARTUP_TIMEOUT_S):
        yield running


@sgl.function
def nested_forks(s, context):
    s += context
    branches = s.fork(2)
    for i, branch in enumerate(branches):
        branch += f" Idea {i + 1}:"
        branch += sgl.gen("idea", max_tokens=MAX_TOKENS, temperature=0, return_logprob=True)
    leaves = []
    for branch in branches:
        for j, leaf in enumerate(branch.fork(2)):
            leaf += f" Check {j + 1}:"
            leaf += sgl.gen("check", max_tokens=MAX_TOKENS, temperature=0, return_logprob=True)
            leaves.append(leaf)
    generated = [(b, "idea") for b in branches] + [(leaf, "check") for leaf in leaves]
    return [(state[var], token_logprobs(state.get_meta_info(var))) for state, var in generated]


def token_logprobs(meta_info: dict) -> list[float]:
    return [t[0] for t in meta_info["output_token_logprobs"]]


# Same tokens is too weak a check on this model: dropping one KV token of every shared node leaves
# every greedy token unchanged but moves logprobs by 7e-4 to 0.2 (measured with a broken builder),
# while deft and torch_native, both fp32, agree far closer than this.
LOGPROB_ATOL = 2e-4


def assert_same_generation(deft_ids, deft_lps, ref_ids, ref_lps):
    assert deft_ids == ref_ids
    assert deft_lps == pytest.approx(ref_lps, abs=LOGPROB_ATOL)


def assert_same_output(out: dict, ref: dict) -> None:
    """Two ``/generate`` responses (with ``return_logprob``): the same tokens, logprobs close."""
    assert_same_generation(out["output_ids"], token_logprobs(out["meta_info"]),
                           ref["output_ids"], token_logprobs(ref["meta_info"]))


def greedy(max_new_tokens=MAX_TOKENS, **extra) -> dict:
    return {"temperature": 0, "max_new_tokens": max_new_tokens, **extra}


def test_nested_fork_program_matches(servers):
    results = {}
    for name, server in servers.items():
        state = nested_forks.run(context=CONTEXT, backend=RuntimeEndpoint(server.url))
        results[name] = state.ret_value
    for deft in DEFT_SERVERS:
        assert len(results[deft]) == 6 and all(text for text, _ in results[deft])
        for (deft_text, deft_lps), (ref_text, ref_lps) in zip(results[deft], results["reference"]):
            assert_same_generation(deft_text, deft_lps, ref_text, ref_lps)


def test_parallel_sampling_n_matches(servers):
    payload = {"text": CONTEXT + " Summary:", "sampling_params": greedy(n=4), "return_logprob": True}
    outs = {name: server.generate(payload) for name, server in servers.items()}
    for name in DEFT_SERVERS:
        assert len(outs[name]) == 4
        for deft, ref in zip(outs[name], outs["reference"]):
            assert_same_output(deft, ref)


def test_shared_prefix_batch_matches(servers):
    prompts = [CONTEXT + f" Question {c}:" for c in "ABCD"]
    payload = {"text": prompts, "sampling_params": greedy(), "return_logprob": True}
    outs = {name: server.generate(payload) for name, server in servers.items()}
    for name in DEFT_SERVERS:
        for deft, ref in zip(outs[name], outs["reference"]):
            assert_same_output(deft, ref)
    assert len({tuple(o["output_ids"]) for o in outs["reference"]}) > 1  # the branches really differ


def test_workload_is_sensitive_to_context(servers):
    """One early token changed: the reference's continuations change. So token equality above is a
    check of the attention over the shared prefix, not of the last few prompt tokens alone."""
    ref = servers["reference"]
    perturbed = CONTEXT.replace("seven", "eight", 1)
    prompts = [f" Question {c}:" for c in "ABCD"]
    a = [o["output_ids"] for o in ref.generate({"text": [CONTEXT + p for p in prompts], "sampling_params": greedy()})]
    b = [o["output_ids"] for o in ref.generate({"text": [perturbed + p for p in prompts], "sampling_params": greedy()})]
    assert all(x != y for x, y in zip(a, b))


@pytest.mark.parametrize("name", DEFT_SERVERS)
def test_sharing_metrics_show_shared_kv(servers, name):
    """Runs after the workloads (file order): the deft servers' decode steps read shared KV once."""
    rows = parse_sharing_lines(servers[name].log())
    assert rows, f"the {name} server logged no sharing line"
    last = rows[-1]
    assert last["total_unique_kv_tokens"] < last["total_attended_kv_tokens"]
    assert max(r["ratio"] for r in rows) > 2.0  # 4 branches over a ~300-token prompt share most of it
    assert "decode_backend=deft" in servers[name].log()
    assert parse_sharing_lines(servers["reference"].log()) == []  # only deft decodes produce them


@pytest.mark.parametrize("name, overlap", [("deft", True), ("deft_no_overlap", False)])
def test_the_deft_servers_differ_in_the_overlap_scheduler(servers, name, overlap):
    """SGLang may turn the overlap scheduler off by itself: its logged arguments show it did not."""
    assert f"disable_overlap_schedule={not overlap}," in servers[name].log()
