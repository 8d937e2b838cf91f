"""ServerProcess (the demo's, the tests' and the scripts' way to run a launcher), and tests/server_group's
``serving``, against a fake launcher: a small script in place of ``python -m sglang_deft.launch_server``,
so that starting, waiting, querying, stopping and relaunching are checked without SGLang."""
from __future__ import annotations

import socket
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import sglang_deft.server_process as server_process
from server_group import serving
from sglang_deft.server_process import ServerProcess, port_free, process_group_alive

FAKE_LAUNCHER = textwrap.dedent('''
    import http.server, json, os, signal, subprocess, sys, time
    from sglang_deft.server_process import end_with_parent_process
    end_with_parent_process(poll_s=0.1)  # as launch_server.main does first
    mode, port = sys.argv[3], int(sys.argv[sys.argv.index("--port") + 1])
    print("fake launcher", mode, flush=True)
    if mode == "exit":
        sys.exit(3)
    if mode == "exit_leaving_child":  # a scheduler that outlives its launcher
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        sys.exit(0)

    def port_taken():  # what SGLang logs when uvicorn's bind fails; its scheduler lives on
        print(f"ERROR: [Errno 98] error while attempting to bind on address ('127.0.0.1', {port}): "
              "Address already in use", flush=True)
        time.sleep(600)

    if mode == "port_taken":
        port_taken()
    if mode == "port_taken_once":  # the first launch's port was taken; a relaunch's is free
        marker = sys.argv[0] + ".launched"
        if not os.path.exists(marker):
            open(marker, "w").close()
            port_taken()
    if mode == "launcher_port_check":  # sglang_deft.launch_server's own check found the port taken
        from sglang_deft.server_process import PORT_IN_USE
        sys.exit(f"sglang_deft.launch_server: 127.0.0.1:{port} {PORT_IN_USE}; pass --port with a free port")
    if mode == "bind_refused":  # uvicorn on a privileged port: not in use, but not this user's to bind
        print(f"ERROR: [Errno 13] error while attempting to bind on address ('127.0.0.1', {port}): "
              "permission denied", flush=True)
        time.sleep(600)
    if mode == "silent":
        time.sleep(600)
    if mode == "stubborn":  # it and its child ignore SIGTERM, as a wedged scheduler would
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                          "signal.SIG_IGN); time.sleep(600)"])

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, body):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send(b"ok" if self.path == "/health_generate" else b"")

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/close_session":
                self._send(b"")
            elif isinstance(req.get("text"), list):
                self._send(json.dumps([{"text": t + "!"} for t in req["text"]]).encode())
            else:
                self._send(json.dumps({"text": req["text"] + "!"}).encode())

    try:
        server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    except OSError:
        port_taken()
    server.serve_forever()
''')


@pytest.fixture
def launcher(tmp_path):
    """A 'python' whose ``-m sglang_deft.launch_server MODE --port N`` runs the fake launcher."""
    script = tmp_path / "fake_launcher.py"
    script.write_text(FAKE_LAUNCHER)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    python.chmod(0o755)

    started = []

    def start(mode: str) -> ServerProcess:
        server = ServerProcess(mode, [mode], tmp_path / f"{mode}.log", python=str(python))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(grace_s=1)


def test_wait_query_and_stop(launcher):
    server = launcher("serve")
    assert server.command[1:3] == ["-m", "sglang_deft.launch_server"] and server.command[-2:] == ["--port",
                                                                                                  str(server.port)]
    polls = []
    waited = server.wait_ready(60, on_poll=polls.append)
    assert 0 <= waited < 60 and polls and polls == sorted(polls)
    assert server.generate({"text": "a"}) == [{"text": "a!"}]  # one answer: a list all the same
    assert server.generate({"text": ["a", "b"]}) == [{"text": "a!"}, {"text": "b!"}]
    assert server.post("/close_session", {"session_id": "x"}) is None  # an empty answer
    assert "fake launcher serve" in server.log()
    server.stop()
    assert server.proc.poll() is not None and not process_group_alive(server.proc.pid)


def test_a_proxy_in_the_environment_is_bypassed_for_the_server(launcher, monkeypatch):
    """With http_proxy set and no no_proxy, wait_ready's polls went to the proxy (a closed port here): a server that
    was up never answered, and a demo waited out its --timeout. Its launcher gets the local hosts in no_proxy too (for
    SGLang's own warm-up request), the caller's entries kept."""
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.setenv("NO_PROXY", "corp.example")
    server = launcher("serve")
    assert server.wait_ready(30) < 30
    assert server.generate({"text": "a"}) == [{"text": "a!"}]
    environ = Path(f"/proc/{server.proc.pid}/environ")
    if environ.exists():
        child = dict(e.split("=", 1) for e in environ.read_text().split("\0") if "=" in e)
        assert child["no_proxy"] == child["NO_PROXY"] == "corp.example,127.0.0.1,localhost"


def test_local_hosts_are_added_to_no_proxy_once():
    """Both variables get the entries of either: a NO_PROXY alone was hidden by the lowercase one (read first), and
    "*" (every host) stays alone, which "*,127.0.0.1" is not to urllib or requests."""
    merge = server_process.with_local_hosts_unproxied
    assert merge({"no_proxy": " 127.0.0.1 ,a", "NO_PROXY": "b,a", "X": "1"}) == {
        "no_proxy": "127.0.0.1,a,b,localhost", "NO_PROXY": "127.0.0.1,a,b,localhost", "X": "1"}
    assert merge({}) == {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}
    for star in ({"no_proxy": "*"}, {"NO_PROXY": "*"}, {"no_proxy": "a", "NO_PROXY": "*"}):
        assert merge(star) == star


def test_an_interrupted_stop_is_finished_by_the_next(launcher, monkeypatch):
    server = launcher("serve")
    server.wait_ready(60)
    finish = server._stop

    def interrupted(grace_s):
        raise KeyboardInterrupt

    monkeypatch.setattr(server, "_stop", interrupted)
    with pytest.raises(KeyboardInterrupt):
        server.stop()
    assert process_group_alive(server.proc.pid)
    monkeypatch.setattr(server, "_stop", finish)
    server.stop(grace_s=1)
    assert not process_group_alive(server.proc.pid)


def test_an_owner_whose_proc_entry_cannot_be_read_is_alive(monkeypatch):
    """(/proc mounted with hidepid, the owner another user's: the signal check's answer stands.)"""
    import os

    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(FileNotFoundError(self))
                        if str(self) == f"/proc/{os.getpid()}/stat" else real(self, *a, **k))
    assert server_process._pid_alive(os.getpid())


@pytest.mark.parametrize("port", [70000, -3])
def test_a_port_out_of_range_is_a_clear_error(port, tmp_path):
    with pytest.raises(ValueError, match=f"port {port}: a TCP port is 1-65535"):
        ServerProcess("x", [], tmp_path / "x.log", port=port)


def test_a_second_stop_signals_nothing(launcher, monkeypatch):
    """The group's id is free once the launcher is reaped: a second stop() (a fixture's, after a test's) must not
    signal whatever session has it by then."""
    server = launcher("serve")
    server.wait_ready(60)
    server.stop()
    signalled = []
    monkeypatch.setattr(server_process.os, "killpg", lambda *a: signalled.append(a))
    monkeypatch.setattr(server_process, "process_group_alive", lambda pgid: True)  # the id taken again
    server.stop(grace_s=0.1)
    assert signalled == []


def test_a_launcher_that_exits_is_reported_with_its_log(launcher):
    server = launcher("exit")
    with pytest.raises(RuntimeError, match=r"(?s)exit server exited with 3:.*fake launcher exit"):
        server.wait_ready(60)


def test_a_port_taken_before_the_bind_is_reported_at_once(launcher):
    server = launcher("port_taken")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=f"could not bind port {server.port}"):
        server.wait_ready(60)
    assert time.monotonic() - started < 30 and server.port_taken()


def test_a_port_the_launcher_finds_taken_is_a_port_clash(launcher):
    """The launcher's own check exits before SGLang's bind: its message was no bind error to port_taken(), so the
    callers that relaunch on a fresh port (gpu_e2e, bench_e2e) gave up on a clash they retry for uvicorn's."""
    server = launcher("launcher_port_check")
    with pytest.raises(RuntimeError):
        server.wait_ready(60)
    assert server.port_taken()


def test_a_port_it_may_not_bind_is_reported_at_once(launcher):
    """uvicorn's bind failing for another cause than a port in use: the wait ran to SGLang's own exit, two minutes
    later. It is no port clash, so nothing relaunches on another port."""
    server = launcher("bind_refused")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=f"(?s)could not bind port {server.port}:.*permission denied"):
        server.wait_ready(60)
    assert time.monotonic() - started < 30 and not server.port_taken()


def test_a_server_that_never_answers_times_out(launcher):
    server = launcher("silent")
    with pytest.raises(TimeoutError, match="silent server not ready after 3s"):
        server.wait_ready(3)
    assert not server.port_taken()


def test_relaunched_stops_the_old_server_and_starts_the_same_command_on_another_port(launcher):
    server = launcher("silent")
    deadline = time.monotonic() + 30
    while "fake launcher silent" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    again = server.relaunched()
    try:
        assert server.proc.poll() is not None and not process_group_alive(server.proc.pid)
        assert again.port != server.port and again.args == server.args and again.log_path == server.log_path
        assert again.command[:-1] == server.command[:-1]  # the same python, launcher and arguments
        assert again.proc.poll() is None
        # The first attempt's output stays in the log, before the relaunch's (it was overwritten)
        deadline = time.monotonic() + 30
        while again.log().count("fake launcher silent") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        log = again.log()
        assert log.count("fake launcher silent") == 2, log
        assert log.index(f"relaunched on port {again.port}") < log.rindex("fake launcher silent")
    finally:
        again.stop(grace_s=1)


def test_stop_kills_the_whole_group_when_sigterm_is_ignored(launcher):
    server = launcher("stubborn")
    server.wait_ready(60)  # the child is started by now
    started = time.monotonic()
    server.stop(grace_s=1)
    assert not process_group_alive(server.proc.pid)
    assert time.monotonic() - started < 15


def test_stop_ends_the_children_of_a_launcher_that_already_exited(launcher):
    server = launcher("exit_leaving_child")
    server.proc.wait(timeout=60)
    assert process_group_alive(server.proc.pid)  # its child lives on in the group
    server.stop(grace_s=5)
    assert not process_group_alive(server.proc.pid)


def test_serving_relaunches_a_server_whose_port_was_taken(launcher, monkeypatch):
    """Servers started side by side pick their ports at once, and another process may take one before
    its server binds it: ``serving`` relaunches that server on another port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        real_free_port = server_process.free_port
        picks = iter([port])  # the first pick is the taken port, as when two servers race for one
        monkeypatch.setattr(server_process, "free_port", lambda: next(picks, None) or real_free_port())
        first = launcher("serve")
        with serving({"deft": first}, 60) as running:
            server = running["deft"]
            assert server is not first and server.port != port
            assert first.proc.poll() is not None  # the first launch was stopped
            assert server.generate({"text": "a"}) == [{"text": "a!"}]


def test_a_relaunch_is_not_failed_by_the_first_attempts_bind_error(launcher):
    """The relaunch's output goes after the first attempt's in one log: its wait found the first attempt's "address
    already in use" and failed at once, naming the old port."""
    first = launcher("port_taken_once")
    with pytest.raises(RuntimeError, match=f"could not bind port {first.port}"):
        first.wait_ready(60)
    again = first.relaunched()
    try:
        again.wait_ready(60)
        assert again.generate({"text": "a"}) == [{"text": "a!"}] and not again.port_taken()
        assert "Address already in use" in again.log() and "Address already in use" not in again.attempt_log()
    finally:
        again.stop(grace_s=1)


def test_a_port_in_use_is_refused_before_launching(tmp_path):
    """SGLang binds its HTTP port only once the model is loaded: a server already answering on a given port
    (the README's example server, say) would have passed wait_ready for this one, and the demo reported on it."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {port} is in use"):
            ServerProcess("busy", [], tmp_path / "busy.log", python="/nonexistent/python", port=port)
        assert not port_free(port) and not port_free(port, "127.0.0.1")
    assert port_free(port)
    # a host this machine cannot bind is not "in use": the server says what is wrong with it
    assert port_free(port, "192.0.2.1")


def test_a_port_another_process_answers_on_is_not_taken_for_this_server(launcher, monkeypatch):
    """Two servers that draw the same free port: the one that loads first binds it, and the other's
    wait_ready, polling while its model loads, would get the first one's /health_generate answer and take it
    for its own. The listener is checked to belong to the server's process group."""
    import http.server
    import threading

    class Healthy(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    other = http.server.HTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        port = other.server_address[1]
        monkeypatch.setattr(server_process, "free_port", lambda: port)
        server = launcher("silent")  # never binds, as an SGLang server still loading its model
        assert server.port == port and server.port_held_by_another_process() and server.port_taken()
        with pytest.raises(RuntimeError, match=f"port {port} is held by a process outside"):
            server.wait_ready(30)
        assert not server.bind_failed()  # it was found out by the listener, not by a log line
    finally:
        other.shutdown()
        other.server_close()


def test_a_listener_on_another_address_at_the_same_port_is_not_a_rival(launcher, monkeypatch):
    """free_port binds 127.0.0.1:0, and the kernel may hand out a port some service holds on another address
    (127.0.0.2 here): nothing answers the server's 127.0.0.1 there, and the wait stopped a healthy server."""
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.2", 0))
        other.listen()
        port = other.getsockname()[1]
        assert port_free(port)
        monkeypatch.setattr(server_process, "free_port", lambda: port)
        server = launcher("silent")
        # (a rival on 127.0.0.1 itself: test_a_port_another_process_answers_on_is_not_taken_for_this_server)
        assert server.port == port and not server.port_held_by_another_process() and not server.port_taken()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="no /proc")
def test_a_descriptor_closed_during_the_scan_hides_none_of_the_others(monkeypatch):
    """A descriptor closed between the listing and its readlink (a launcher's connections come and go) ended the
    scan of that process: its listener went unseen, and wait_ready called the server's own port another's."""
    import os

    real_readlink, mine, failed = os.readlink, f"/proc/{os.getpid()}/fd/", []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def closed_meanwhile(path):
            if path.startswith(mine) and path != f"{mine}{listener.fileno()}" and not failed:
                failed.append(path)
                raise FileNotFoundError(path)
            return real_readlink(path)

        monkeypatch.setattr(server_process.os, "readlink", closed_meanwhile)
        inodes = server_process._group_socket_inodes(os.getpgid(0))
        assert failed and str(os.fstat(listener.fileno()).st_ino) in inodes


def test_a_zombie_is_not_a_live_process():
    """Under PID 1 or a subreaper that does not reap, a server's exited children stay zombies in its group:
    counting them, every stop() would wait out its whole grace and still find the group alive."""
    import os
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # exited, not reaped: a zombie, which killpg(pgid, 0) still finds
        if open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.05)
    try:
        os.killpg(child.pid, 0)  # the signal check alone would call the group alive
        assert not process_group_alive(child.pid)
        # nor a launcher's owner that exited (its parent not reaping it): the launcher outlived it
        assert not server_process._pid_alive(child.pid) and server_process._pid_alive(os.getpid())
    finally:
        child.wait()


@pytest.mark.parametrize("thread, wrapper", [("main", "exec"), ("worker", "exec"), ("worker", "sh")])
def test_a_server_ends_when_the_process_that_started_it_is_killed(launcher, tmp_path, thread, wrapper):
    """A test run or script killed by SIGKILL (or SIGTERM past pytest's teardown) runs no stop(): the server,
    in a session of its own, would keep running (and its GPU memory) into whatever runs next. Started from a
    worker thread that has ended by then (bench_e2e's relaunches), the parent-death signal cannot cover it:
    the launcher's watch of its owner does (end_with_parent_process), also through a ``python`` wrapper that
    runs it as a child instead of exec'ing it (the launcher's parent is then the wrapper, which lives on)."""
    import json
    import os
    import signal
    import subprocess

    server = launcher("serve")  # the fixture's fake python, reused by the owner below
    python = server.command[0]
    server.stop(grace_s=1)
    if wrapper == "sh":
        script = Path(python).read_text().split("exec ", 1)[1]
        python = str(tmp_path / "python_no_exec")
        Path(python).write_text(f"#!/bin/sh\n{script}")
        Path(python).chmod(0o755)
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import json, sys, time
        from pathlib import Path
        from sglang_deft.server_process import ServerProcess
        import threading
        start = lambda: ServerProcess("owned", ["serve"], Path({str(tmp_path / "owned.log")!r}), python={python!r})
        if {thread!r} == "main":
            s = start()
        else:
            box = []
            t = threading.Thread(target=lambda: box.append(start()))
            t.start()
            t.join()
            s = box[0]
        s.wait_ready(60)
        print(json.dumps(s.proc.pid), flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        pgid = json.loads(owner.stdout.readline())
        assert process_group_alive(pgid)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 20
        while process_group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_group_alive(pgid)
    finally:
        owner.kill()
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, NameError):
            pass


def test_the_launcher_starts_its_parent_watch_first(monkeypatch):
    """launch_server.main starts the watch before anything else (a launcher that fails later still ends with
    its parent), and the watch is a no-op without ServerProcess's variable."""
    from sglang_deft import launch_server

    class Started(Exception):
        pass

    def started():
        raise Started

    monkeypatch.setattr(server_process, "end_with_parent_process", started)
    with pytest.raises(Started):
        launch_server.main(["--model-path", "unused"])
    monkeypatch.undo()
    monkeypatch.delenv(server_process.PARENT_PID_ENV, raising=False)
    before = {t.name for t in threading.enumerate()}
    server_process.end_with_parent_process()
    assert "end-with-parent" not in {t.name for t in threading.enumerate()} - before


def test_a_python_that_cannot_start_leaves_no_log_file_open(tmp_path, monkeypatch):
    """Popen's failure (no such program) left the server's log open, with no process to write it."""
    opened = []
    real_open = open

    def tracking_open(*args, **kwargs):
        f = real_open(*args, **kwargs)
        opened.append(f)
        return f

    monkeypatch.setattr("builtins.open", tracking_open)
    with pytest.raises(FileNotFoundError):
        ServerProcess("missing-python", [], tmp_path / "server.log", python=str(tmp_path / "no-such-python"))
    assert opened and all(f.closed for f in opened)
