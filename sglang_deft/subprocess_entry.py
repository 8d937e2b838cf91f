"""Entry functions for the processes SGLang spawns: they register ``deft`` there.

SGLang starts its scheduler and detokenizer with multiprocessing *spawn*: a fresh interpreter that
imports the target function's module, then unpickles the arguments (ServerArgs, which imports
SGLang), then calls the target. This module is that target's module, so its import runs first:
it re-activates the CPU compatibility layer when the parent did (``cpu_compat.install_if_requested``)
before any SGLang module loads, and the scheduler entry registers the backend before the model
runner looks it up. Nothing here imports SGLang at module level.
"""
import logging
import threading

from sglang_deft import cpu_compat

cpu_compat.install_if_requested()
logger = logging.getLogger(__name__)


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


# Set by child_failed_while_starting in the Engine's process: SGLang's start-up wait watches the scheduler only, and a
# detokenizer that fails signals and then exits with status 0, which SGLang's watchdog ignores too.
failed_while_starting = threading.Event()


def child_failed_while_starting(signum, frame):
    """sglang_deft.Engine's SIGQUIT handler while it starts (``engine._refusals_raised``). Here because SGLang pickles
    it into the processes it spawns, which import this module anyway."""
    failed_while_starting.set()
    logger.error("deft: a process of the Engine failed while it started (its log says why); the Engine raises once "
                 "SGLang's start-up wait returns")
