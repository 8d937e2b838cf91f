"""The repo's scripts and benchmarks (not packages) as modules for the tests, where the tests' children import
sglang_deft from, and the result a child prints."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import sglang_deft

REPO = Path(__file__).resolve().parents[1]
# The children run from the directory that holds the sglang_deft this process imported: `-m` and `-c` put the cwd
# first on sys.path, and on the GPU host, where the repo is not installed, the repo root's sglang_deft lacks the
# kernels and patches that the overlay (scripts/gpu_e2e.py --make-overlay) puts beside it. Not resolved: the
# overlay is symlinks.
PACKAGE_ROOT = Path(sglang_deft.__file__).parent.parent


def load_module(name: str, path: Path):
    """A repo file as the module ``name``, once per process, registered in sys.modules (dataclasses look their
    module up there, and two test files loading the same script share one module)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]  # a half-run module must not be handed to the next caller
        raise
    return mod


def child_result(args: list[str], cwd: Path = PACKAGE_ROOT, timeout: float = 300,
                 env: dict | None = None) -> tuple[dict, subprocess.CompletedProcess]:
    """Runs ``python *args`` (a test's child), asserts that it exited 0, and returns what it printed as
    ``RESULT <json>``, with the finished run."""
    run = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert run.returncode == 0, (run.returncode, run.stderr[-4000:])
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), run
