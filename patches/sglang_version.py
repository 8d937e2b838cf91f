"""The SGLang release every patch here was written against, and the checks each patch runs first: the release, and
the source of each SGLang function it wraps or relies on."""
import hashlib
import importlib.util
import inspect
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


def require_source(patch_name: str, owner: type, name: str, sha256: str) -> None:
    """Raise unless ``owner.name``, an SGLang function ``patch_name`` wraps or relies on, has the source it has in
    the release the patch was written against (``sha256`` of ``inspect.getsource``). The version string does not tell
    a modified copy of that release (a local fix, a vendor's backport) whose internals the patch would misread.
    Follows ``__wrapped__`` through deft's own wrappers only (those ``wrapping.wrap_once`` made, known by identity:
    ``functools.wraps`` copies its mark to any function that wraps them): a patch applied again sees
    SGLang's own code under its wrapper, while another replacement made with ``functools.wraps`` (another plugin's)
    is what runs, so its source is what is checked (followed, it hid the replacement behind SGLang's source)."""
    from .wrapping import is_deft_wrapper

    function = inspect.getattr_static(owner, name)
    function = inspect.unwrap(getattr(function, "__func__", function), stop=lambda f: not is_deft_wrapper(f))
    where = f"{owner.__module__}.{owner.__qualname__}.{name}"
    try:
        # Of its code object: getsource(function) unwraps __wrapped__ all the way itself.
        digest = hashlib.sha256(inspect.getsource(getattr(function, "__code__", function)).encode()).hexdigest()
    except (OSError, TypeError) as e:
        raise UnsupportedSGLangVersion(
            f"`{patch_name}` relies on SGLang {SUPPORTED_SGLANG}'s {where}, whose source cannot be read here ({e}), "
            "so it cannot be checked against that release's: install SGLang with its .py files") from None
    if digest != sha256:
        raise UnsupportedSGLangVersion(
            f"`{patch_name}` relies on SGLang {SUPPORTED_SGLANG}'s {where}, but the one installed here "
            f"({inspect.getsourcefile(function)}) differs from that release's (source sha256 {digest[:16]}..., "
            f"expected {sha256[:16]}...): a modified SGLang. Install sglang=={SUPPORTED_SGLANG} unmodified, or "
            "re-check the patch against this code and update its hash."
        )
