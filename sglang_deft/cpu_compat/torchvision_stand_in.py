"""Stand-in for the few torchvision names SGLang modules import at module level on a text-model path.

Served (by ``sglang_deft.cpu_compat``) only while one of those modules executes:
``sglang/srt/utils/common.py`` (``torchvision.io.decode_jpeg``, for JPEG inputs of multimodal models)
and ``sglang/srt/multimodal/internvl_utils.py`` (``torchvision.transforms`` to build image transforms,
reached through ``sglang.srt.configs``). Nothing here runs for a text model; anything called raises.
"""
from __future__ import annotations

import enum


def _unavailable(name: str):
    def stand_in(*args, **kwargs):
        raise RuntimeError(
            f"torchvision.{name} was called, but torchvision is not installed: sglang_deft.cpu_compat "
            "only stands in for SGLang's module-level imports. Image and video inputs are not "
            "supported on the CPU-only install."
        )

    stand_in.__name__ = name.rsplit(".", 1)[-1]
    return stand_in


class InterpolationMode(enum.Enum):
    """Same members as torchvision's, so SGLang's module-level references resolve."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


# module name -> attributes it gets
MODULES = {
    "torchvision": {},
    "torchvision.io": {"decode_jpeg": _unavailable("io.decode_jpeg")},
    "torchvision.transforms": {
        "InterpolationMode": InterpolationMode,
        **{n: _unavailable(f"transforms.{n}") for n in ("Compose", "Lambda", "Resize", "ToTensor", "Normalize")},
    },
    "torchvision.transforms.functional": {"InterpolationMode": InterpolationMode},
}
PACKAGES = {"torchvision", "torchvision.transforms"}
