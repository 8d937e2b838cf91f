"""Test session setup: SGLang importable on a machine without CUDA, and the servers several modules share.

``sglang_deft.cpu_compat.install()`` must run before the first ``sglang.srt`` import of the session,
so it runs here, at collection start. On a CUDA machine it is not needed and not installed.

``make test`` runs two pytest-xdist workers, scheduled as ``pytest_xdist_make_scheduler`` below says.
"""
import os

import torch

if not torch.cuda.is_available():
    # The Triton kernels (deft's, SGLang's paged allocator) run on CPU buffers only under the interpreter,
    # which `make test` sets; a bare `pytest` gets it too, before anything creates a kernel.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import sglang_deft.cpu_compat

    sglang_deft.cpu_compat.install()
    from sglang_deft.launch_server import FORK_CHILDREN_ENV

    # Every server the tests start (here, in scripts they run) forks SGLang's children: ~30 s less CPU a server
    # (launch_server.fork_sglang_children). tiny_servers below spawn them, as users' servers do.
    os.environ.setdefault(FORK_CHILDREN_ENV, "1")

# A sharing line logged when decoding pauses (sglang_deft.sharing_metrics) would cut the windows that in-process
# tests count whenever a step takes longer than the pause on a loaded machine; the tests of that pause set it.
os.environ.setdefault("SGLANG_DEFT_SHARING_IDLE_S", "0")

import pytest  # noqa: E402  (after the compatibility layer: nothing here imports sglang at load)


@pytest.fixture(scope="module")
def model_config(server_args):
    """The ModelConfig of the requesting module's ``server_args`` (backend unit tests)."""
    from sglang.srt.configs.model_config import ModelConfig

    return ModelConfig.from_server_args(server_args)


@pytest.fixture
def single_rank(monkeypatch):
    """One attention TP rank: SGLang sets the size in its distributed init, which unit tests skip."""
    import sglang_deft.backend

    monkeypatch.setattr(sglang_deft.backend, "get_attention_tp_size", lambda: 1)


@pytest.fixture(scope="session")
def tiny_servers(tmp_path_factory):
    """test_e2e_cpu's three servers (deft, deft_no_overlap, reference), started once per session: the
    Triton-path and TP modules compare against them too. A server start costs ~37 s of CPU (three
    processes that each import SGLang; measured on the 2-core dev machine), and server starts are
    most of what ``make test`` takes. These spawn SGLang's scheduler and detokenizer as a user's server does
    (the other tests' servers fork them to save those imports), so that deft's registration in spawned
    processes (``sglang_deft.subprocess_entry``) is what the main end-to-end tests run on."""
    from test_e2e_cpu import serving_tiny_servers  # test_e2e_cpu imports SGLang: only once it is needed

    with serving_tiny_servers(tmp_path_factory.mktemp("tiny_servers")) as running:
        yield running


# Modules whose tests share nothing costly (no servers, no subprocess per module): xdist may spread
# their tests over the workers one by one. Every other module's tests run on one worker together
# (its module-scoped servers start once), and TINY_SERVER_MODULES' tests all on one.
INDEPENDENT_TESTS_MODULES = {"test_kernels.py", "test_cuda_graph_plan.py", "test_launcher.py"}
TINY_SERVER_MODULES = {"test_e2e_cpu.py", "test_e2e_cpu_triton.py", "test_e2e_cpu_tp.py"}  # tiny_servers


def xdist_scope(nodeid: str) -> str:
    """The unit of work make test's scheduler gives one worker that ``nodeid`` belongs to."""
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    if module in TINY_SERVER_MODULES:
        return "tiny_servers"
    return nodeid if module in INDEPENDENT_TESTS_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` (make test): xdist's loadscope scheduling over :func:`xdist_scope`'s units
    instead of xdist's own loadgroup, which groups by ``xdist_group`` marks but cannot under pytest
    9.2 (it renames the marked tests' node ids through ``Item._nodeid``, which pytest 9.2 no longer
    reads: every test would be scheduled alone, and each worker start the same module's servers).
    Units are handed out largest first (loadscope's order), so the server groups start early and
    single tests fill in."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ServerAwareScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return ServerAwareScheduling(config, log)
