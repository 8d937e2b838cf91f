"""What ``sglang_deft.Engine`` hands SGLang's Engine, without starting one.

In a process of its own: importing ``sglang_deft.engine`` sets ``SGLANG_USE_CPU_ENGINE`` and
SGLang's import-time constants, which must not leak into (or depend on) the other tests' process.
SGLang's ``Engine.__init__`` is replaced by one that records its ``server_args``.
"""
from __future__ import annotations

import os
import textwrap

import pytest
import torch

from repo_modules import REPO, child_result

MODEL = REPO / "models" / "tiny-llama-deft"
# Where Engine runs when not told: CUDA when there is one, prefill on SGLang's backend for that device.
DEVICE, PREFILL = ("cuda", "triton") if torch.cuda.is_available() else ("cpu", "torch_native")

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import sglang_deft.engine as deft_engine
    import sglang.srt.entrypoints.engine as sglang_engine
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import ServerArgs
    from sglang_deft.config_checks import UnsupportedConfiguration

    import threading
    thread_errors = []  # a constructor that raised in a thread: a start that failed there
    threading.excepthook = lambda a: thread_errors.append(repr(a.exc_value))
    seen, handlers = [], []
    sglang_engine.Engine.__init__ = lambda self, **kw: (seen.append(kw["server_args"]),
                                                        handlers.append(kw["server_args"].custom_sigquit_handler))
    model = sys.argv[1]
    result = {"import_device": deft_engine._IMPORT_DEVICE, "cpu_engine": os.environ.get("SGLANG_USE_CPU_ENGINE")}

    def args(a):
        return {k: getattr(a, k) for k in ("attention_backend", "decode_attention_backend", "prefill_attention_backend",
                                           "log_level", "device")}

    result["registered_before"] = "deft" in ATTENTION_BACKENDS
    import glob, signal, tempfile
    from sglang_deft import subprocess_entry
    from sglang_deft.config_checks import REFUSAL_FILE_ENV
    refusal_files = lambda: set(glob.glob(os.path.join(tempfile.gettempdir(), "sglang_deft_refusal_*")))
    files_before = refusal_files()
    deft_engine.Engine(model_path=model, attention_backend="deft", grammar_backend="none", max_total_tokens=16384)
    result["registered_after"] = "deft" in ATTENTION_BACKENDS
    # started: SGLang's own handling of a failing child from here; nothing of the start-up's left behind
    result["started_state"] = {
        "handler_while_starting": handlers[-1] is subprocess_entry.child_failed_while_starting,
        "sigquit_after": signal.getsignal(signal.SIGQUIT) is deft_engine._end_process_tree,
        "custom_handler_after": seen[-1].custom_sigquit_handler is None,
        "refusal_env_after": os.environ.get(REFUSAL_FILE_ENV), "refusal_files_left": sorted(refusal_files() - files_before)}
    result["split"] = args(seen[-1])
    result["max_total_tokens"] = seen[-1].max_total_tokens
    deft_engine.Engine(model_path=model, decode_attention_backend="deft", grammar_backend="none", log_level="info")
    result["decode_only"] = args(seen[-1])
    own = ServerArgs(model_path=model, device=sys.argv[2], attention_backend=sys.argv[3],
                     decode_attention_backend="deft", grammar_backend="none", log_level="warning")
    deft_engine.Engine(server_args=own)
    result["own_args_passed_as_given"] = seen[-1] is own

    class TaggedArgs(ServerArgs):  # SGLang's hook for a ServerArgs subclass: Engine.server_args_class
        pass

    class TaggedEngine(deft_engine.Engine):
        server_args_class = TaggedArgs

    TaggedEngine(model_path=model, attention_backend="deft", grammar_backend="none")
    result["server_args_class"] = type(seen[-1]).__name__
    mine = lambda signum, frame: None  # the caller's own SIGQUIT handler: the Engine leaves it as it is
    deft_engine.Engine(model_path=model, attention_backend="deft", grammar_backend="none", custom_sigquit_handler=mine)
    result["started_state"]["callers_handler_kept"] = handlers[-1] is mine and seen[-1].custom_sigquit_handler is mine
    try:
        deft_engine.Engine(model_path=model, attention_backend="deft", enable_torch_compile=True, grammar_backend="none")
    except UnsupportedConfiguration as e:
        result["refused"] = str(e)
    try:  # (SGLang's own Engine starts, and then none of its generate() calls can run)
        deft_engine.Engine(model_path=model, attention_backend="deft", tokenizer_worker_num=2, grammar_backend="none")
    except ValueError as e:
        result["tokenizer_workers_refused"] = str(e)
    result["calls"] = len(seen)
    deft_engine._IMPORT_DEVICE = "cuda"  # as imported on a machine with CUDA
    try:
        deft_engine.Engine(model_path=model, device="cpu", attention_backend="deft")
    except ValueError as e:
        result["cpu_on_cuda"] = str(e)
    try:
        deft_engine.Engine(server_args=ServerArgs(model_path=model, device="cpu", attention_backend="torch_native",
                                                  decode_attention_backend="deft", grammar_backend="none"))
    except ValueError as e:
        result["cpu_args_on_cuda"] = str(e)
    deft_engine._IMPORT_DEVICE = "cpu"  # as imported without CUDA, or with SGLANG_USE_CPU_ENGINE=1
    try:
        deft_engine.Engine(model_path=model, device="cuda", attention_backend="deft")
    except ValueError as e:
        result["cuda_on_cpu"] = str(e)
    try:
        deft_engine.Engine(server_args=ServerArgs(model_path=model, device="cuda", attention_backend="triton",
                                                  decode_attention_backend="deft", grammar_backend="none"))
    except ValueError as e:
        result["cuda_args_on_cpu"] = str(e)
    try:  # not deft's (it refuses xpu itself): the CPU import's stand-in for sgl_kernel would be under it
        deft_engine.Engine(model_path=model, device="xpu", attention_backend="triton", grammar_backend="none")
    except ValueError as e:
        result["xpu_on_cpu"] = str(e)
    result["calls_at_end"] = len(seen)
    deft_engine._IMPORT_DEVICE = result["import_device"]
    # SGLang's start-up wait watches the scheduler only: a detokenizer that fails signals SIGQUIT and exits with
    # status 0, and SGLang's constructor returned as if started
    started = sglang_engine.Engine.__init__

    def detokenizer_fails(self, **kw):
        # and a TP rank ended between writing its refusal's temporary file and the rename
        open(os.environ[REFUSAL_FILE_ENV] + ".999999", "w").close()
        signal.signal(signal.SIGQUIT, kw["server_args"].custom_sigquit_handler)  # as SGLang's constructor does
        open(subprocess_entry.failure_mark(os.environ[REFUSAL_FILE_ENV], 999998), "w").close()  # the detokenizer's mark
        os.kill(os.getpid(), signal.SIGQUIT)

    sglang_engine.Engine.__init__ = detokenizer_fails
    before = signal.getsignal(signal.SIGQUIT)
    try:
        deft_engine.Engine(model_path=model, attention_backend="deft", grammar_backend="none")
    except RuntimeError as e:
        result["detokenizer_failed"] = str(e)
    result["sigquit_after_failed_start"] = signal.getsignal(signal.SIGQUIT) is before
    result["refusal_files_left_after_failure"] = sorted(refusal_files() - files_before)
    sglang_engine.Engine.__init__ = started
    deft_engine.Engine(model_path=model, attention_backend="deft", grammar_backend="none")  # a retry that starts
    result["retry_started"] = True
    # A SIGQUIT from one of the Engine's processes (marked beside its refusal file: subprocess_entry) ends the
    # processes the start began, so that SGLang's start-up wait (it returns only once a failed scheduler has exited)
    # raises at once; nothing is raised from the handler, which could land in an `except` of the start's code
    import subprocess, time, types
    watchdogs = []

    class Watchdog:
        stopped = False

        def stop(self):
            self.stopped = True

    import logging
    from sglang.srt.utils.watchdog import Watchdog as SoftWatchdog
    timeouts = []  # what SGLang's soft watchdog logs when nothing feeds it
    timeout_log = logging.Handler()
    timeout_log.emit = lambda record: timeouts.append(record.getMessage())
    logging.getLogger("sglang.srt.utils.watchdog").addHandler(timeout_log)

    def scheduler_fails_and_stays(self, **kw):
        # with --soft-watchdog-timeout, as SGLang's TokenizerManager makes it (a thread from here on). In SGLang's
        # order: the Engine gets its tokenizer manager only once the start-up wait returned, so here it is a local of
        # the start's frames alone (set on the Engine, it hid that a refused start left the soft watchdog running)
        self.tokenizer_manager = None
        tokenizer_manager = types.SimpleNamespace(_subprocess_watchdog=Watchdog(), soft_watchdog=SoftWatchdog.create(
            debug_name="TokenizerManager", watchdog_timeout=0.2, soft=True))
        watchdogs.append(tokenizer_manager._subprocess_watchdog)
        scheduler = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # it does not exit
        signal.signal(signal.SIGQUIT, kw["server_args"].custom_sigquit_handler)
        try:
            open(subprocess_entry.failure_mark(os.environ[REFUSAL_FILE_ENV], scheduler.pid), "w").close()  # its mark
            os.kill(os.getpid(), signal.SIGQUIT)
            os.kill(os.getpid(), signal.SIGQUIT)  # a second TP rank's
        except Exception as e:  # the start's code
            return handler_raised.append(repr(e))
        scheduler.wait(timeout=30)  # SGLang's start-up wait: until the scheduler is gone
        raise RuntimeError("Rank 0 scheduler died during initialization")

    handler_raised, passed_on = [], []
    signal.signal(signal.SIGQUIT, lambda signum, frame: passed_on.append(signum))  # the caller's, as if an Engine's
    sglang_engine.Engine.__init__ = scheduler_fails_and_stays
    t0 = time.monotonic()
    try:
        deft_engine.Engine(model_path=model, attention_backend="deft", grammar_backend="none")
    except RuntimeError as e:
        at_once = time.monotonic() - t0 < 10
        time.sleep(1.0)  # five soft-watchdog timeouts, none fed
        result["own_process_failed"] = {"error": str(e), "watchdog_stopped": watchdogs[-1].stopped,
                                        "soft_watchdog_timeouts": [m for m in timeouts if "watchdog timeout" in m],
                                        "passed_on": list(passed_on), "handler_raised": handler_raised,
                                        "at_once": at_once}
    # An unmarked SIGQUIT while the Engine starts: an earlier Engine's (its process's, whose start is over, or its
    # watchdog's, in this process), passed on to the handler it would have met, this start unharmed
    def unmarked_signal(self, **kw):
        signal.signal(signal.SIGQUIT, kw["server_args"].custom_sigquit_handler)
        os.kill(os.getpid(), signal.SIGQUIT)

    sglang_engine.Engine.__init__ = unmarked_signal
    deft_engine.Engine(model_path=model, attention_backend="deft", grammar_backend="none")
    result["other_engines_process_failed"] = {"passed_on": passed_on,
                                              "sigquit_after": signal.getsignal(signal.SIGQUIT).__name__}
    sglang_engine.Engine.__init__ = started
    import threading, time

    starts = []

    def slow_start(self, **kw):  # two Engines started from two threads: each with its own refusal file, in turn
        starts.append(("in", os.environ[REFUSAL_FILE_ENV]))
        time.sleep(0.3)
        starts.append(("out", os.environ[REFUSAL_FILE_ENV]))

    sglang_engine.Engine.__init__ = slow_start
    both = [threading.Thread(target=lambda: deft_engine.Engine(model_path=model, attention_backend="deft",
                                                              grammar_backend="none")) for _ in range(2)]
    [t.start() for t in both]
    [t.join() for t in both]
    result["concurrent_starts"] = starts
    sglang_engine.Engine.__init__ = started
    import logging, threading

    warned = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    deft_engine.logger.addHandler(handler)

    def launch_phase_sigquit_handler(signum, frame):  # named as SGLang's Engine's, which ends the process tree
        pass

    # SIGQUIT's default action, the handler a started deft Engine leaves, SGLang's Engine's: each ends the caller
    for ends_the_process in (signal.SIG_DFL, deft_engine._end_process_tree, launch_phase_sigquit_handler):
        signal.signal(signal.SIGQUIT, ends_the_process)
        worker = threading.Thread(target=lambda: deft_engine.Engine(model_path=model, attention_backend="deft",
                                                                    grammar_backend="none"))
        worker.start()
        worker.join()
    result["off_main_thread_warned"] = [w for w in warned if "off the main thread" in w]
    signal.signal(signal.SIGQUIT, lambda signum, frame: None)  # the caller's own handler: nothing to warn of
    worker = threading.Thread(target=lambda: deft_engine.Engine(model_path=model, attention_backend="deft",
                                                                grammar_backend="none"))
    worker.start()
    worker.join()
    result["warned_with_a_handler"] = len([w for w in warned if "off the main thread" in w]) - 3
    # custom_sigquit_handler off the main thread: SGLang installs it from the main thread only, so SIGQUIT's default
    # action stays, and the warning must not be left out for it
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    worker = threading.Thread(target=lambda: deft_engine.Engine(model_path=model, attention_backend="deft",
                                                                grammar_backend="none",
                                                                custom_sigquit_handler=lambda signum, frame: None))
    worker.start()
    worker.join()
    result["warned_with_a_custom_handler_argument"] = [w for w in warned if "off the main thread" in w][3:]
    result["thread_errors"] = thread_errors
    print("RESULT " + json.dumps(result))
""")


@pytest.fixture(scope="module")
def engine_args(tmp_path_factory):
    # A temporary directory of its own: it counts the refusal files there, which another process's Engine (a second
    # pytest) would add to.
    env = dict(os.environ, TMPDIR=str(tmp_path_factory.mktemp("engine_tmp")))
    return child_result(["-c", SCRIPT, str(MODEL), DEVICE, PREFILL], env=env)[0]


def test_the_import_chooses_the_device_and_sglangs_engine_for_it(engine_args):
    assert engine_args["import_device"] == DEVICE
    assert engine_args["cpu_engine"] == ("1" if DEVICE == "cpu" else None)


def test_the_first_engine_registers_deft(engine_args):
    assert not engine_args["registered_before"] and engine_args["registered_after"]


def test_attention_backend_deft_prefills_on_sglangs_backend_for_the_device(engine_args):
    split = engine_args["split"]
    assert (split["attention_backend"], split["decode_attention_backend"]) == (PREFILL, "deft")
    assert split["device"] == DEVICE
    assert split["log_level"] == "error"  # SGLang's Engine default, not ServerArgs' "info"


def test_decode_attention_backend_alone_gets_the_same_prefill_and_the_callers_log_level(engine_args):
    decode_only = engine_args["decode_only"]
    assert (decode_only["attention_backend"], decode_only["decode_attention_backend"]) == (PREFILL, "deft")
    assert decode_only["log_level"] == "info"


def test_a_callers_server_args_are_passed_on_as_given(engine_args):
    assert engine_args["own_args_passed_as_given"]


def test_a_subclass_gets_its_server_args_class(engine_args):
    """SGLang's Engine makes its ServerArgs by ``server_args_class``; deft's Engine made a plain ServerArgs."""
    assert engine_args["server_args_class"] == "TaggedArgs"


def test_a_started_engine_leaves_sigquit_to_sglangs_handling_and_nothing_of_its_start_behind(engine_args):
    """While it starts, a failing child only logs (the Engine raises its refusal); once started, SIGQUIT ends the
    process tree as SGLang's Engine has it; the refusal file and its variable are gone; a caller's own handler is
    used as given."""
    assert engine_args["started_state"] == {"handler_while_starting": True, "sigquit_after": True,
                                            "custom_handler_after": True, "refusal_env_after": None,
                                            "refusal_files_left": [], "callers_handler_kept": True}


def test_a_child_that_fails_unseen_by_sglangs_start_up_wait_is_raised(engine_args):
    """A detokenizer that failed while the Engine started signalled, exited 0, and the Engine came up without one:
    its first generate() would have hung."""
    assert "failed while it started" in engine_args.get("detokenizer_failed", "")
    assert engine_args["sigquit_after_failed_start"]


def test_a_failure_signalled_while_starting_ends_the_start_at_once_with_sglangs_watchdogs_stopped(engine_args):
    """Not once SGLang's start-up wait sees the failed scheduler exit: on the H100 a refused scheduler held the test
    below past 250 s (3801efa). The handler raises nothing (it could land in any `except` of the start's code); the
    watchdog, left polling, would signal the processes the failed start ends as failures."""
    failed = engine_args["own_process_failed"]
    # (SGLang's error, its scheduler's death by SIGKILL, blames the OOM killer: the cause, not the message)
    assert failed["at_once"] and failed["handler_raised"] == [] and "failed while it started" in failed["error"]
    assert failed["watchdog_stopped"] and failed["passed_on"] == []
    # SGLang's soft watchdog (--soft-watchdog-timeout) has no stop: active, it logged a timeout (and dumped the ended
    # schedulers' stacks) every 0.2 s from here on, in the caller's process
    assert failed["soft_watchdog_timeouts"] == []


def test_a_sigquit_from_another_engines_process_is_passed_on_and_this_engine_starts(engine_args):
    """An earlier Engine's process or watchdog signals once: taken as this start's failure, it blamed the wrong Engine
    and was lost to the earlier one."""
    other = engine_args["other_engines_process_failed"]
    assert other["passed_on"] == [3]  # SIGQUIT, to the handler it would have reached
    assert other["sigquit_after"] == "_end_process_tree"


def test_a_failed_start_is_forgotten_by_the_next_start(engine_args):
    assert engine_args["retry_started"]


def test_engines_started_off_the_main_thread_start(engine_args):
    """Their constructors raised nothing in their threads (no SIGQUIT handler is set there: it would raise)."""
    assert engine_args["thread_errors"] == []


def test_a_failed_start_leaves_no_refusal_file_behind(engine_args):
    """Nor the temporary file a TP rank writes its refusal to before renaming it, where the rank was ended first."""
    assert engine_args["refusal_files_left_after_failure"] == []


def test_engines_started_together_start_in_turn_each_with_its_own_refusal_file(engine_args):
    """The refusal file's variable and the children a failed start ends are the process's: two Engines starting at
    once from two threads took each other's (a failure of one ended the other's processes)."""
    (in1, path1), (out1, path1b), (in2, path2), (out2, path2b) = engine_args["concurrent_starts"]
    assert (in1, out1, in2, out2) == ("in", "out", "in", "out")
    assert path1 == path1b and path2 == path2b and path1 != path2


def test_an_engine_off_the_main_thread_warns_that_a_failing_child_ends_the_process(engine_args):
    """No SIGQUIT handler can be set there, and a refusal in the scheduler then ends the caller (exit 131)."""
    # under SIGQUIT's default action, after a deft Engine started on the main thread, after an SGLang Engine did
    assert len(engine_args["off_main_thread_warned"]) == 3
    assert engine_args["warned_with_a_handler"] == 0  # a handler of the caller's: SIGQUIT does not end it
    # a custom_sigquit_handler argument is never installed off the main thread: still warned, and said why
    [custom] = engine_args["warned_with_a_custom_handler_argument"]
    assert "installed from the main thread only" in custom


def test_unsupported_flags_are_refused_before_sglangs_engine_starts(engine_args):
    assert "--enable-torch-compile" in engine_args.get("refused", "")
    assert "tokenizer_worker_num=2 in an offline Engine" in engine_args.get("tokenizer_workers_refused", "")
    # the launcher refuses tokenizer workers on the CPU too: no advice to use it there
    assert ("sglang_deft.launch_server" in engine_args["tokenizer_workers_refused"]) == (
        engine_args["import_device"] != "cpu")
    assert engine_args["calls"] == 5  # the refused Engine never reached SGLang's constructor


def test_device_cpu_after_a_cuda_import_says_to_set_the_cpu_engine_first(engine_args):
    assert "SGLANG_USE_CPU_ENGINE=1 before importing" in engine_args.get("cpu_on_cuda", "")
    # the same in a caller's own ServerArgs, which skipped the check: SGLang then ran CUDA kernels on CPU tensors
    assert "SGLANG_USE_CPU_ENGINE=1 before importing" in engine_args.get("cpu_args_on_cuda", "")


def test_device_cuda_after_a_cpu_import_is_refused_by_name(engine_args):
    assert "device='cuda', but sglang_deft.Engine was imported for the CPU" in engine_args.get("cuda_on_cpu", "")
    assert "device='cuda', but sglang_deft.Engine was imported for the CPU" in engine_args.get("cuda_args_on_cpu", "")
    assert "device='xpu', but sglang_deft.Engine was imported for 'cpu'" in engine_args.get("xpu_on_cpu", "")
    assert engine_args["calls_at_end"] == 5


def test_the_readmes_engine_snippet_passes_what_this_test_passes(engine_args):
    """README.md's offline example: the same keywords as the first Engine above (which SGLang's ServerArgs
    took), its pool capped as given (on the CPU SGLang would size it from the free RAM)."""
    import ast

    text = (REPO / "README.md").read_text()
    block = text.split("from sglang_deft import Engine", 1)[1].split("```", 1)[0]
    call = next(n for n in ast.walk(ast.parse(textwrap.dedent(block))) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "Engine")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    assert kwargs == {"model_path": "models/tiny-llama-deft", "attention_backend": "deft", "grammar_backend": "none",
                      "max_total_tokens": 16384}
    assert engine_args["max_total_tokens"] == 16384


MARKS_ITS_SIGNALS = textwrap.dedent("""
    import os, signal, subprocess, sys, json, tempfile
    from sglang_deft.config_checks import REFUSAL_FILE_ENV
    from sglang_deft.subprocess_entry import failure_marks
    got = []
    signal.signal(signal.SIGQUIT, lambda signum, frame: got.append(signum))
    fd, path = tempfile.mkstemp(prefix="sglang_deft_refusal_")
    os.close(fd)
    # as a process the Engine spawns, which imports subprocess_entry while unpickling its arguments (SGLang's DP
    # controller, whose entry is not there, too)
    child = "import signal, psutil, sglang_deft.subprocess_entry; psutil.Process().parent().send_signal(signal.SIGQUIT)"
    marks = []
    for start_on in (True, False):  # while the Engine's start lasts (its refusal file there), then after it
        if not start_on:
            os.unlink(path)
        subprocess.run([sys.executable, "-c", child], env=dict(os.environ, **{REFUSAL_FILE_ENV: path}), check=True)
        marks.append(len(failure_marks(path)))
    [os.unlink(m) for m in failure_marks(path)]
    print("RESULT " + json.dumps({"marks": marks, "signals": len(got)}))
""")


def test_the_engines_processes_mark_the_failures_they_signal_while_it_starts():
    """SGLang's scheduler and detokenizer report a failure by SIGQUIT to their parent: during the start each leaves a
    marker beside the refusal file first, so that the Engine tells its own processes' signals from an earlier
    Engine's; after it, none (the file is gone), and the signal is sent either way."""
    result, _ = child_result(["-c", MARKS_ITS_SIGNALS], timeout=120)
    assert result == {"marks": [1, 1], "signals": 2}  # one marker, from the first; both signals arrived


REFUSED_IN_THE_SCHEDULER = textwrap.dedent("""
    import gc, json, signal, subprocess, sys, psutil, zmq
    from multiprocessing import resource_tracker
    from sglang_deft import Engine
    from sglang_deft.config_checks import UnsupportedConfiguration

    if __name__ == "__main__":  # SGLang's Engine spawns its scheduler process
        # a process of the caller's own: it must outlive the refusal (not holding the test's output pipes open)
        mine = subprocess.Popen(["sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            Engine(model_path=sys.argv[1], attention_backend="deft", grammar_backend="none", load_format="dummy",
                   max_total_tokens=1024, log_level="error")
        except UnsupportedConfiguration as e:
            tracker = resource_tracker._resource_tracker._pid  # started by the first spawn, kept for the next
            open_sockets = [s for s in gc.get_objects() if isinstance(s, zmq.Socket) and not s.closed]
            left = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in before | {tracker}]
            print("RESULT " + json.dumps({"problems": e.problems, "cause": type(e.__cause__).__name__, "left": left,
                                          "mine_alive": mine.poll() is None, "tracker_alive": psutil.pid_exists(tracker),
                                          "sigquit_default": signal.getsignal(signal.SIGQUIT) == signal.SIG_DFL,
                                          "mine": mine.pid, "open_zmq_sockets": len(open_sockets)}))
        # left running: SGLang's atexit shutdown, had it stayed registered, would end it as this process exits
""")


def test_a_model_refused_in_the_scheduler_raises_in_the_caller(tmp_path):
    """Head dims past 256 are refused by layer, in SGLang's scheduler process, which logs the error and sends its
    parent SIGQUIT: SGLang's handler then killed the whole process tree, the caller's process included (exit 137, a
    Jupyter kernel gone). Now the Engine raises the refusal and ends only the processes it started."""
    from tiny_models import with_config

    (tmp_path / "model").mkdir()
    model = with_config(tmp_path / "model", MODEL, head_dim=512)  # dummy weights: any shape loads
    script = tmp_path / "engine_refused.py"
    script.write_text(REFUSED_IN_THE_SCHEDULER)
    result, run = child_result([str(script), str(model)], cwd=tmp_path)
    assert any("head dim 512 is not supported" in p for p in result["problems"]), result
    # SGLang's start-up error (its scheduler gone: ended on its signal); none of the Engine's processes left
    assert result["cause"] == "RuntimeError" and result["left"] == [], result
    # ... but what the caller had, and multiprocessing's resource tracker, which a retry reuses; SIGQUIT as it was;
    # SGLang's atexit shutdown (it ends every child of the caller at exit) unregistered
    assert result["mine_alive"] and result["tracker_alive"] and result["sigquit_default"]
    # SGLang's tokenizer manager's sockets closed: their context's finalizer would wait for what they queued
    assert result["open_zmq_sockets"] == 0, result
    import psutil

    mine = psutil.Process(result["mine"])
    try:
        assert mine.status() != psutil.STATUS_ZOMBIE and "sleep" in mine.name()
    finally:
        mine.kill()
    assert "Using custom SIGQUIT handler" not in run.stderr


def test_a_failed_starts_sockets_are_closed_so_that_collecting_them_does_not_hang(tmp_path):
    """SGLang's tokenizer manager, made in the caller before the start-up wait, is in a reference cycle with its bound
    sockets. Left to a garbage collection, its context's finalizer ran with the weak set of sockets already cleared,
    closed none and waited for them forever (this holder, unclosed, hung gc.collect() 3 times in 3). The Engine finds
    the sockets through the failed start's frames and closes them first."""
    import gc
    import threading

    import zmq
    import zmq.asyncio

    from sglang_deft import engine

    class TokenizerManagerLike:
        def __init__(self):
            context = zmq.asyncio.Context(2)
            self.recv_from_detokenizer = context.socket(zmq.PULL)
            self.recv_from_detokenizer.bind(f"ipc://{tmp_path}/tokenizer")
            self.send_to_scheduler = context.socket(zmq.PUSH)
            self.send_to_scheduler.bind(f"ipc://{tmp_path}/scheduler")
            self.dispatch = self.handle  # the cycle

        def handle(self):
            pass

    def start():
        tokenizer_manager = TokenizerManagerLike()
        raise RuntimeError(f"the scheduler died ({tokenizer_manager})")

    with pytest.raises(RuntimeError) as failed:
        start()
    sockets = engine._sockets_in(engine._left_by(None, failed.value))
    assert len(sockets) == 2
    engine._close_sockets(sockets)
    assert all(s.closed for s in sockets) and sockets[0].context.closed
    del failed, sockets
    collecting = threading.Thread(target=gc.collect, daemon=True)
    collecting.start()
    collecting.join(timeout=30)
    assert not collecting.is_alive()


FAILS_IN_THE_TOKENIZER_MANAGER = textwrap.dedent("""
    import gc, json, sys, threading, zmq
    from sglang_deft import Engine

    if __name__ == "__main__":
        try:
            Engine(model_path=sys.argv[1], attention_backend="deft", grammar_backend="none", load_format="dummy",
                   max_total_tokens=1024, log_level="error", chat_template="no-such-template")
        except Exception as e:
            error = type(e).__name__
        open_sockets = sum(isinstance(s, zmq.Socket) and not s.closed for s in gc.get_objects())
        collecting = threading.Thread(target=gc.collect, daemon=True)
        collecting.start()
        collecting.join(timeout=60)
        print("RESULT " + json.dumps({"error": error, "open_sockets": open_sockets,
                                      "collected": not collecting.is_alive()}))
""")


def test_a_start_failing_as_sglang_makes_its_tokenizer_manager_leaves_no_socket_open(tmp_path):
    """A chat template SGLang does not know fails the start after the tokenizer manager opened its sockets, inside
    the call that makes it: they are closed too, and a garbage collection afterwards returns."""
    script = tmp_path / "engine_bad_template.py"
    script.write_text(FAILS_IN_THE_TOKENIZER_MANAGER)
    result, _ = child_result([str(script), str(MODEL)], cwd=tmp_path)
    assert result == {"error": result["error"], "open_sockets": 0, "collected": True}, result


RACE_SCRIPT = textwrap.dedent("""
    import inspect, json, os, signal, sys
    import sglang_deft.engine as deft_engine
    import sglang.srt.entrypoints.engine as sglang_engine
    from sglang_deft import subprocess_entry
    from sglang_deft.config_checks import REFUSAL_FILE_ENV

    def started(self, **kw):  # SGLang's start returns, with the handler set as SGLang sets it
        signal.signal(signal.SIGQUIT, kw["server_args"].custom_sigquit_handler)

    sglang_engine.Engine.__init__ = started
    body = deft_engine._refusals_raised.__wrapped__
    lines, first = inspect.getsourcelines(body)
    switch = first + next(i for i, text in enumerate(lines) if "signal.signal(signal.SIGQUIT, _end_process_tree)" in text)
    fired = []

    def tracer(frame, event, arg):
        if frame.f_code is not body.__code__:
            return None

        def local(frame, event, arg):  # a process of the Engine fails just before the start hands SIGQUIT on
            if event == "line" and frame.f_lineno == switch and not fired:
                fired.append(True)
                open(subprocess_entry.failure_mark(os.environ[REFUSAL_FILE_ENV], 999998), "w").close()
                os.kill(os.getpid(), signal.SIGQUIT)
            return local
        return local

    sys.settrace(tracer)
    try:
        deft_engine.Engine(model_path=sys.argv[1], attention_backend="deft", grammar_backend="none")
        outcome = "started"
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    sys.settrace(None)
    print("RESULT " + json.dumps({"fired": bool(fired), "outcome": outcome}))
""")


def test_a_failure_signalled_as_the_start_returns_is_raised(tmp_path):
    """The start asked whether a process had failed, then handed SIGQUIT on: a failure signalled between the two was
    ended by the start's handler (the Engine's processes killed) and the Engine returned as started, dead."""
    result, _ = child_result(["-c", RACE_SCRIPT, str(MODEL)], env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert result["fired"] and "failed while it started" in result["outcome"], result
