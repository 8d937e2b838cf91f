"""Entry functions for the processes SGLang spawns: they register ``deft`` there.

SGLang starts its scheduler and detokenizer with multiprocessing *spawn*: a fresh interpreter that
imports the target function's module, then unpickles the arguments (ServerArgs, which imports
SGLang), then calls the target. This module is that target's module, so its import runs first:
it re-activates the CPU compatibility layer when the parent did (``cpu_compat.install_if_requested``)
before any SGLang module loads, and the scheduler entry registers the backend before the model
runner looks it up. Nothing here imports SGLang at module level.
"""
import glob
import os

from sglang_deft import cpu_compat

cpu_compat.install_if_requested()


def run_scheduler_process(*args, **kwargs):
    """``sglang.srt.managers.scheduler.run_scheduler_process``, with ``deft`` registered first."""
    from sglang_deft.registration import register

    register()
    from sglang.srt.managers.scheduler import run_scheduler_process as run

    return run(*args, **kwargs)


def run_detokenizer_process(*args, **kwargs):
    """``sglang.srt.managers.detokenizer_manager.run_detokenizer_process``; importing this module
    is all it adds (the CPU compatibility layer where the parent had it)."""
    from sglang.srt.managers.detokenizer_manager import run_detokenizer_process as run

    return run(*args, **kwargs)


def failure_mark(refusal_file: str, pid: int) -> str:
    """The marker process ``pid`` leaves for a failure it signals while the Engine whose start wrote ``refusal_file``
    starts (``mark_failures_signalled``)."""
    return f"{refusal_file}.sigquit.{pid}"


def failure_marks(refusal_file: str) -> list[str]:
    """The markers of that start's processes so far."""
    return glob.glob(glob.escape(refusal_file) + ".sigquit.*")


def mark_failures_signalled() -> None:
    """In a process sglang_deft.Engine spawns while it starts: SGLang's processes report a failure by SIGQUIT to their
    parent (``psutil.Process.send_signal``, from their ``except`` blocks); each such signal now first leaves a marker
    beside the start's refusal file (``failure_mark``), so that the Engine tells its own processes' signals
    from others' (an earlier Engine's, which go where they would have gone: ``engine._Start``). Only while that start
    lasts: once it has ended its file is gone, and a failure later meets SGLang's handling unmarked. Called as this
    module loads (below): every process the Engine spawns imports it while unpickling its arguments (the Engine's
    SIGQUIT handler is in its ServerArgs), the scheduler ranks and the detokenizer, whose entries are here, and
    SGLang's DP controller, whose is not."""
    import signal

    from sglang_deft.config_checks import REFUSAL_FILE_ENV

    path = os.environ.get(REFUSAL_FILE_ENV)  # (not set in the Engine's own process as it imports this)
    if not path:
        return
    import psutil

    send = psutil.Process.send_signal
    if getattr(send, "marks_failures", False):
        return

    def send_signal(self, sig):
        if sig == signal.SIGQUIT and self.pid == os.getppid() and os.path.exists(path):
            try:
                open(failure_mark(path, os.getpid()), "w").close()
            except OSError:
                pass
        return send(self, sig)

    send_signal.marks_failures = True
    psutil.Process.send_signal = send_signal


mark_failures_signalled()


# While an sglang_deft.Engine starts in this process: what a child's SIGQUIT does (``engine._refusals_raised``).
while_starting = None


def child_failed_while_starting(signum, frame):
    """sglang_deft.Engine's SIGQUIT handler while it starts (``engine._refusals_raised``). Here because SGLang pickles
    it into the processes it spawns, which import this module anyway."""
    if while_starting is not None:
        while_starting(signum, frame)
