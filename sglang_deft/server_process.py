"""A ``python -m sglang_deft.launch_server`` subprocess for the demo, tests and scripts: start, wait, query, stop.

The server runs in its own process group (its scheduler and detokenizer children included), which
:meth:`ServerProcess.stop` ends; its stdout and stderr (SGLang's log, with the deft sharing lines)
go to a file.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def _group_members(pgid: int) -> list[tuple[str, str]] | None:
    """(pid, state) of every process of group ``pgid`` from /proc; None where there is no /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, the last ")" ends it
            state, _ppid, pgrp = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError, IndexError):  # exited meanwhile
            continue
        if int(pgrp) == pgid:
            members.append((entry.name, state))
    return members


def process_group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still running (a server's children can outlive it). Zombies
    do not count: under PID 1 or a subreaper that does not reap, a dead scheduler stays one for good."""
    members = _group_members(pgid)
    if members is not None:
        return any(state != "Z" for _, state in members)
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but not ours to signal
        return True


def _end_with_parent() -> None:
    """In the launcher, before it runs (Linux): SIGTERM when the process that started it dies, even by SIGKILL.
    Its own session keeps it out of the terminal's signals, so nothing else would stop it; SGLang's launcher
    then stops its scheduler and detokenizer (they die with it too)."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# The pid of the process that started a launcher through ServerProcess, for its watch (end_with_parent_process).
PARENT_PID_ENV = "SGLANG_DEFT_PARENT_PID"


def _pid_alive(pid: int) -> bool:
    """A zombie is not alive (as in ``process_group_alive``): an owner that exited stays one until its parent reaps
    it, which a parent that does not (PID 1 in a container) never does."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, not ours to signal
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # not readable (no /proc, hidepid) or gone meanwhile: the signal check's answer; a next poll sees
        return True  # an exit


def end_with_parent_process(poll_s: float = 0.5) -> None:
    """In the launcher: SIGTERM itself once the process named by ``PARENT_PID_ENV`` (the ServerProcess's owner)
    is gone. The parent-death signal cannot cover a launcher started from a thread other than the main one (it
    comes when that *thread* ends); this watch covers every launcher, polling from a daemon thread: its parent
    pid changes (the orphan is reparented) or, where a wrapper that did not exec stands between them (a shell
    script as ``python``), the owner's pid is gone. A no-op without the variable (a launcher started by hand)."""
    pid = os.environ.pop(PARENT_PID_ENV, None)  # popped: SGLang's own subprocesses are the launcher's to end
    if not pid or not pid.isdigit():
        return
    owner, parent = int(pid), os.getppid()
    if parent != owner:
        if not _pid_alive(owner):  # gone before the launcher got here
            os.kill(os.getpid(), signal.SIGTERM)
            return
        print(f"[sglang_deft] the launcher's parent is pid {parent}, not the process that started it ({owner}): "
              f"it ends when either is gone", file=sys.stderr, flush=True)

    def watch():
        while os.getppid() == parent and (parent == owner or _pid_alive(owner)):
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


try:  # resolved here, not in the forked child
    import ctypes

    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _prctl = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What sglang_deft.launch_server says when its HTTP port is taken before SGLang starts (read by bind_failed)
PORT_IN_USE = "is in use (another server?)"


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be bound on ``host`` (127.0.0.1: where the launcher's server listens by default)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # As uvicorn binds: a port whose last connection is in TIME_WAIT (a server stopped a minute ago) is
        # free to it, and one something listens on is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            # Only a port in use: a host this machine cannot bind, or a privileged port, is the server's to report
            return e.errno != errno.EADDRINUSE
    return True


# The local addresses (as /proc/net/tcp{,6} write them: hex, in the kernel's byte order) of a listener that would
# answer a connection to 127.0.0.1, where a ServerProcess polls its server: 127.0.0.1 itself, any IPv4 address,
# any IPv6 address (dual-stack) and the v4-mapped ::ffff:127.0.0.1. A listener on 127.0.0.2, ::1 or a LAN address
# at the same port answers nothing there.
_ANSWERS_LOOPBACK = {"0100007F", "00000000", "0" * 32, "0000000000000000FFFF00000100007F"}


def _listening_inodes(port: int) -> set[str] | None:
    """The inodes of the TCP sockets listening on ``port`` where they would answer 127.0.0.1; None where
    /proc/net is not there."""
    inodes, readable = set(), False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for row in rows:
            fields = row.split()  # sl local_address rem_address st ... inode; st 0A is LISTEN
            if len(fields) <= 9 or fields[3] != "0A":
                continue
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and address.upper() in _ANSWERS_LOOPBACK:
                inodes.add(fields[9])
    return inodes if readable else None


def _group_socket_inodes(pgid: int) -> set[str]:
    """The inodes of every socket a process of group ``pgid`` holds open."""
    inodes = set()
    for pid, _ in _group_members(pgid) or []:
        try:
            fds = list(os.scandir(f"/proc/{pid}/fd"))
        except OSError:  # exited meanwhile, or not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(fd.path)
            except OSError:  # closed since the listing: one descriptor, not the process's others (its listener)
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    return inodes


# The hosts a ServerProcess and its server talk to each other on. Proxy variables (http_proxy, ...) without them in
# no_proxy sent those requests to the proxy: wait_ready never saw the server answer (a demo waited out its --timeout)
# and SGLang's own warm-up request failed too.
LOCAL_HOSTS = ("127.0.0.1", "localhost")
NO_PROXY_KEYS = ("no_proxy", "NO_PROXY")
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy, whatever the environment says


def with_local_hosts_unproxied(env) -> dict[str, str]:
    """``env`` (a mapping) with ``LOCAL_HOSTS`` in no_proxy and NO_PROXY: both set to the entries of either (libraries
    read the lowercase one first, so a NO_PROXY alone must not be hidden by it), the local hosts added. Unchanged where
    an entry is ``*`` (no proxy for any host; "*,127.0.0.1" is no longer that to urllib or requests)."""
    hosts = [h.strip() for key in NO_PROXY_KEYS for h in env.get(key, "").split(",") if h.strip()]
    if "*" in hosts:
        return dict(env)
    merged = ",".join(dict.fromkeys(hosts + list(LOCAL_HOSTS)))
    return {**env, **{key: merged for key in NO_PROXY_KEYS}}


class ServerProcess:
    def __init__(self, name: str, args: list[str], log_path: Path, *, cwd: Path | None = None,
                 env: dict[str, str] | None = None, python: str = sys.executable, port: int | None = None,
                 append_log: bool = False):
        """``append_log``: add to ``log_path`` after a line naming the new port (a relaunch), instead of
        starting it afresh."""
        self.name, self.args, self._cwd, self._env, self._python = name, list(args), cwd, env, python
        self._stopped = False
        if port is not None and not 0 <= port <= 65535:  # (bind raised OverflowError)
            raise ValueError(f"port {port}: a TCP port is 1-65535 (0 or None: a free one)")
        if port and not port_free(port):
            # SGLang binds its HTTP port only once the model is loaded, so until then wait_ready would take
            # whatever already answers there for this server.
            raise RuntimeError(f"port {port} is in use (another server?): pick another port, or leave it out "
                               "for a free one")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "a" if append_log else "w")
        if append_log:
            self._log.write(f"\n----- {name} relaunched on port {self.port} -----\n")
            self._log.flush()  # before the child's writes, which go to the same file
        # Where this attempt's output starts: an earlier attempt's "address already in use" is not this one's.
        self._log_start = self.log_path.stat().st_size
        self.command = [python, "-m", "sglang_deft.launch_server", *args, "--port", str(self.port)]
        # The parent-death signal comes when the *thread* that forked ends: only the main thread's end is the
        # process's (bench_e2e relaunches servers from pool threads that end before their servers should).
        # The launcher's own watch of this process (end_with_parent_process) covers every thread.
        in_main_thread = threading.current_thread() is threading.main_thread()
        child_env = {**with_local_hosts_unproxied(os.environ if env is None else env),
                     PARENT_PID_ENV: str(os.getpid())}
        try:
            self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=cwd, env=child_env, start_new_session=True,
                                         preexec_fn=_end_with_parent if _prctl is not None and in_main_thread else None)
        except BaseException:  # e.g. no such python: the log file is not left open with no process to write it
            self._log.close()
            raise

    def wait_ready(self, timeout_s: float, on_poll=None) -> float:
        """Block until ``/health_generate`` answers 200; returns the seconds waited. ``on_poll(elapsed)``
        is called about once a second (the demo reports startup progress with it)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if on_poll is not None:
                on_poll(time.monotonic() - start)
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            # uvicorn logs a failed bind but SGLang's scheduler processes live on: without this the
            # wait would run to its timeout (callers relaunch on another port).
            if line := self.bind_failed():
                what = f"port {self.port}" if f", {self.port})" in line else f"a port ({line.strip()[-200:]})"
                raise RuntimeError(f"{self.name} server could not bind {what}:\n{self.log()[-4000:]}")
            # SGLang binds its port only once the model is loaded: until then another process that took the
            # port (a server started beside this one that drew the same free port) would answer for it.
            if self.port_held_by_another_process():
                raise RuntimeError(f"{self.name} server's port {self.port} is held by a process outside its own "
                                   "process group, which would answer for it")
            try:
                with _LOCAL.open(f"{self.url}/health_generate", timeout=10) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.name} server not ready after {timeout_s:.0f}s:\n{self.log()[-4000:]}")

    def port_taken(self) -> bool:
        """Its port was taken between ``free_port`` and the server's bind (servers starting together
        pick ports at the same time, and each SGLang server opens more)."""
        return bool(self.bind_failed(in_use_only=True)) or self.port_held_by_another_process()

    def bind_failed(self, in_use_only: bool = False) -> str:
        """The log's first line saying a port could not be bound ("" if none): "address already in use" (uvicorn's on
        the HTTP port, or another port's, SGLang's own or NCCL's, which a relaunch picks anew too), the launcher's
        own check of the HTTP port (``PORT_IN_USE``: a client connection can hold a port ``free_port`` drew), or, unless
        ``in_use_only``, uvicorn's "error while attempting to bind" for any other cause (a privileged port, a host
        this machine does not have), after which SGLang's warm-up thread polled the dead port for two minutes before
        the server exited."""
        in_use = ("address already in use", PORT_IN_USE)
        needles = in_use if in_use_only else (*in_use, "error while attempting to bind")
        return next((line for line in self.attempt_log().splitlines() if any(n in line.lower() for n in needles)), "")

    def port_held_by_another_process(self) -> bool:
        """A process outside this server's process group listens on its port (False where /proc cannot say)."""
        listening = _listening_inodes(self.port)
        return bool(listening) and not listening & _group_socket_inodes(self.proc.pid)

    def relaunched(self) -> ServerProcess:
        """Stops this server and starts the same command on a new port, its output after this one's in the same
        log (an earlier attempt's error stays readable)."""
        self.stop()
        return ServerProcess(self.name, self.args, self.log_path, cwd=self._cwd, env=self._env, python=self._python,
                             append_log=True)

    def post(self, route: str, payload: dict, timeout_s: float = 600):
        """The route's JSON answer; None for an empty one (e.g. ``/close_session``)."""
        request = urllib.request.Request(f"{self.url}{route}", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with _LOCAL.open(request, timeout=timeout_s) as r:
            body = r.read()
        return json.loads(body) if body else None

    def server_info(self, timeout_s: float = 30) -> dict:
        """SGLang's ``/server_info``: the ServerArgs the server runs with (after its launcher's rewrites) and more."""
        with _LOCAL.open(f"{self.url}/server_info", timeout=timeout_s) as r:
            return json.loads(r.read())

    def generate(self, payload: dict, timeout_s: float = 600) -> list[dict]:
        """``/generate``; always a list (one entry per prompt and per ``n``)."""
        out = self.post("/generate", payload, timeout_s)
        return out if isinstance(out, list) else [out]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def attempt_log(self) -> str:
        """The log of this launch only (``log()`` also holds the attempts before a ``relaunched()`` one)."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the whole group (launcher, scheduler, detokenizer), SIGKILL if any of it lingers
        after ``grace_s``: a scheduler that outlives its launcher would keep its GPU memory. Once stopped, a later
        call does nothing: the group's id, free once the launcher is reaped, may be another session's by then."""
        if self._stopped:
            return
        try:
            self._stop(grace_s)
            self._stopped = True  # (not after an interrupted stop: a second one still ends the group)
        finally:
            self._log.close()

    def _stop(self, grace_s: float) -> None:
        if self.proc.poll() is None or process_group_alive(self.proc.pid):
            for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline and process_group_alive(self.proc.pid):
                    try:
                        self.proc.wait(timeout=0.2)  # reaps the launcher (a zombie stays in the group)
                    except subprocess.TimeoutExpired:
                        continue
                    time.sleep(0.2)  # the launcher is gone; its children are still exiting
                if not process_group_alive(self.proc.pid):
                    break
        if self.proc.poll() is None:
            try:  # SIGKILL sent: only a launcher stuck in the kernel (a GPU driver's teardown) is still here
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                print(f"[{self.name}] launcher pid {self.proc.pid} survived SIGKILL for 60 s; not waiting for it",
                      file=sys.stderr, flush=True)
