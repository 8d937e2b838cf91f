"""Test servers started side by side: wait for all, hand them to the tests, stop all."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from sglang_deft.server_process import ServerProcess

from repo_modules import REPO, load_module


def gpu_package_env() -> tuple[dict[str, str], Path]:
    """(env, cwd) for servers on the GPU host, where the repo is not installed: scripts/gpu_e2e.py's
    overlay, under which they import ``sglang_deft.kernels``."""
    return load_module("gpu_e2e", REPO / "scripts" / "gpu_e2e.py").importable_package_env()


@contextlib.contextmanager
def serving(servers: dict[str, ServerProcess], timeout_s: float):
    """Yield ``servers`` once each answers (their startups overlap; one whose port was taken before
    it bound it is relaunched on another, in place in ``servers``); stops every one on exit, also
    when one fails to start."""
    started = time.monotonic()
    try:
        for name, server in list(servers.items()):
            try:
                server.wait_ready(timeout_s)
            except RuntimeError:
                if not server.port_taken():
                    raise
                servers[name] = server = server.relaunched()  # once: its port went to another process
                server.wait_ready(timeout_s)
        print(f"\n{', '.join(servers)} ready in {time.monotonic() - started:.1f}s")
        yield servers
    finally:
        for server in servers.values():
            server.stop()
