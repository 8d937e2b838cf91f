"""Test servers started side by side: wait for all, hand them to the tests, stop all."""
from __future__ import annotations

import contextlib
import time

from sglang_deft.server_process import ServerProcess


@contextlib.contextmanager
def serving(servers: dict[str, ServerProcess], timeout_s: float):
    """Yield ``servers`` once each answers (their startups overlap); stops every one on exit, also
    when one fails to start."""
    started = time.monotonic()
    try:
        for server in servers.values():
            server.wait_ready(timeout_s)
        print(f"\n{', '.join(servers)} ready in {time.monotonic() - started:.1f}s")
        yield servers
    finally:
        for server in servers.values():
            server.stop()
