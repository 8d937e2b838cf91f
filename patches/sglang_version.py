"""The SGLang release every patch here was written against, and the check each patch runs first."""
import importlib.util
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

SUPPORTED_SGLANG = "0.5.10.post1"


class UnsupportedSGLangVersion(RuntimeError):
    pass


def _loaded_from_elsewhere() -> str | None:
    """Where ``import sglang`` loads a package other than the installed distribution's (a source tree on
    PYTHONPATH beside the installed wheel: the metadata would name the wheel's release), else None."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or spec.origin is None:
        return None
    owned = [distribution("sglang").locate_file(f) for f in distribution("sglang").files or []
             if str(f) == "sglang/__init__.py"]  # none for an editable install, whose files live elsewhere
    if owned and Path(owned[0]).resolve() != Path(spec.origin).resolve():
        return spec.origin
    return None


def require_supported_sglang(patch_name: str) -> None:
    """Raise unless the installed SGLang, the one that imports, is the release ``patch_name`` was written
    against."""
    try:
        installed = version("sglang")
    except PackageNotFoundError:
        raise UnsupportedSGLangVersion(
            f"`{patch_name}` is written against SGLang {SUPPORTED_SGLANG} internals, but no SGLang is installed "
            f"here: install sglang=={SUPPORTED_SGLANG}") from None
    if installed != SUPPORTED_SGLANG:
        raise UnsupportedSGLangVersion(
            f"`{patch_name}` is written against SGLang {SUPPORTED_SGLANG} internals, but SGLang "
            f"{installed} is installed. Install sglang=={SUPPORTED_SGLANG}, or re-check the patched "
            "code against this release and update the patch."
        )
    elsewhere = _loaded_from_elsewhere()
    if elsewhere is not None:
        raise UnsupportedSGLangVersion(
            f"`{patch_name}` is written against SGLang {SUPPORTED_SGLANG} internals, and that release is "
            f"installed, but `import sglang` loads {elsewhere} (PYTHONPATH?), whose release is not known: "
            "import the installed one."
        )
