"""sglang_deft.cpu_compat.extract_sgl_kernel (make venv's step): only sglang-kernel 0.4.1's Python files, checked
before anything is written, replacing an earlier extraction only once every file is out."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from sglang_deft.cpu_compat.extract_sgl_kernel import extract


def wheel(path: Path, name="sglang_kernel", version="0.4.1", package="sgl_kernel", corrupt=False) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{package}/__init__.py", "VALUE = 1\n")
        zf.writestr(f"{package}/ops.py", "MARKER_CONTENT = 'ops'\n")
        zf.writestr(f"{package}/sm90/common_ops.abi3.so", b"\x7fELF")
        zf.writestr(f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if corrupt:  # a flipped byte in ops.py's data: its CRC no longer matches
        data = path.read_bytes()
        path.write_bytes(data.replace(b"MARKER_CONTENT", b"MARKER_CONTENX", 1))
    return path


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_the_python_files_and_metadata_replace_an_earlier_extraction(tmp_path):
    site = tmp_path / "site"
    (site / "sgl_kernel").mkdir(parents=True)
    (site / "sgl_kernel" / "removed_since.py").write_text("")
    (site / "sglang_kernel-0.3.9.dist-info").mkdir()
    written = extract(wheel(tmp_path / "k.whl"), site)
    assert sorted(written) == ["sgl_kernel/__init__.py", "sgl_kernel/ops.py", "sglang_kernel-0.4.1.dist-info/METADATA"]
    assert tree(site) == ["sgl_kernel", "sgl_kernel/__init__.py", "sgl_kernel/ops.py", "sglang_kernel-0.4.1.dist-info",
                          "sglang_kernel-0.4.1.dist-info/INSTALLER", "sglang_kernel-0.4.1.dist-info/METADATA",
                          "sglang_kernel-0.4.1.dist-info/RECORD"]


def test_the_extraction_has_a_record_pip_can_uninstall_by(tmp_path):
    """Without a RECORD pip refused to uninstall or replace the files ("RECORD file not found"): every file written,
    with its sha256 and size as the wheel spec has them, and RECORD itself without either."""
    import base64
    import hashlib
    from importlib.metadata import PathDistribution

    site = tmp_path / "site"
    extract(wheel(tmp_path / "k.whl"), site)
    dist = PathDistribution(site / "sglang_kernel-0.4.1.dist-info")
    files = {str(f): f for f in dist.files}
    assert set(files) == {"sgl_kernel/__init__.py", "sgl_kernel/ops.py", "sglang_kernel-0.4.1.dist-info/METADATA",
                          "sglang_kernel-0.4.1.dist-info/INSTALLER", "sglang_kernel-0.4.1.dist-info/RECORD"}
    for name, f in files.items():
        if name.endswith("RECORD"):
            assert f.hash is None and f.size is None
            continue
        data = (site / name).read_bytes()
        assert f.hash.mode == "sha256" and f.size == len(data)
        assert f.hash.value == base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@pytest.mark.parametrize("kind, message", [
    (dict(name="numpy", version="1.26.4", package="numpy"), "holds no sgl_kernel/__init__.py"),
    (dict(version="0.3.9"), "is sglang_kernel 0.3.9: the CPU environment takes sglang-kernel 0.4.1"),
    (dict(name="other_kernel"), "is other_kernel 0.4.1"),
])
def test_another_wheel_is_refused_before_anything_is_written(tmp_path, kind, message):
    """The check came after the extraction: a numpy wheel's METADATA was already written (a fake numpy
    distribution), and any release of sglang-kernel passed."""
    site = tmp_path / "site"
    with pytest.raises(SystemExit, match=message):
        extract(wheel(tmp_path / "k.whl", **kind), site)
    assert not site.exists() or tree(site) == []


def test_a_corrupt_member_leaves_the_earlier_extraction_as_it_was(tmp_path):
    site = tmp_path / "site"
    extract(wheel(tmp_path / "good.whl"), site)
    before = tree(site)
    with pytest.raises(zipfile.BadZipFile):
        extract(wheel(tmp_path / "bad.whl", corrupt=True), site)
    assert tree(site) == before  # no half-written package, no scratch folder
