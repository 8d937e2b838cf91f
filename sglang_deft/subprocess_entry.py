"""Entry functions for the processes SGLang spawns: they register ``deft`` there.

SGLang starts its scheduler and detokenizer with multiprocessing *spawn*: a fresh interpreter that
imports the target function's module, then unpickles the arguments (ServerArgs, which imports
SGLang), then calls the target. This module is that target's module, so its import runs first:
it re-activates the CPU compatibility layer when the parent did (``cpu_compat.install_if_requested``)
before any SGLang module loads, and the scheduler entry registers the backend before the model
runner looks it up. Nothing here imports SGLang at module level.
"""
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


# While an sglang_deft.Engine starts in this process: what a child's SIGQUIT does (``engine._refusals_raised``).
while_starting = None


def child_failed_while_starting(signum, frame):
    """sglang_deft.Engine's SIGQUIT handler while it starts (``engine._refusals_raised``). Here because SGLang pickles
    it into the processes it spawns, which import this module anyway."""
    if while_starting is not None:
        while_starting(signum, frame)
