"""A C source file next to this module, built into a shared library at first use and loaded by ctypes.

The same arrangement Triton uses for its kernel launchers: the system C compiler (``$CC``, which may
carry arguments such as ``ccache gcc``, else the first of cc, gcc, clang on PATH) builds the library once,
into a cache file named by a hash of the source, the flags and the machine's architecture, then one of the
compiler's path and modification time, so later processes load it at once. A machine without a compiler
loads a library built earlier from the same source (by any compiler) if the cache holds one.
A machine that runs Triton's GPU kernels has such a compiler already (Triton needs it).

Cache directory: ``$SGLANG_DEFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/sglang_deft``, else
``~/.cache/sglang_deft``. Several processes (tensor-parallel ranks) may build at once: each writes its
own temporary file and renames it into place, so a reader never sees a partial library; a library in the
cache that does not load (a file cut short by a crash) is built again once. The temp-dir fallback (a cache
directory that cannot be written) is used only if it is this user's and no one else can write it: a
library there is code this process runs.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
# -ffp-contract=off: no fused multiply-adds, so float arithmetic rounds as numpy's does (schedule.c
# must reproduce the planner's specification bit for bit).
CFLAGS = ["-O2", "-std=c99", "-shared", "-fPIC", "-ffp-contract=off"]

_LOCK = threading.Lock()
_LOADED: dict[str, ctypes.CDLL] = {}


class CLibraryError(RuntimeError):
    """The C library could not be built or loaded; the message says why and what to do."""


def _compiler() -> list[str]:
    """The compiler command: ``$CC`` split as a shell would (``ccache gcc``), else cc, gcc or clang."""
    cc = shlex.split(os.environ.get("CC") or "")
    if cc:
        return cc
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    raise CLibraryError(
        "sglang-deft plans decode steps with a small C library built at first use, and found no C compiler "
        "(none of $CC, cc, gcc, clang). Install one (e.g. `apt install gcc`; Triton's GPU kernels need it too) "
        "or set CC.")


def _cache_dir() -> Path:
    root = os.environ.get("SGLANG_DEFT_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sglang_deft"


def _private(root: Path) -> bool:
    """Whether ``root`` is this user's and no one else can write to it (or replace what it holds). A symlink is
    not: in the shared temp dir another user could make the name a link to a directory of ours that passes, then
    point it at one of theirs between this check and the build or load."""
    st = root.lstat()
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _cache_roots() -> list[tuple[Path, bool]]:
    """(directory, must be private) in the order tried: the cache directory, then one under the temp dir."""
    return [(_cache_dir(), False), (Path(tempfile.gettempdir()) / f"sglang_deft_{os.getuid()}", True)]


def _suffix() -> str:
    return sysconfig.get_config_var("SHLIB_SUFFIX") or ".so"


def _source_key(source: Path) -> str:
    """What a library is built from, whatever the compiler: the source, the flags and the machine (a home
    directory shared by x86_64 and aarch64 hosts holds both builds). The first part of a cache file's name."""
    key = hashlib.sha256()
    key.update(source.read_bytes())
    key.update(" ".join(CFLAGS).encode())
    key.update(" ".join([platform.machine(), sys.platform]).encode())
    return key.hexdigest()[:16]


def _compiler_key(cc: list[str]) -> str:
    """Which compiler builds it: its path, arguments and modification time (a changed compiler builds anew)."""
    cc_path = shutil.which(cc[0]) or cc[0]
    key = hashlib.sha256(" ".join([cc_path, *cc[1:]]).encode())
    try:
        key.update(str(os.stat(cc_path).st_mtime_ns).encode())
    except OSError:
        pass
    return key.hexdigest()[:8]


def _build(source: Path, cc: list[str], rebuild: Path | None = None) -> Path:
    """The cached library for ``source``, built first if missing (or if it is ``rebuild``: it did not load)."""
    suffix = _suffix()
    name = f"{source.stem}_{_source_key(source)}_{_compiler_key(cc)}{suffix}"
    for root, must_be_private in _cache_roots():
        target = root / name
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            if must_be_private and not _private(root):
                logger.warning("sglang-deft: %s is not this user's alone; not loading or building a library there",
                               root)
                continue
            if target.exists() and target != rebuild:
                return target
            fd, tmp = tempfile.mkstemp(prefix=".building-", suffix=suffix, dir=root)
            os.close(fd)
        except OSError as e:
            logger.warning("sglang-deft: cannot write the C library cache in %s (%s); trying the next place", root, e)
            continue
        logger.info("sglang-deft: building %s with %s into %s", source.name, " ".join(cc), target)
        cmd = [*cc, *CFLAGS, str(source), "-o", tmp, "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:  # e.g. $CC names no program
            done = subprocess.CompletedProcess(cmd, -1, "", str(e))
        if done.returncode != 0:
            with contextlib.suppress(FileNotFoundError):  # a failed link removes its output itself
                os.unlink(tmp)
            raise CLibraryError(f"building {source.name} failed ({' '.join(cmd)}):\n{done.stderr.strip()}")
        # mkstemp made the file 0600 and the linker adds only execute bits: readable by all, as a library
        # the linker writes itself, so that other users sharing the cache directory can load it.
        try:
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)
        except OSError as e:  # a cache on a filesystem that refuses them: the next place, as for an unwritable one
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            logger.warning("sglang-deft: cannot install %s in %s (%s); trying the next place", target.name, root, e)
            continue
        return target
    raise CLibraryError(f"no writable cache directory for {source.name} (tried {_cache_dir()} and the temp dir); "
                        "set SGLANG_DEFT_CACHE_DIR")


def _cached_builds(source: Path) -> list[Path]:
    """Every library in the cache built from ``source`` by any compiler, newest first."""
    pattern = f"{source.stem}_{_source_key(source)}_*{_suffix()}"
    found = []
    for root, must_be_private in _cache_roots():
        try:
            if root.is_dir() and not (must_be_private and not _private(root)):
                found += [(p.stat().st_mtime_ns, p) for p in root.glob(pattern)]
        except OSError:
            continue
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def _load_cached(source: Path, cannot_build: CLibraryError) -> ctypes.CDLL:
    """A library built earlier from ``source`` by any compiler, when this process cannot build one: an image whose
    compiler was removed after its first start built it, or a compiler that no longer works (a missing header)."""
    failed = []
    for path in _cached_builds(source):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:  # cut short, say: an older build may still load
            failed.append(f"{path} ({e})")
            continue
        logger.warning("sglang-deft: %s; loading %s, built earlier from this %s", cannot_build, path, source.name)
        return lib
    if failed:
        raise CLibraryError(f"{cannot_build} The builds of {source.name} cached earlier do not load either: "
                            f"{'; '.join(failed)}") from None
    raise CLibraryError(f"{cannot_build} No build of {source.name} is cached either ({_cache_dir()}).") from None


def _build_and_load(source: Path, cc: list[str]) -> ctypes.CDLL:
    path = _build(source, cc)
    try:
        return ctypes.CDLL(str(path))
    except OSError as first:
        # A cached file that does not load (cut short by a crash before it reached the disk): once more.
        logger.warning("sglang-deft: %s does not load (%s); building it again", path, first)
        path = _build(source, cc, rebuild=path)
        try:
            return ctypes.CDLL(str(path))
        except OSError as e:
            raise CLibraryError(f"cannot load {path} ({e}), built again just now; set SGLANG_DEFT_CACHE_DIR "
                                "to a directory of your own (one not mounted noexec)") from e


def load(source_name: str) -> ctypes.CDLL:
    """The library built from ``source_name`` (a C file next to this module), loaded once per process."""
    with _LOCK:
        lib = _LOADED.get(source_name)
        if lib is None:
            if sys.platform == "win32":
                raise CLibraryError("sglang-deft's C planner is built for Linux and macOS only")
            source = HERE / source_name
            try:
                lib = _build_and_load(source, _compiler())
            except CLibraryError as cannot_build:
                lib = _load_cached(source, cannot_build)
            _LOADED[source_name] = lib
        return lib
