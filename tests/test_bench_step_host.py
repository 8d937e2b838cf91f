"""benchmarks/bench_step_host.py on the CPU (``TRITON_INTERPRET=1`` runs the steady steps' kernel): every
measured step is counted once as a full plan or a steady step, warm-up steps are not, the mean is over all
measured steps, and the check of what the plans read fails when a plan reads the wrong slots."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from sglang_deft.step_planner import SLACK_TOKENS

from repo_modules import REPO, load_module

sh = load_module("bench_step_host", REPO / "benchmarks" / "bench_step_host.py")

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("the steady steps' Triton kernel needs TRITON_INTERPRET=1 on the CPU", allow_module_level=True)


def fresh_clock(monkeypatch):
    """Call i of the clock returns sum(1..i) us: step s (calls 2s+1, 2s+2) takes 2s + 2 us."""
    calls = iter(range(1, 10 ** 6))
    total = [0.0]

    def clock():
        total[0] += next(calls) * 1e-6
        return total[0]

    monkeypatch.setattr(sh, "time", SimpleNamespace(perf_counter=clock))


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setitem(sh.CASES, "small", (40, 4, 3))
    fresh_clock(monkeypatch)
    return "small"


def test_step_counts_and_mean(small, monkeypatch):
    r = sh.run_case(small, torch.device("cpu"), steps=5, warmup=2, busy=False)
    assert r["full_steps"] + r["steady_steps"] == 5  # the 2 warm-up steps are not timed
    assert r["full_steps"] == 0 and r["checked_reads"] and r["batch"] == 4
    # steps 2..6 took 6, 8, 10, 12, 14 us (the warm-up's first call is the full plan)
    assert r["steady_us"] == 10.0 and r["full_us"] is None and r["mean_us"] == 10.0
    fresh_clock(monkeypatch)
    r = sh.run_case(small, torch.device("cpu"), steps=4, warmup=0, busy=False)
    # steps 0 and 1 are full plans (2 and 4 us), steps 2 and 3 steady (6 and 8 us)
    assert (r["full_steps"], r["steady_steps"], r["full_us"], r["steady_us"]) == (2, 2, 3.0, 7.0)
    assert r["mean_us"] == pytest.approx(5.0)


@pytest.mark.parametrize("bad_call", [0, 1, 2])
def test_a_plan_that_reads_the_wrong_slots_fails(small, monkeypatch, bad_call):
    """The plans of steps 0, 1 and the last are checked (calls 0, 1, 2 of plan_kv_reads)."""
    import sglang_deft.kernels.reference as reference

    real, seen = reference.plan_kv_reads, []

    def reads(plan):
        out = real(plan)
        seen.append(len(seen))
        if seen[-1] == bad_call:
            out[1] = out[1][:-1]  # query 1 misses its newest token
        return out

    monkeypatch.setattr(reference, "plan_kv_reads", reads)
    with pytest.raises(AssertionError, match="query 1 does not read its row once"):
        sh.run_case(small, torch.device("cpu"), steps=4, warmup=1, busy=False)


def test_window_plans_are_timed_apart_and_checked(small, monkeypatch):
    """--window: each step's window plan (the backend's window step planner: full plans, then steady steps) and a
    replan of the window tree are timed apart (the clock's third and fourth calls per step); their reads are each
    query's last W slots, and a plan that misses one fails."""
    calls = iter(range(1, 10 ** 6))
    total = [0.0]

    def clock():  # call i returns sum(1..i) us: step s (calls 4s+1 .. 4s+4) plans its window in 4s + 3 us and
        total[0] += next(calls) * 1e-6  # replans it in 4s + 4 us
        return total[0]

    monkeypatch.setattr(sh, "time", SimpleNamespace(perf_counter=clock))
    r = sh.run_case(small, torch.device("cpu"), steps=3, warmup=1, busy=False, window=10)
    # steps 1..3: window plans of 7 (full, with room), 11 and 15 us (steady); replans of 8, 12, 16 us
    assert r["window"] == 10 and (r["window_full_steps"], r["window_steady_steps"]) == (1, 2)
    assert (r["window_full_us"], r["window_steady_us"], r["window_replan_us"]) == (7.0, 13.0, 12.0)
    assert r["window_mean_us"] == pytest.approx(11.0)
    import sglang_deft.kernels.reference as reference

    real = reference.plan_kv_reads

    def reads(plan):
        out = real(plan)
        if plan.kv_indices.numel() == sh.MAX_BS * (10 + 2 * SLACK_TOKENS) + 1:  # the window step planner's buffers
            out[2] = out[2][1:]
        return out

    monkeypatch.setattr(reference, "plan_kv_reads", reads)
    with pytest.raises(AssertionError, match="query 2 does not read its window once"):
        sh.run_case(small, torch.device("cpu"), steps=3, warmup=0, busy=False, window=10)


def test_the_report_keeps_the_rows_of_a_run_that_stops(tmp_path, monkeypatch):
    """The JSON was written only at the end, so a run cut by gpu_session.sh's timeout left none: now after every
    row, marked complete only at the end."""
    def run_case(key, *args):
        if key == "second":
            raise KeyboardInterrupt  # what a stop looks like from here
        return {"case": key, "batch": 4, "mode": "idle", "steady_us": 1.0, "steady_steps": 3, "full_us": 2.0,
                "full_steps": 1, "mean_us": 1.2}

    monkeypatch.setattr(sh, "run_case", run_case)
    monkeypatch.setattr(sh, "CASES", dict.fromkeys(["first", "second"]))
    with pytest.raises(KeyboardInterrupt):
        sh.main(["--device", "cpu", "--cases", "first,second", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "step_host_cpu.json").read_text())
    assert [r["case"] for r in report["rows"]] == ["first"] and report["complete"] is False
    monkeypatch.setattr(sh, "run_case", lambda key, *args: {**run_case("first"), "case": key})
    assert sh.main(["--device", "cpu", "--cases", "first,second", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "step_host_cpu.json").read_text())["complete"] is True


def test_the_report_is_named_by_card_and_window_and_labelled_with_the_commit(tmp_path, monkeypatch):
    """step_host_<card>.json, named by the card it ran on (a loan asked as an H200 may be an H100), and
    step_host_window_<card>.json with --window: the committed names were given by hand."""
    row = {"case": "first", "batch": 4, "mode": "idle", "steady_us": 1.0, "steady_steps": 3, "full_us": 2.0,
           "full_steps": 1, "mean_us": 1.2, "window_steady_us": 1.0, "window_steady_steps": 3, "window_full_us": 2.0,
           "window_full_steps": 1, "window_mean_us": 1.2, "window_replan_us": 3.0}
    monkeypatch.setattr(sh, "run_case", lambda *a: row)
    monkeypatch.setattr(sh, "CASES", dict.fromkeys(["first"]))
    monkeypatch.setenv("DEFT_COMMIT", "abc1234-dirty")
    assert sh.main(["--device", "cpu", "--cases", "first", "--window", "64", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "step_host_window_cpu.json").read_text())
    assert report["commit"] == "abc1234-dirty" and report["date"].endswith("Z")
    # named by the card --device picks, as torch names it (cuda:1 here), not nvidia-smi's first
    names = {0: "NVIDIA A100-SXM4-80GB", 1: "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(sh.torch.cuda, "get_device_name", lambda device: names[sh.torch.device(device).index])
    monkeypatch.setattr(sh.torch.cuda, "is_available", lambda: True)
    assert sh.main(["--device", "cuda:1", "--cases", "first", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "step_host_h100.json").exists()
    assert json.loads((tmp_path / "step_host_h100.json").read_text())["device"] == "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize("argv, message", [
    (["--cases", "first, nope"], "--cases 'first, nope': unknown nope; the cases are first, second"),
    (["--cases", ","], "--cases ',': no case"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--window", "0"], "--window must be at least 1 token"),
])
def test_bad_arguments_are_refused_before_any_case_runs(tmp_path, monkeypatch, capsys, argv, message):
    """An unknown key (or one after ", ") ran every case before it and then raised KeyError; --steps 0 ran the
    cases and divided by zero steps; --window 0 or below raised from the tree builder or PlanCapacity."""
    ran = []
    monkeypatch.setattr(sh, "run_case", lambda key, *a: ran.append(key))
    monkeypatch.setattr(sh, "CASES", dict.fromkeys(["first", "second"]))
    with pytest.raises(SystemExit) as exited:
        sh.main(["--device", "cpu", "--out", str(tmp_path), *argv])
    assert exited.value.code == 2 and message in capsys.readouterr().err
    assert ran == [] and list(tmp_path.iterdir()) == []


def test_a_run_of_some_cases_is_named_for_them_and_records_its_arguments(tmp_path, monkeypatch):
    """A --cases run wrote step_host_<card>.json, the whole run's name, and replaced it; nor did the report say which
    cases, steps or warm-up it ran."""
    row = {"case": "first", "batch": 4, "mode": "idle", "steady_us": 1.0, "steady_steps": 3, "full_us": 2.0,
           "full_steps": 1, "mean_us": 1.2}
    monkeypatch.setattr(sh, "run_case", lambda *a: row)
    monkeypatch.setattr(sh, "CASES", dict.fromkeys(["first", "second"]))
    assert sh.main(["--device", "cpu", "--cases", "first", "--steps", "5", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "step_host_cpu.json").exists()
    report = json.loads((tmp_path / "step_host_first_cpu.json").read_text())
    assert report["cases"] == ["first"] and report["steps"] == 5 and "--steps" in report["argv"]
    assert sh.main(["--device", "cpu", "--cases", "first,second", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "step_host_cpu.json").read_text())["cases"] == ["first", "second"]
