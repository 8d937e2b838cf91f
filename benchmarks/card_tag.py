"""The GPU's short name for result file names (``kernels_h100.json``, ``e2e_h200.json``), as nvidia-smi reports it,
and its memory.

A loan asked for as an H200 may come as an H100; files named ``h200`` whatever the card mislabelled such runs.
nvidia-smi, not torch: asking torch would create a CUDA context in processes that leave the GPU to their children
(bench_kernels' isolating parent, bench_e2e's client). ``python3 benchmarks/card_tag.py`` prints it for shell scripts.
"""
from __future__ import annotations

import re
import subprocess

_MODEL = re.compile(r"\b[A-Z][0-9]{2,4}\b")  # H200, H100, A100, L40, B200; not the "80GB" of "H100 80GB HBM3"


def tag_from_name(name: str) -> str | None:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``; None for a name without a model number."""
    found = _MODEL.search(name)
    return found.group(0).lower() if found else None


def first_gpu(field: str) -> str | None:
    """nvidia-smi's ``field`` (``--query-gpu``, no header, no units) of the first GPU; None where nvidia-smi is missing
    or fails."""
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits", "-i", "0"],
                              capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def card_tag(default: str = "cuda") -> str:
    """The first GPU's tag, or ``default`` where nvidia-smi is missing or names no model number."""
    return tag_from_name(first_gpu("name") or "") or default


def memory_gib() -> float | None:
    """The first GPU's total memory in GiB (bench_e2e starts its servers in waves that fit it); None where nvidia-smi
    does not say."""
    try:
        return float(first_gpu("memory.total")) / 1024  # MiB
    except (TypeError, ValueError):
        return None


if __name__ == "__main__":
    print(card_tag())
