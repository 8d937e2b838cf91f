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


# Forms of one model whose memory and clocks differ (H100 NVL's 3.9 TB/s, PCIe's 2 TB/s against SXM's 3.35): named apart,
# so that their results do not land in one file name. The SXM form keeps the bare model ("NVIDIA H100 80GB HBM3").
_FORMS = (("NVL", "nvl"), ("PCIe", "pcie"))


def tag_from_name(name: str) -> str | None:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``, ``"NVIDIA H100 NVL"`` -> ``"h100nvl"``; None for a name without a
    model number."""
    found = _MODEL.search(name)
    if not found:
        return None
    # (nvidia-smi spells it "H100 PCIe" but "A100-PCIE-40GB")
    return found.group(0).lower() + "".join(suffix for form, suffix in _FORMS
                                            if re.search(rf"\b{form}\b", name, re.IGNORECASE))


def _smi(field: str, ident: str | None = None) -> list[str] | None:
    """nvidia-smi's ``field`` (no header, no units), one line per GPU (of ``ident`` alone, an index or UUID, when
    given); None where nvidia-smi is missing or fails."""
    cmd = ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"] + (["-i", ident] if ident else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()] or None


def gpu_field(field: str, index: int = 0) -> str | None:
    """nvidia-smi's ``field`` of the GPU that torch calls ``cuda:index`` in this process; None where nvidia-smi is
    missing or fails, or where it cannot tell which GPU that is.

    nvidia-smi ignores ``CUDA_VISIBLE_DEVICES``, so its ``index``-th entry is asked for by ``-i``: a UUID names one
    GPU; a number, like torch's index without the variable, is CUDA's count, which is nvidia-smi's only in PCI order
    (``CUDA_DEVICE_ORDER=PCI_BUS_ID``; CUDA's default puts the fastest first). Otherwise the answer stands only when
    every GPU gives the same one (a host of one model, as every GPU host here)."""
    pci_order = os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if index >= len(entries):
            return None
        ident = entries[index]
        if not ident.isdigit() or pci_order:
            one = _smi(field, ident)
            return one[0] if one else None
    every = _smi(field)
    if not every or (visible is None and index >= len(every)):
        return None
    if len(set(every)) == 1:
        return every[0]
    return every[index] if pci_order and visible is None else None


def card_tag(default: str = "cuda", index: int = 0) -> str:
    """The tag of the GPU torch calls ``cuda:index`` here, or ``default`` where nvidia-smi is missing, cannot tell
    which GPU that is, or names no model number."""
    return tag_from_name(gpu_field("name", index) or "") or default


def memory_gib() -> float | None:
    """The first GPU's total memory in GiB (bench_e2e starts its servers in waves that fit it); None where nvidia-smi
    does not say."""
    try:
        return float(gpu_field("memory.total")) / 1024  # MiB
    except (TypeError, ValueError):
        return None


if __name__ == "__main__":
    print(card_tag())
