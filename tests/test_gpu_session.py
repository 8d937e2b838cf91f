"""scripts/gpu_session.sh's own logic, run here with SKIP_BOOTSTRAP (this environment has SGLang; no GPU is used)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from repo_modules import REPO


def test_an_e2e_run_that_saves_nothing_is_not_summarised_from_an_earlier_json(tmp_path):
    """gpu_e2e.py stopped before its first save (here by an argument error) left the previous run's JSON in $OUT,
    which the phase then printed as this run's: ok=True beside exit 2."""
    (tmp_path / "gpu_e2e.json").write_text(json.dumps({"ok": True, "complete": True, "wall_s": 99, "models": {}}))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", SKIP_BOOTSTRAP="1",
               DEFT_COMMIT="abc1234", E2E_ARGS="--tiny-dtype=float8", OUT=str(tmp_path), SESSION_S="100")
    result = subprocess.run(["bash", "scripts/gpu_session.sh", "e2e-tiny"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    log = result.stdout + result.stderr
    assert result.returncode == 2 and "gpu_e2e rc=2" in log, log[-3000:]
    assert "ok=True" not in log and not (tmp_path / "gpu_e2e.json").exists()
