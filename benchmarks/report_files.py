"""Result files written whole or not at all.

The GPU host's scripts run under timeouts (gpu_session.sh's ``timeout -k``, bench_kernels' isolating parent
stopping its child) that can kill a process mid-write. Written in place, a report was then left truncated and the
run's earlier results with it; written to a file beside it and renamed over it, the last whole report stays.
"""
from __future__ import annotations

from pathlib import Path


def write_replacing(path: Path, text: str) -> None:
    """``text`` into ``path`` through ``<path>.tmp`` and a rename (atomic within one file system)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
