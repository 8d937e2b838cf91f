"""The SGLang release every patch here was written against, and the check each patch runs first."""
from importlib.metadata import version

SUPPORTED_SGLANG = "0.5.10.post1"


class UnsupportedSGLangVersion(RuntimeError):
    pass


def require_supported_sglang(patch_name: str) -> None:
    """Raise unless the installed SGLang is the release ``patch_name`` was written against."""
    installed = version("sglang")
    if installed != SUPPORTED_SGLANG:
        raise UnsupportedSGLangVersion(
            f"`{patch_name}` is written against SGLang {SUPPORTED_SGLANG} internals, but SGLang "
            f"{installed} is installed. Install sglang=={SUPPORTED_SGLANG}, or re-check the patched "
            "code against this release and update the patch."
        )
