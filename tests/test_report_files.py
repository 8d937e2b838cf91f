"""benchmarks/report_files.py: the one way the GPU host's scripts write their reports."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import report_files  # noqa: E402
from bench_modules import BENCH  # noqa: E402


def _by_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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


@pytest.mark.parametrize("script", ["scripts/gpu_e2e.py", "benchmarks/bench_step_host.py"])
def test_every_report_writer_uses_it(script):
    """bench_e2e writes through gpu_e2e's; a copy of its own per script is how in-place writes came back before."""
    module = _by_file(f"report_writer_{Path(script).stem}", REPO / script)
    assert Path(module.write_replacing.__code__.co_filename) == REPO / "benchmarks" / "report_files.py"


def test_bench_kernels_uses_it():
    assert Path(BENCH.write_replacing.__code__.co_filename) == REPO / "benchmarks" / "report_files.py"
