"""The GPU's short name for result file names (``kernels_h100.json``, ``e2e_h200.json``), as nvidia-smi reports it,
and its memory.

A loan asked for as an H200 may come as an H100; files named ``h200`` whatever the card mislabelled such runs.
nvidia-smi, not torch: asking torch would create a CUDA context in processes that leave the GPU to their children
(bench_kernels' isolating parent, bench_e2e's client). ``python3 benchmarks/card_tag.py`` prints it for shell scripts.
"""
from __future__ import annotations

import os
import re
import subprocess

# H200, H100, A100, B200, L40S, GH200, A10G, T4; not the "80GB" or "HBM3" of "H100 80GB HBM3"
_MODEL = re.compile(r"\b[A-Z]{1,2}[0-9]{1,4}[A-Z]?\b")


def tag_from_name(name: str) -> str | None:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``; None for a name without a model number."""
    found = _MODEL.search(name)
    return found.group(0).lower() if found else None


def first_gpu(field: str) -> str | None:
    """nvidia-smi's ``field`` (``--query-gpu``, no header, no units) of the first GPU this process sees (the first of
    ``CUDA_VISIBLE_DEVICES``, an index or UUID, which nvidia-smi ignores; a ``--device cuda:N`` is not followed);
    None where nvidia-smi is missing or fails."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip() or "0"
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits", "-i", first],
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
