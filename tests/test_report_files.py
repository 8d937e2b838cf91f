"""benchmarks/report_files.py: the one way the GPU host's scripts write their reports."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import report_files  # noqa: E402
from bench_modules import BENCH  # noqa: E402
from repo_modules import load_module  # noqa: E402


def test_a_write_killed_midway_leaves_the_last_whole_file_and_a_finished_one_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "kernels_h200.json"
    report_files.write_replacing(path, '{"cases": [1]}')
    report_files.write_replacing(path, '{"cases": [1, 2]}')
    assert path.read_text() == '{"cases": [1, 2]}' and [p.name for p in tmp_path.iterdir()] == [path.name]
    real = Path.write_text

    def killed(self, text, *a, **kw):
        real(self, text[:5], *a, **kw)
        raise KeyboardInterrupt  # gpu_session.sh's SIGINT, arriving mid-write

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        report_files.write_replacing(path, '{"cases": [1, 2, 3]}')
    assert path.read_text() == '{"cases": [1, 2]}'
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file went with the failed write


@pytest.mark.parametrize("script", ["scripts/gpu_e2e.py", "benchmarks/bench_step_host.py"])
def test_every_report_writer_uses_it(script):
    """bench_e2e writes through gpu_e2e's; a copy of its own per script is how in-place writes came back before."""
    module = load_module(f"report_writer_{Path(script).stem}", REPO / script)
    assert Path(module.write_replacing.__code__.co_filename) == REPO / "benchmarks" / "report_files.py"


def test_bench_kernels_uses_it():
    assert Path(BENCH.write_replacing.__code__.co_filename) == REPO / "benchmarks" / "report_files.py"


def test_the_commit_label_is_the_callers_then_deft_commit_then_git_describe(monkeypatch):
    """gpu_session.sh passes the checkout's `git describe --dirty` as DEFT_COMMIT because the GPU host's .git can be
    older than its tree; only a run without it asks git, as `describe --dirty` (uncommitted code shows)."""
    import subprocess

    monkeypatch.setenv("DEFT_COMMIT", "abc1234-dirty")
    assert report_files.commit_label("given") == "given"
    assert report_files.commit_label() == "abc1234-dirty"
    monkeypatch.delenv("DEFT_COMMIT")
    described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    assert report_files.commit_label() == (described.stdout.strip() if described.returncode == 0 else "unknown")
    gpu_e2e = load_module("report_writer_gpu_e2e", REPO / "scripts" / "gpu_e2e.py")
    assert gpu_e2e.device_info("x")["commit"] == "x"
    monkeypatch.setenv("DEFT_COMMIT", "abc1234")
    assert gpu_e2e.device_info(None)["commit"] == "abc1234"


def test_a_sweeps_report_names_its_gpu_date_and_commit(monkeypatch):
    import sweep_stage1  # (its kernels: on the CPU under the TRITON_INTERPRET=1 that conftest.py sets)

    monkeypatch.setenv("DEFT_COMMIT", "abc1234")
    meta = sweep_stage1.run_metadata()
    assert meta["commit"] == "abc1234" and meta["date"].endswith("+00:00") and meta["gpu"]
    cells = {"x": {"median_us": 1.0, "ok": True, "stage1_us": 0.5, "stage2_us": 0.5}}
    md = sweep_stage1.markdown({"metadata": meta, "default": "a", "configs": {"a": cells}})
    assert md.startswith(f"{meta['gpu']}, {meta['date']}, commit abc1234")
