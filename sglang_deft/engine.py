"""``sglang_deft.Engine``: SGLang's offline Engine with the ``deft`` backend registered everywhere.

Import it as ``from sglang_deft import Engine`` (or ``import sglang_deft.engine``): the import sets
the process up before SGLang loads (``server_setup.prepare_process``: on a machine without CUDA,
SGLang's CPU engine and ``sglang_deft.cpu_compat``). Constructor arguments are SGLang's Engine /
ServerArgs keywords; ``attention_backend="deft"`` and ``decode_attention_backend="deft"`` are valid,
and configurations deft cannot serve raise ``sglang_deft.config_checks.UnsupportedConfiguration`` (a ValueError):
those of the flags and the model's config before anything starts, those of the loaded model's layers (heads,
windows, sinks: found in SGLang's scheduler process) once the scheduler signals its failure, with the Engine's
processes ended. What an offline Engine in this process cannot do whatever its backend (tokenizer workers; a device
other than the one this import set the process up for) raises a plain ValueError, before anything starts.
"""
from __future__ import annotations

import atexit
import contextlib
import glob
import json
import logging
import os
import signal
import tempfile
import threading
from pathlib import Path

from sglang_deft.server_setup import prepare_process

_IMPORT_DEVICE = prepare_process(None)

import sglang.srt.entrypoints.engine as _sglang_engine  # noqa: E402  (after prepare_process)

from sglang_deft import subprocess_entry  # noqa: E402
from sglang_deft.config_checks import REFUSAL_FILE_ENV, UnsupportedConfiguration  # noqa: E402
from sglang_deft.registration import register  # noqa: E402
from sglang_deft.server_setup import check_startup, make_server_args, restore_env, split_deft_backend  # noqa: E402

logger = logging.getLogger(__name__)


class Engine(_sglang_engine.Engine):
    run_scheduler_process_func = staticmethod(subprocess_entry.run_scheduler_process)
    run_detokenizer_process_func = staticmethod(subprocess_entry.run_detokenizer_process)

    def __init__(self, **kwargs):
        register()
        if "server_args" not in kwargs:
            device = kwargs.get("device") or _IMPORT_DEVICE
            _check_device(device)
            split_deft_backend(kwargs, device)
            kwargs.setdefault("log_level", "error")  # SGLang's Engine default
            # (server_args_class: SGLang's hook for a ServerArgs subclass)
            kwargs = {"server_args": make_server_args(lambda: self.server_args_class(**kwargs), kwargs, device)}
        else:
            _check_device(kwargs["server_args"].device)
        _check_offline(kwargs["server_args"])
        check_startup(kwargs["server_args"])
        # One Engine starts at a time: the refusal file's variable and the set of the caller's children that a
        # failed start ends are the process's, so Engines started together from two threads took each other's.
        with _STARTING, _refusals_raised(self, kwargs["server_args"]):
            super().__init__(**kwargs)


_STARTING = threading.Lock()


@contextlib.contextmanager
def _refusals_raised(engine: Engine, server_args):
    """A refusal of the loaded model (``config_checks.check_model_runner``, in the scheduler process) raised in the
    caller as ``UnsupportedConfiguration``. SGLang's launch-phase SIGQUIT handler, which a failing child signals,
    ends the whole process tree, the caller's own process included (a script or a Jupyter kernel killed, exit
    137). While the Engine starts, a SIGQUIT from one of its processes (each marks its signals:
    ``subprocess_entry.mark_failures_signalled``) ends the processes the start began instead, so that SGLang's
    start-up wait raises at once (it returns only once a failed scheduler has exited), and the Engine raises once
    the start returns, for a failure that wait does not watch (the detokenizer's). A
    SIGQUIT not from its processes (an earlier Engine's, or its watchdog's) goes on to the handler it would have met.
    Nothing is raised from the handler: it could land in any ``except Exception`` of the start's code. On failure
    (also on ^C during the start) the processes the Engine started are ended, the zmq sockets the start opened here
    are closed (``_sockets_in``), and the refusal the scheduler wrote (to
    the file ``REFUSAL_FILE_ENV`` names) is raised, or the error where there is none. A handler of the caller's own
    (``custom_sigquit_handler``) is left as it is; off the main thread none can be set (SGLang installs no
    ``custom_sigquit_handler`` there either), and a failing child's SIGQUIT ends the caller as with SGLang's Engine
    (warned, unless the process already has a SIGQUIT handler of the caller's own)."""
    import psutil  # (an SGLang dependency)

    # The processes this Engine starts are the caller's children that were not there before, with their own
    # children: only those are ended on failure (another Engine's processes, or any of the caller's from before, are
    # left running; so is multiprocessing's resource tracker, which the first spawn starts and later ones reuse). A
    # child that another thread of the caller starts while this Engine starts cannot be told from the Engine's, and is
    # ended with them if the start fails.
    children_before = {p.pid for p in psutil.Process().children()}
    fd, path = tempfile.mkstemp(prefix="sglang_deft_refusal_")
    os.close(fd)
    env_before = os.environ.get(REFUSAL_FILE_ENV)
    os.environ[REFUSAL_FILE_ENV] = path  # the spawned processes inherit it
    # (Python sets signal handlers from the main thread only, and so does SGLang)
    on_main_thread = threading.current_thread() is threading.main_thread()
    own = server_args.custom_sigquit_handler is None and on_main_thread
    # Off the main thread SGLang installs no handler either, custom_sigquit_handler included: what decides is the
    # process's handler now.
    if not on_main_thread and _ends_the_process(signal.getsignal(signal.SIGQUIT)):
        logger.warning("sglang_deft.Engine started off the main thread: a process of it that fails while it starts "
                       "(a model refused in SGLang's scheduler, say) sends this process SIGQUIT, whose default action "
                       "ends it, as with SGLang's own Engine%s. Start the Engine on the main thread to get the refusal "
                       "raised here instead, or install a SIGQUIT handler (signal.signal) on the main thread first.",
                       "" if server_args.custom_sigquit_handler is None else
                       " (custom_sigquit_handler is installed from the main thread only: not this time)")
    quiet = _Without("Using custom SIGQUIT handler")  # SGLang logs that at error level
    handler_before = None
    start = None
    if own:
        handler_before = signal.getsignal(signal.SIGQUIT)
        # In subprocess_entry: the handler is pickled into every spawned process, which imports its module.
        server_args.custom_sigquit_handler = subprocess_entry.child_failed_while_starting
        start = subprocess_entry.while_starting = _Start(path, children_before, handler_before)
        _sglang_engine.logger.addFilter(quiet)
    try:
        yield
        if own:  # started: from here a failing child ends the process tree, as SGLang's Engine has it
            signal.signal(signal.SIGQUIT, _end_process_tree)
            subprocess_entry.while_starting = None
        # After the switch: a failure signalled up to it has set ``failed`` (asked first, one landing between the
        # question and the switch was ended by the start's handler and the Engine returned as started, dead).
        if start is not None and start.failed:  # e.g. the detokenizer's, which SGLang's start-up wait does not watch
            raise _FailedWhileStarting(FAILED_WHILE_STARTING)
    except BaseException as e:
        # SGLang's watchdog of the processes that did start: polling on, it would signal their ends (the handler's
        # kills, or those below) as failures. Both before the caller's handler is back: a rank that fails as its peers
        # are ended signals too
        # The tokenizer manager is the Engine's only once SGLang's start-up wait returned: one whose scheduler refused
        # the model is a local of the frames the error passed through (its soft watchdog's thread already running).
        holders = _left_by(engine, e)
        for tokenizer_manager in _tokenizer_managers(holders):
            watchdog = getattr(tokenizer_manager, "_subprocess_watchdog", None)
            if watchdog is not None:
                watchdog.stop()
            _quiet_soft_watchdog(getattr(tokenizer_manager, "soft_watchdog", None))
        _end_started_processes(children_before)
        # (what the caller must see is the refusal or the start's error, not a failure to close)
        with contextlib.suppress(Exception):
            _close_sockets(_sockets_in(holders))
        if own:  # None: a handler not set from Python
            signal.signal(signal.SIGQUIT, signal.SIG_DFL if handler_before is None else handler_before)
            subprocess_entry.while_starting = None
        atexit.unregister(engine.shutdown)  # SGLang's: at exit it would end every child of the caller
        problems = _read_refusal(path) if isinstance(e, Exception) else None
        if problems:
            raise UnsupportedConfiguration(problems) from e
        if start is not None and start.failed and isinstance(e, Exception) and not isinstance(e, _FailedWhileStarting):
            # SGLang's error then is its scheduler's death by the handler's SIGKILL, which it blames on the OOM killer
            raise _FailedWhileStarting(FAILED_WHILE_STARTING + "; its processes were ended") from e
        raise
    finally:
        if own:
            server_args.custom_sigquit_handler = None
            _sglang_engine.logger.removeFilter(quiet)
        restore_env(REFUSAL_FILE_ENV, env_before)
        # with the files the TP ranks write it through (``<path>.<pid>``), where a rank was ended before its rename
        for leftover in [path, *glob.glob(glob.escape(path) + ".*")]:
            with contextlib.suppress(OSError):
                os.unlink(leftover)


def _quiet_soft_watchdog(watchdog) -> None:
    """The failed start's tokenizer manager's soft watchdog (``--soft-watchdog-timeout``), made inactive. SGLang gives
    it no stop: its daemon thread, which nothing feeds once the start failed, would log a timeout and dump the ended
    schedulers' stacks every timeout for as long as the caller's process runs. Inactive, the thread only sleeps
    (SGLang's ``_WatchdogReal`` asks ``_active`` before each check; without a timeout the watchdog is a no-op that
    has none)."""
    if watchdog is not None and hasattr(watchdog, "_active"):
        watchdog._active = False


class _FailedWhileStarting(RuntimeError):
    pass


FAILED_WHILE_STARTING = "a process of sglang_deft.Engine failed while it started (its log above says why)"


class _Start:
    """The SIGQUIT handling of an Engine's start. A signal from one of its processes (marked beside the refusal file
    ``path``) ends the processes the start began, once (every TP rank signals): SGLang's start-up wait then sees its
    scheduler gone at once, and the Engine raises after it (``failed``). Any other goes on to the handler it would
    have met without the start: an earlier Engine's process or watchdog signals once, and that Engine must hear it."""

    def __init__(self, path: str, children_before: set[int], handler_before):
        self.path, self.children_before, self.handler_before = path, children_before, handler_before
        self.failed = False

    def __call__(self, signum, frame):
        if self.failed:
            return
        if not subprocess_entry.failure_marks(self.path):
            with contextlib.suppress(Exception):  # (see below)
                logger.error("deft: a SIGQUIT came while the Engine started, not from its processes: passed on")
            if callable(self.handler_before):
                self.handler_before(signum, frame)
            elif self.handler_before in (signal.SIG_DFL, None):  # what it would have done: end this process
                signal.signal(signal.SIGQUIT, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGQUIT)
            return
        self.failed = True
        _end_started_processes(self.children_before, wait=False)  # reaped once the start has returned
        # (after the kill: a log record written while the main thread was writing one can raise)
        with contextlib.suppress(Exception):
            logger.error("deft: a process of the Engine failed while it started (its log says why): its processes "
                         "were ended")


def _ends_the_process(handler) -> bool:
    """Whether SIGQUIT under ``handler`` ends this process: the default action, deft's handler of a started Engine,
    or SGLang's launch-phase handler (an SGLang Engine started before); not a handler of the caller's own."""
    return handler in (signal.SIG_DFL, _end_process_tree) or \
        getattr(handler, "__name__", None) == "launch_phase_sigquit_handler"


def _end_started_processes(children_before: set[int], wait: bool = True) -> None:
    from multiprocessing import resource_tracker

    import psutil

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    started = [p for p in psutil.Process().children() if p.pid not in children_before and p.pid != tracker]
    for child in list(started):
        with contextlib.suppress(psutil.Error):
            started += child.children(recursive=True)
    for process in started:
        with contextlib.suppress(psutil.Error):
            process.kill()
    if wait:
        psutil.wait_procs(started, timeout=10)  # reaped: no zombies left behind


def _left_by(engine, error: BaseException) -> list:
    """What a failed start may have left running or open: the Engine, its tokenizer manager, and the locals of the
    frames ``error`` passed through (the tokenizer manager SGLang made before its start-up wait, or one whose
    ``__init__`` or template set-up raised)."""
    holders = [engine, getattr(engine, "tokenizer_manager", None)]
    tb = error.__traceback__
    while tb is not None:
        holders += tb.tb_frame.f_locals.values()
        tb = tb.tb_next
    return holders


def _tokenizer_managers(holders: list) -> list:
    """The distinct tokenizer managers among ``holders``: what has a soft or subprocess watchdog to stop."""
    found = []
    for holder in holders:
        with contextlib.suppress(Exception):  # (a local may be anything)
            if (hasattr(holder, "soft_watchdog") or hasattr(holder, "_subprocess_watchdog")) and \
                    not any(holder is f for f in found):
                found.append(holder)
    return found


def _sockets_in(holders: list) -> list:
    """The zmq sockets among ``holders`` (``_left_by``) and one attribute down: those a failed start opened in this
    process.

    They must be closed while they can still be found. Nothing holds them once the error is dropped, and the tokenizer
    manager is in a reference cycle (its dispatcher holds its bound methods), so a garbage collection frees it: one
    that clears the context's weak set of sockets before running its finalizer, whose ``term()`` then waits forever
    for sockets still open. On the GPU host the caller's exit (torch's atexit hook collects) hung there for minutes."""
    import zmq  # (an SGLang dependency)

    sockets = []
    for holder in holders:
        with contextlib.suppress(Exception):  # (a local's attributes may be anything)
            for value in [holder, *vars(holder).values()] if hasattr(holder, "__dict__") else [holder]:
                if isinstance(value, zmq.Socket) and not any(value is s for s in sockets):
                    sockets.append(value)
    return sockets


def _close_sockets(sockets: list) -> None:
    """Closes ``sockets`` and the rest of their contexts' sockets, and ends the contexts, without waiting for anything
    queued (the peers are the ended processes)."""
    contexts = []
    for socket in sockets:
        if not any(socket.context is c for c in contexts):
            contexts.append(socket.context)
    for context in contexts:
        context.destroy(linger=0)


def _read_refusal(path: str) -> list[str] | None:
    """The problems a scheduler wrote (None if none did, or if what is there cannot be read)."""
    with contextlib.suppress(OSError, ValueError):
        problems = json.loads(Path(path).read_text() or "null")
        if isinstance(problems, list) and problems:
            return [str(p) for p in problems]
    return None


def _end_process_tree(signum, frame):  # SGLang's launch-phase handler, as SGLang's Engine installs it
    logger.error("Received sigquit from a child process. It usually means the child failed.")
    _sglang_engine.kill_process_tree(os.getpid())


class _Without(logging.Filter):
    """Drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _check_offline(server_args) -> None:
    """What an offline Engine cannot serve, refused before anything starts. With tokenizer workers SGLang 0.5.10's
    Engine starts a MultiTokenizerRouter in place of its tokenizer manager: the router serves the HTTP server's
    workers and has no ``generate_request``, so the Engine came up and every generate() raised AttributeError."""
    if server_args.tokenizer_worker_num > 1:
        n = server_args.tokenizer_worker_num
        # On the CPU the launcher refuses them too (config_checks: its CPU layer does not reach their processes).
        serve = "" if _IMPORT_DEVICE == "cpu" else f", or serve with python -m sglang_deft.launch_server " \
                                                   f"--tokenizer-worker-num {n}"
        raise ValueError(
            f"tokenizer_worker_num={n} in an offline Engine: SGLang's Engine then routes requests for HTTP tokenizer "
            f"workers and cannot generate itself; leave it at 1{serve}")


def _check_device(device: str) -> None:
    """The process was set up for ``_IMPORT_DEVICE`` at import: SGLang's layers would run the other
    device's kernels (CUDA ones on CPU tensors: the scheduler dies at its first RMSNorm)."""
    if device == "cpu" and _IMPORT_DEVICE != "cpu":
        raise ValueError(
            "device='cpu' on a machine with CUDA: set SGLANG_USE_CPU_ENGINE=1 before importing "
            "sglang_deft.Engine (SGLang reads it at import time)"
        )
    if device == "cuda" and _IMPORT_DEVICE != "cuda":
        raise ValueError(
            "device='cuda', but sglang_deft.Engine was imported for the CPU (no CUDA device, or "
            "SGLANG_USE_CPU_ENGINE=1 set; SGLang reads it at import time)"
        )
    if device.partition(":")[0] != _IMPORT_DEVICE:
        # e.g. xpu on a host without CUDA: the import installed the CPU layer's stand-in for sgl_kernel and SGLang's
        # is_cpu() answers True, so the other device's kernels would be chosen against a stubbed library.
        raise ValueError(
            f"device={device!r}, but sglang_deft.Engine was imported for {_IMPORT_DEVICE!r} (SGLang chooses its "
            "kernels at import time); use python -m sglang_deft.launch_server --device " + device)
