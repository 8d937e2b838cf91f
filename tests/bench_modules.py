"""benchmarks/trees.py and benchmarks/bench_kernels.py as modules, loaded once per process for every test
file that reads them (bench_kernels imports trees under the same registered name)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


T = _load("deft_bench_trees", ROOT / "benchmarks" / "trees.py")
BENCH = _load("deft_bench_kernels", ROOT / "benchmarks" / "bench_kernels.py")
