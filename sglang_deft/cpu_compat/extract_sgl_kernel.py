"""Install sgl_kernel's Python files from a sglang-kernel wheel, leaving out its native libraries.

``python -m sglang_deft.cpu_compat.extract_sgl_kernel WHEEL [SITE_PACKAGES]``: SGLang imports
``sgl_kernel`` (and reads data such as ``scalar_type`` from it) even on CPU, but the wheel's 1.4 GB of
CUDA libraries cannot load without a CUDA driver. ``sglang_deft.cpu_compat`` supplies the stand-in
for the native library. Writes a ``.dist-info`` (METADATA only) so that the files are known to pip.
"""
from __future__ import annotations

import argparse
import sysconfig
import zipfile
from pathlib import Path

_NATIVE_SUFFIXES = (".so", ".a", ".pyd", ".dll")


def extract(wheel: Path, site_packages: Path) -> list[str]:
    """Extract ``sgl_kernel/**`` (no native files) and the wheel's METADATA; returns the written names."""
    written = []
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            keep = name.startswith("sgl_kernel/") and not name.endswith(_NATIVE_SUFFIXES)
            if name.endswith(".dist-info/METADATA"):
                keep = True
            if keep and not name.endswith("/"):
                zf.extract(name, site_packages)
                written.append(name)
    if not any(n.startswith("sgl_kernel/__init__.py") for n in written):
        raise SystemExit(f"{wheel} holds no sgl_kernel/__init__.py: not a sglang-kernel wheel")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("site_packages", type=Path, nargs="?", default=Path(sysconfig.get_paths()["purelib"]))
    args = parser.parse_args()
    written = extract(args.wheel, args.site_packages)
    print(f"extracted {len(written)} files of {args.wheel.name} into {args.site_packages}")


if __name__ == "__main__":
    main()
