"""Install sgl_kernel's Python files from a sglang-kernel wheel, leaving out its native libraries.

``python -m sglang_deft.cpu_compat.extract_sgl_kernel WHEEL [SITE_PACKAGES]``: SGLang imports
``sgl_kernel`` (and reads data such as ``scalar_type`` from it) even on CPU, but the wheel's 1.4 GB of
CUDA libraries cannot load without a CUDA driver. ``sglang_deft.cpu_compat`` supplies the stand-in
for the native library. Writes a ``.dist-info`` (the wheel's METADATA, a RECORD of the files written and an
INSTALLER) so that the files are known to pip, which can uninstall or replace them (without a RECORD it refused to).

Only a sglang-kernel wheel of ``VERSION`` (what SGLang 0.5.10.post1 pins) is taken, checked before anything is
written; its files land in a scratch folder first and replace an earlier extraction only once all are out (a corrupt
member leaves nothing behind).
"""
from __future__ import annotations

import argparse
import base64
import email.parser
import hashlib
import shutil
import sysconfig
import tempfile
import zipfile
from pathlib import Path

_NATIVE_SUFFIXES = (".so", ".a", ".pyd", ".dll")
PACKAGE = "sgl_kernel"
DISTRIBUTION = "sglang-kernel"
VERSION = "0.4.1"


def _check(zf: zipfile.ZipFile, wheel: Path) -> str:
    """The wheel's ``.dist-info`` folder name, or SystemExit where it is not sglang-kernel VERSION."""
    names = zf.namelist()
    if f"{PACKAGE}/__init__.py" not in names:
        raise SystemExit(f"{wheel} holds no {PACKAGE}/__init__.py: not a {DISTRIBUTION} wheel")
    metadata = [n for n in names if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
    if len(metadata) != 1:
        raise SystemExit(f"{wheel} holds {len(metadata)} .dist-info/METADATA files, not one: not a wheel")
    fields = email.parser.Parser().parsestr(zf.read(metadata[0]).decode("utf-8", "replace"), headersonly=True)
    name, version = (fields.get("Name") or "").strip(), (fields.get("Version") or "").strip()
    if name.lower().replace("_", "-") != DISTRIBUTION or version != VERSION:
        raise SystemExit(f"{wheel} is {name or '?'} {version or '?'}: the CPU environment takes {DISTRIBUTION} "
                         f"{VERSION}, whose Python files SGLang 0.5.10.post1 imports")
    return metadata[0].split("/")[0]


def extract(wheel: Path, site_packages: Path) -> list[str]:
    """Extract ``sgl_kernel/**`` (no native files) and the wheel's METADATA; returns the written names."""
    written = []
    site_packages.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        dist_info = _check(zf, wheel)
        with tempfile.TemporaryDirectory(prefix=".sgl_kernel-", dir=site_packages) as scratch:
            for name in zf.namelist():
                keep = (name.startswith(f"{PACKAGE}/") and not name.endswith(_NATIVE_SUFFIXES)) or \
                    name == f"{dist_info}/METADATA"
                if keep and not name.endswith("/"):
                    zf.extract(name, scratch)  # raises on a member whose CRC does not match
                    written.append(name)
            _write_record(Path(scratch), dist_info, written)
            # Every file is out: replace an earlier extraction (of this or another release) by this one.
            for old in [site_packages / PACKAGE, *site_packages.glob("sglang_kernel-*.dist-info")]:
                shutil.rmtree(old, ignore_errors=True)
            for folder in (PACKAGE, dist_info):
                (Path(scratch) / folder).rename(site_packages / folder)
    return written


def _write_record(root: Path, dist_info: str, written: list[str]) -> None:
    """``dist_info``'s INSTALLER and RECORD (one line per file: path, sha256 as the wheel spec writes it, size; RECORD
    itself without either) for the files ``written`` under ``root``."""
    (root / dist_info / "INSTALLER").write_text("sglang_deft.cpu_compat.extract_sgl_kernel\n")
    lines = []
    for name in [*written, f"{dist_info}/INSTALLER"]:
        data = (root / name).read_bytes()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(data)}")
    lines.append(f"{dist_info}/RECORD,,")
    (root / dist_info / "RECORD").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("site_packages", type=Path, nargs="?", default=Path(sysconfig.get_paths()["purelib"]))
    args = parser.parse_args()
    written = extract(args.wheel, args.site_packages)
    print(f"extracted {len(written)} files of {args.wheel.name} into {args.site_packages}")


if __name__ == "__main__":
    main()
