"""scripts/diagnose_graph_bitwise.py runs only on a GPU host, with names it takes from the CUDA-graph test module
(which skips without a GPU): a rename there broke it unseen (``_importable_package_env``, moved to server_group,
stopped it with an AttributeError before any server started). Checked here without importing either module."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "diagnose_graph_bitwise.py"


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_the_names_the_script_takes_from_the_tests_exist():
    script = ast.parse(SCRIPT.read_text())
    from_test = {n.attr for n in ast.walk(script)
                 if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "T"}
    assert from_test, "the script no longer reads the test module as T: update this test"
    assert from_test - top_level_names(REPO / "tests" / "test_cuda_graph_gpu.py") == set()
    from_group = {a.name for n in script.body if isinstance(n, ast.ImportFrom) and n.module == "server_group"
                  for a in n.names}
    assert from_group - top_level_names(REPO / "tests" / "server_group.py") == set()


def test_the_servers_get_a_model():
    """The test's SERVER_ARGS hold no --model-path (its fixture adds one): the script must add it too."""
    assert '"--model-path"' in SCRIPT.read_text()


def test_help_runs_without_a_gpu():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "first token" in result.stdout, result.stderr
