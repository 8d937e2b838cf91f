"""Result files: written whole or not at all, and labelled with the commit they measured.

The GPU host's scripts run under timeouts (gpu_session.sh's ``timeout -k``, bench_kernels' isolating parent
stopping its child) that can kill a process mid-write. Written in place, a report was then left truncated and the
run's earlier results with it; written to a file beside it and renamed over it, the last whole report stays.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_replacing(path: Path, text: str) -> None:
    """``text`` into ``path`` through ``<path>.<pid>.tmp`` and a rename (atomic within one file system). A write that
    fails or is interrupted removes its temporary file: in $OUT it would count against the files a device call
    brings back."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def commit_label(given: str | None = None) -> str:
    """What a report names as its commit: ``given`` (a script's --commit), else $DEFT_COMMIT (gpu_session.sh exports
    it, as `git describe --always --dirty` printed it in the checkout), else that command here, else "unknown".

    The last fallback is for runs in a checkout: on the GPU host the tree's .git can be older than the tree, which
    is why gpu_session.sh's result phases require DEFT_COMMIT. Uncommitted changes show as ``<sha>-dirty``."""
    if given:
        return given
    if os.environ.get("DEFT_COMMIT"):
        return os.environ["DEFT_COMMIT"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def precision_label(meta: dict) -> str:
    """A kernel report's precision as its table and plot title name it: the dtype, and an fp8 KV cache and a logit cap
    where the run had them (a plot that named only the dtype read as the plain bf16 run)."""
    label = meta["dtype"]
    if meta.get("kv_dtype", "same") != "same":
        label += f", KV cache {meta['kv_dtype']}"
    if meta.get("logit_cap"):
        label += f", logit cap {meta['logit_cap']:g}"
    return label
