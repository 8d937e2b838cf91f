"""make test's xdist scheduling (tests/conftest.py): the tests that share servers run on one worker."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

import conftest
from conftest import INDEPENDENT_TESTS_MODULES, TINY_SERVER_MODULES, xdist_scope

TESTS = Path(__file__).resolve().parent


def test_units_are_modules_the_tiny_servers_group_or_single_tests():
    assert xdist_scope("tests/test_e2e_cpu.py::test_parallel_sampling_n_matches") == "tiny_servers"
    assert xdist_scope("tests/test_e2e_cpu_tp.py::test_tp2_generates_what_tp1_does") == "tiny_servers"
    robust = ["tests/test_e2e_cpu_robustness.py::test_abort_mid_generation",
              "tests/test_e2e_cpu_robustness.py::test_radix_cache_off"]
    assert {xdist_scope(n) for n in robust} == {"test_e2e_cpu_robustness.py"}
    kernels = ["tests/test_kernels.py::test_tree_shapes[one_node-torch.float16]",
               "tests/test_kernels.py::test_tree_shapes[one_node-torch.float32]"]
    assert [xdist_scope(n) for n in kernels] == kernels


def test_every_module_on_tiny_servers_is_in_their_group():
    """A module using the session's tiny_servers outside the group would start them again on the
    other worker."""
    users = {p.name for p in TESTS.glob("test_*.py")
             if re.search(r"def \w+\([^)]*\btiny_servers\b", p.read_text())}
    assert users == TINY_SERVER_MODULES


def test_modules_scheduled_test_by_test_start_no_servers():
    for name in INDEPENDENT_TESTS_MODULES:
        text = (TESTS / name).read_text()
        assert "ServerProcess(" not in text and 'scope="session"' not in text, name


class Config:
    """What xdist's scheduler reads of pytest's config: two workers."""

    def __init__(self, dist: str):
        self.dist = dist
        self.option = SimpleNamespace(loadscopereorder=True)

    def getvalue(self, name: str):
        return {"dist": self.dist, "tx": ["2*popen"]}[name]


class Worker:
    """xdist's view of a worker: it is sent indices of the collection and told to shut down."""

    def __init__(self, name: str):
        self.gateway = SimpleNamespace(id=name)
        self.pending: list[int] = []
        self.shutting_down = False

    def send_runtest_some(self, indices):
        self.pending.extend(indices)

    def shutdown(self):
        self.shutting_down = True


def test_the_scheduler_sends_each_group_to_one_worker_and_spreads_the_rest():
    pytest.importorskip("xdist")
    collection = ([f"tests/test_e2e_cpu.py::test_{i}" for i in range(4)]
                  + ["tests/test_e2e_cpu_triton.py::test_t", "tests/test_e2e_cpu_tp.py::test_tp"]
                  + [f"tests/test_e2e_cpu_robustness.py::test_{i}" for i in range(3)]
                  + [f"tests/test_kernels.py::test_tree_shapes[{i}]" for i in range(8)])
    scheduler = conftest.pytest_xdist_make_scheduler(Config("loadgroup"), None)
    workers = [Worker("gw0"), Worker("gw1")]
    for worker in workers:
        scheduler.add_node(worker)
        scheduler.add_node_collection(worker, collection)
    scheduler.schedule()
    ran: dict[int, list[str]] = {0: [], 1: []}
    while any(w.pending for w in workers):
        for i, worker in enumerate(workers):
            if worker.pending:
                index = worker.pending.pop(0)
                ran[i].append(collection[index])
                scheduler.mark_test_complete(worker, index)
    assert sorted(ran[0] + ran[1]) == sorted(collection)
    on = {i: {xdist_scope(n).split("::")[0] for n in ran[i]} for i in ran}
    for group in ("tiny_servers", "test_e2e_cpu_robustness.py"):
        assert (group in on[0]) != (group in on[1]), f"{group} ran on both workers"
    assert all("tests/test_kernels.py" in on[i] for i in ran)  # single kernel tests fill both workers
    assert conftest.pytest_xdist_make_scheduler(Config("load"), None) is None  # only make test's --dist
