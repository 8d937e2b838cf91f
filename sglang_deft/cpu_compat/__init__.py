"""Run SGLang 0.5.10.post1 on a machine without a CUDA driver (tests, CI, `make demo` on CPU).

Usage: call ``sglang_deft.cpu_compat.install()`` before the first import of anything under
``sglang.srt`` (e.g. ``from sglang.srt.mem_cache.radix_cache import RadixCache``); tests get it from
``tests/conftest.py``. It needs sgl_kernel's Python files in the venv, which ``make venv`` extracts
from the sglang-kernel==0.4.1 wheel without its native libraries. ``install()`` also sets
``SGLANG_DEFT_CPU_COMPAT=1`` so that processes SGLang spawns re-install it when they import
``sglang_deft.subprocess_entry`` (the launcher and ``sglang_deft.Engine`` use those entries); it
does not select SGLang's CPU engine: servers also need ``SGLANG_USE_CPU_ENGINE=1`` and
``--device cpu``, which ``python -m sglang_deft.launch_server`` sets up on a machine without CUDA.

Why: without CUDA, two imports break SGLang's radix cache, scheduler and model runner:
``sgl_kernel/__init__.py`` loads its native ``common_ops`` library (CUDA-only), and a few SGLang
modules import torchvision at module level (torchvision has no wheel matching the CPU torch here).
The import hook below serves a stand-in ``common_ops`` (:mod:`.native_ops`: every native operator
reached raises :class:`NativeOpUnavailable` naming it) and a stand-in torchvision
(:mod:`.torchvision_stand_in`) only while those SGLang modules execute: a torchvision visible to
``importlib.util.find_spec`` afterwards would make transformers import its image processors.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

from .native_ops import NativeOpUnavailable

__all__ = ["ENV_FLAG", "NativeOpUnavailable", "install", "install_if_requested", "is_installed"]

ENV_FLAG = "SGLANG_DEFT_CPU_COMPAT"

# SGLang modules that import torchvision at module level on a text-model path (see
# torchvision_stand_in.py); the stand-in is importable only while one of them executes.
_TORCHVISION_IMPORTERS = ("sglang.srt.utils.common", "sglang.srt.multimodal.internvl_utils")


class _StandInLoader(importlib.abc.Loader):
    """Executes a stand-in module of ours under the name SGLang imports."""

    def __init__(self, fill):
        self._fill = fill  # fill(module): populates the new module

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        self._fill(module)


def _fill_common_ops(module):
    from . import native_ops

    native_ops.install_namespace()
    module.__doc__ = native_ops.__doc__
    module.__file__ = native_ops.__file__  # sgl_kernel's loader logs it


def _torchvision_spec(fullname):
    from . import torchvision_stand_in as tv

    def fill(module):
        module.__doc__ = tv.__doc__
        vars(module).update(tv.MODULES[fullname])

    return importlib.util.spec_from_loader(fullname, _StandInLoader(fill), is_package=fullname in tv.PACKAGES)


class _TorchvisionWindowLoader(importlib.abc.Loader):
    """Runs a real SGLang module with the torchvision stand-in importable, then hides it again.

    Hiding matters: a torchvision visible to ``importlib.util.find_spec`` makes transformers import
    its image processors, which need the real package.
    """

    def __init__(self, real_loader, finder: "_CpuCompatFinder"):
        self._real = real_loader
        self._finder = finder

    def create_module(self, spec):
        return self._real.create_module(spec)

    def exec_module(self, module):
        self._finder.torchvision_window += 1
        try:
            self._real.exec_module(module)
        finally:
            self._finder.torchvision_window -= 1
            if not self._finder.torchvision_window:
                for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                    if isinstance(getattr(sys.modules[name], "__loader__", None), _StandInLoader):
                        del sys.modules[name]

    def __getattr__(self, name):
        # get_source, get_filename, ... for tracebacks and inspect.
        return getattr(self._real, name)


class _CpuCompatFinder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.torchvision_window = 0  # how many torchvision importers are executing

    def find_spec(self, fullname, path, target=None):
        if fullname == "common_ops":
            # sgl_kernel's last resort after finding no sm*/common_ops.*.so next to its files.
            return importlib.util.spec_from_loader(fullname, _StandInLoader(_fill_common_ops))
        if fullname in _TORCHVISION_IMPORTERS:
            real = importlib.machinery.PathFinder.find_spec(fullname, path)
            if real is not None:
                real.loader = _TorchvisionWindowLoader(real.loader, self)
            return real
        if self.torchvision_window and (fullname == "torchvision" or fullname.startswith("torchvision.")):
            if importlib.machinery.PathFinder.find_spec("torchvision") is not None:
                return None  # a real torchvision is installed: use it
            from . import torchvision_stand_in as tv

            return _torchvision_spec(fullname) if fullname in tv.MODULES else None
        return None


def is_installed() -> bool:
    return any(isinstance(f, _CpuCompatFinder) for f in sys.meta_path)


def install() -> None:
    """Activate the compatibility layer in this process and in the processes SGLang spawns from it.

    Idempotent. Raises RuntimeError where torch sees a CUDA device, when sgl_kernel's Python files are missing or of
    another release than ``extract_sgl_kernel.VERSION``, or when ``sglang.srt.utils.common`` was already imported
    without it (too late to stand in); ``UnsupportedSGLangVersion`` for an SGLang other than the one its module names
    and loader fallback are written against (it failed later as a stray torchvision ImportError or a missing op).
    """
    if is_installed():
        return
    from importlib.metadata import PackageNotFoundError, version

    from sglang_deft.patches.sglang_version import require_supported_sglang

    from .extract_sgl_kernel import DISTRIBUTION, VERSION

    require_supported_sglang("sglang_deft.cpu_compat")
    import torch

    if torch.cuda.is_available():
        # The stand-in serves common_ops whenever sgl_kernel finds no native library for this GPU: a missing or
        # broken sgl_kernel would then surface as NativeOpUnavailable at its first operator, mid-serving, not here.
        raise RuntimeError(
            f"sglang_deft.cpu_compat is for machines without CUDA, and torch sees {torch.cuda.device_count()} CUDA "
            f"device(s) here: its stand-in for sgl_kernel's native library would hide a missing or broken one. "
            f"Unset {ENV_FLAG} (a spawned process installs the layer when it finds {ENV_FLAG}=1), or hide the GPUs "
            "with CUDA_VISIBLE_DEVICES= for a CPU run.")
    if importlib.util.find_spec("sgl_kernel") is None:
        raise RuntimeError(
            "sglang_deft.cpu_compat needs sgl_kernel's Python files (without its native library): "
            "run `make venv`, or `python -m sglang_deft.cpu_compat.extract_sgl_kernel "
            "sglang_kernel-0.4.1-*.whl` into this environment."
        )
    try:
        kernel_version = version(DISTRIBUTION)
    except PackageNotFoundError:
        kernel_version = None  # files without a .dist-info: not what extract_sgl_kernel or pip leave
    if kernel_version != VERSION:
        raise RuntimeError(
            f"sglang_deft.cpu_compat stands in for {DISTRIBUTION} {VERSION}'s native library (its loader's fallback "
            f"to `import common_ops`), and {DISTRIBUTION} {kernel_version or 'of no known release'} is installed: run "
            f"`make venv`, or `python -m sglang_deft.cpu_compat.extract_sgl_kernel sglang_kernel-{VERSION}-*.whl`.")
    imported = [name for name in _TORCHVISION_IMPORTERS if name in sys.modules]
    if imported:
        raise RuntimeError(
            f"sglang_deft.cpu_compat.install() must run before {imported[0]} is imported "
            "(it was imported already, so the torchvision stand-in can no longer reach it)."
        )
    sys.meta_path.insert(0, _CpuCompatFinder())
    os.environ[ENV_FLAG] = "1"  # inherited by spawned processes; see install_if_requested()


def install_if_requested() -> None:
    """Install the layer when a parent process did (``SGLANG_DEFT_CPU_COMPAT=1`` in the environment).

    Spawned processes start from a fresh interpreter: importing ``sglang_deft.subprocess_entry``
    (the module of the scheduler and detokenizer entries) calls this before SGLang's modules load.
    """
    if os.environ.get(ENV_FLAG) == "1":
        install()
