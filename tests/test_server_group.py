"""tests/server_group.serving relaunches a server whose port another process took before it bound it."""
from __future__ import annotations

import socket

import sglang_deft.server_process as server_process
from server_group import serving
from sglang_deft.server_process import ServerProcess
from test_e2e_cpu import REPO, SERVER_ARGS, STARTUP_TIMEOUT_S, greedy


def test_serving_relaunches_a_server_whose_port_was_taken(tmp_path, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        real_free_port = server_process.free_port
        picks = iter([port])  # the first pick is the taken port, as when two servers race for one
        monkeypatch.setattr(server_process, "free_port", lambda: next(picks, None) or real_free_port())
        servers = {"deft": ServerProcess("deft", SERVER_ARGS + ["--decode-attention-backend", "deft"],
                                         tmp_path / "deft.log", cwd=REPO)}
        first = servers["deft"]
        with serving(servers, STARTUP_TIMEOUT_S) as running:
            server = running["deft"]
            assert server is not first and server.port != port
            assert first.proc.poll() is not None  # the first launch was stopped
            out = server.generate({"input_ids": [5, 6, 7], "sampling_params": greedy(2)})
            assert len(out[0]["output_ids"]) == 2
