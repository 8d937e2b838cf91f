"""A C source file next to this module, built into a shared library at first use and loaded by ctypes.

The same arrangement Triton uses for its kernel launchers: the system C compiler (``$CC``, else the
first of cc, gcc, clang on PATH) builds the library once, into a cache file named by a hash of the
source, the flags and the compiler's path and modification time, so later processes load it at once.
A machine that runs Triton's GPU kernels has such a compiler already (Triton needs it).

Cache directory: ``$SGLANG_DEFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/sglang_deft``, else
``~/.cache/sglang_deft``. Several processes (tensor-parallel ranks) may build at once: each writes its
own temporary file and renames it into place, so a reader never sees a partial library.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
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


def _compiler() -> str:
    cc = os.environ.get("CC")
    if cc:
        return cc
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
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


def _build(source: Path, cc: str) -> Path:
    cc_path = shutil.which(cc) or cc
    key = hashlib.sha256()
    key.update(source.read_bytes())
    key.update(" ".join(CFLAGS).encode())
    key.update(cc_path.encode())
    try:
        key.update(str(os.stat(cc_path).st_mtime_ns).encode())  # a changed compiler builds anew
    except OSError:
        pass
    suffix = sysconfig.get_config_var("SHLIB_SUFFIX") or ".so"
    for root in (_cache_dir(), Path(tempfile.gettempdir()) / f"sglang_deft_{os.getuid()}"):
        target = root / f"{source.stem}_{key.hexdigest()[:16]}{suffix}"
        if target.exists():
            return target
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=suffix, dir=root)
            os.close(fd)
        except OSError as e:
            logger.warning("sglang-deft: cannot write the C library cache in %s (%s); trying the next place", root, e)
            continue
        logger.info("sglang-deft: building %s with %s into %s", source.name, cc, target)
        cmd = [cc, *CFLAGS, str(source), "-o", tmp, "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:  # e.g. $CC names no program
            done = subprocess.CompletedProcess(cmd, -1, "", str(e))
        if done.returncode != 0:
            os.unlink(tmp)
            raise CLibraryError(f"building {source.name} failed ({' '.join(cmd)}):\n{done.stderr.strip()}")
        # mkstemp made the file 0600 and the linker adds only execute bits: readable by all, as a library
        # the linker writes itself, so that other users sharing the cache directory can load it.
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
        return target
    raise CLibraryError(f"no writable cache directory for {source.name} (tried {_cache_dir()} and the temp dir); "
                        "set SGLANG_DEFT_CACHE_DIR")


def load(source_name: str) -> ctypes.CDLL:
    """The library built from ``source_name`` (a C file next to this module), loaded once per process."""
    with _LOCK:
        lib = _LOADED.get(source_name)
        if lib is None:
            if sys.platform == "win32":
                raise CLibraryError("sglang-deft's C planner is built for Linux and macOS only")
            path = _build(HERE / source_name, _compiler())
            try:
                lib = _LOADED[source_name] = ctypes.CDLL(str(path))
            except OSError as e:
                raise CLibraryError(f"cannot load {path} ({e}); delete it to have it rebuilt, or set "
                                    "SGLANG_DEFT_CACHE_DIR to a directory of your own") from e
        return lib
