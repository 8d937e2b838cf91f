"""The Makefile's choice of Python for `make demo` (dry runs, `make -n`): only PYTHON on make's command line
names another SGLang; a PYTHON the shell exports (node-gyp setups export one) is set aside, and make says so."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_PYTHON = ".venv/bin/python"
NOTICE = "from the environment is not used"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")


def dry_run_demo(args=(), env_python=None) -> tuple[str, list[str]]:
    """make's notices and the demo recipe's first command (the import check), as a dry run prints them."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "MAKEFLAGS", "MAKELEVEL")}
    if env_python is not None:
        env["PYTHON"] = env_python
    out = subprocess.run(["make", "-n", "demo", *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.splitlines()
    check = [line for line in out if "import sglang_deft.kernels, sglang_deft.patches" in line]
    assert check, out
    return check[0].split(" -c ")[0], [line for line in out if NOTICE in line]


def test_command_line_python_runs_the_demo():
    python, notices = dry_run_demo(["PYTHON=python3"])
    assert (python, notices) == ("python3", [])


def test_environment_python_is_set_aside_and_said_so():
    python, notices = dry_run_demo(env_python="python3")
    assert python == VENV_PYTHON
    assert notices == [f"PYTHON=python3 {NOTICE}: {VENV_PYTHON} is (another SGLang: make demo PYTHON=python3)"]


@pytest.mark.parametrize("env_python", [None, VENV_PYTHON, str(REPO / VENV_PYTHON)],
                         ids=["unset", "the-venvs", "the-venvs-absolute"])
def test_default_python_is_the_venvs_without_a_notice(env_python):
    assert dry_run_demo(env_python=env_python) == (VENV_PYTHON, [])


def test_other_targets_say_nothing_of_an_environment_python():
    env = {**{k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL")}, "PYTHON": "python3"}
    out = subprocess.run(["make", "-n", "test"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert NOTICE not in out and f"{VENV_PYTHON} -m pytest" in out
