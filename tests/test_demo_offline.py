"""The demo's parts that need no server: the launcher arguments, the device choice, the sharing
summary over two snapshots of a server log, and the end of main() (tests/test_examples.py runs the
demo against a real server)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from sglang_deft import demo
from sglang_deft.sharing_metrics import SharingMeter


def log_of(steps: list[tuple[int, int]], interval: int, meter: SharingMeter | None = None):
    """(log text, meter): the lines a backend's meter logs for these (attended, unique) steps."""
    import logging

    meter = meter or SharingMeter(interval=interval)
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(f"[2026-12-01 04:14:28 TP0] {record.getMessage()}\n")
    logger = logging.getLogger("sglang_deft.sharing_metrics")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for attended, unique in steps:
            meter.record(attended, unique)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return "".join(lines), meter


def test_sharing_summary_counts_only_the_program_between_the_snapshots():
    # Before the program: 3 steps of another client, logged every step.
    before, meter = log_of([(100, 100), (300, 100), (50, 50)], interval=1)
    during, _ = log_of([(400, 100), (900, 100), (30, 10), (40, 40)], interval=1, meter=meter)
    # The meter formats the window's counts, the summary takes the running totals' difference.
    s = demo.sharing_summary(before, before + "unrelated line\n" + during)
    assert (s["lines"], s["steps"], s["attended_kv_tokens"], s["unique_kv_tokens"]) == (4, 4, 1370, 250)
    assert s["ratio"] == pytest.approx(1370 / 250)
    assert (s["peak_ratio"], s["peak_attended_kv_tokens"], s["peak_unique_kv_tokens"]) == (9.0, 900, 100)


def test_sharing_summary_from_the_server_start_and_without_new_lines():
    log, _ = log_of([(400, 100), (200, 100)], interval=2)  # one line for both steps
    s = demo.sharing_summary("", log)
    assert (s["lines"], s["steps"], s["attended_kv_tokens"], s["unique_kv_tokens"]) == (1, 2, 600, 200)
    assert s["ratio"] == 3.0 and s["peak_ratio"] == 3.0
    assert demo.sharing_summary(log, log) is None  # nothing logged during the program


def test_sharing_summary_ignores_a_half_written_last_line_and_sums_dp_ranks():
    log, meter = log_of([(400, 100)], interval=1)
    partial, _ = log_of([(900, 100)], interval=1, meter=meter)
    cut = partial[:partial.rindex("=") + 2]  # inside the last number: a wrong total if it were read
    s = demo.sharing_summary("", log + cut)
    assert (s["lines"], s["steps"], s["attended_kv_tokens"], s["unique_kv_tokens"]) == (1, 1, 400, 100)
    # Two DP ranks' schedulers, each with its own running totals, interleaved in one log.
    rank0, m0 = log_of([(400, 100)], interval=1)
    rank1, m1 = log_of([(30, 10)], interval=1)
    more0, _ = log_of([(200, 100)], interval=1, meter=m0)
    more1, _ = log_of([(60, 20)], interval=1, meter=m1)
    dp = lambda text, rank: "".join(f"[2026-01-01 00:00:00 DP{rank} TP0] {x}\n" for x in text.splitlines())  # noqa: E731
    before = dp(rank0, 0) + dp(rank1, 1)
    s = demo.sharing_summary(before, before + dp(more1, 1) + dp(more0, 0))
    assert (s["steps"], s["attended_kv_tokens"], s["unique_kv_tokens"]) == (2, 260, 120)


def test_print_sharing_reports_the_summary_or_its_absence(capsys):
    demo.print_sharing(None)
    assert "no 'DeFT decode sharing' line was logged" in capsys.readouterr().out
    demo.print_sharing({"steps": 4, "attended_kv_tokens": 1370, "unique_kv_tokens": 250, "ratio": 5.48,
                        "peak_ratio": 9.0, "peak_attended_kv_tokens": 900, "peak_unique_kv_tokens": 100})
    out = capsys.readouterr().out
    assert "over the program's 4 decode steps" in out and "1370" in out and "5.48x" in out
    assert "9.00x (900 attended / 100 unique)" in out


@pytest.mark.parametrize("force_cpu, cuda, cpu_engine, gpu", [(True, True, None, False), (False, True, None, True),
                                                         (False, False, None, False), (False, True, "1", False)])
def test_the_demo_uses_the_gpu_when_there_is_one_unless_told_otherwise(monkeypatch, force_cpu, cuda, cpu_engine, gpu):
    """SGLANG_USE_CPU_ENGINE=1 puts the launcher on the CPU: the demo's GPU flags (triton prefill) were refused there."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if cpu_engine is None:
        monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    else:
        monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", cpu_engine)
    assert demo.use_gpu(force_cpu) is gpu


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_server_args_pick_the_prefill_backend_of_the_device(gpu, tmp_path):
    args = demo.server_args(tmp_path, gpu, ["--max-running-requests", "4"])
    flag = lambda name: args[args.index(name) + 1]  # noqa: E731
    assert flag("--model-path") == str(tmp_path) and flag("--decode-attention-backend") == "deft"
    assert flag("--attention-backend") == ("triton" if gpu else "torch_native")
    assert ("--device" in args) is (not gpu) and ("--dtype" in args) is (not gpu)
    if not gpu:
        assert (flag("--device"), flag("--dtype")) == ("cpu", "float32")
    assert flag("--decode-log-interval") == "1"  # the summary needs a line per step
    assert args[-2:] == ["--max-running-requests", "4"]  # the user's arguments last: they win


class FakeServer:
    """ServerProcess's surface as main() uses it; ``fail`` makes wait_ready raise it."""

    def __init__(self, fail=None, **info):
        self.fail, self.stopped, self.info = fail, False, info
        self.url, self.command, self.proc = "http://127.0.0.1:1", ["launcher"], SimpleNamespace(pid=1)

    def __call__(self, name, args, log_path, port=None):
        self.args, self.log_path, self.port = args, log_path, port
        log_path.write_text("server log\n")
        return self

    def wait_ready(self, timeout_s, on_poll=None):
        if self.fail:
            raise self.fail
        return 0.5

    def log(self):
        return self.log_path.read_text()

    def server_info(self):
        """What SGLang's /server_info says of the arguments: the last of each flag, unless ``info`` says otherwise."""
        flags = {name: self.args[len(self.args) - 1 - self.args[::-1].index(f"--{name.replace('_', '-')}") + 1]
                 for name in ("model_path", "device", "dtype", "attention_backend", "decode_attention_backend")}
        return {**flags, "prefill_attention_backend": None, **self.info}

    def stop(self):
        self.stopped = True


@pytest.mark.parametrize("outcome, argv, code, log_kept", [
    ("ok", [], 0, False),
    ("ok", ["--keep-log"], 0, True),
    ("interrupted", [], 130, True),
    ("error", [], 1, True),
    ("reset", [], 1, True),  # the server died mid-reply: a traceback before
])
def test_main_stops_the_server_and_keeps_the_log_only_when_asked_or_failed(monkeypatch, capsys, tmp_path, outcome,
                                                                         argv, code, log_kept):
    monkeypatch.setattr(demo.tempfile, "tempdir", str(tmp_path))  # a kept log stays in pytest's tmp_path
    fail = {"ok": None, "interrupted": KeyboardInterrupt(), "error": TimeoutError("not ready"),
            "reset": ConnectionResetError("not ready: connection reset by peer")}[outcome]
    server = FakeServer(fail)
    monkeypatch.setattr(demo, "ServerProcess", server)
    ran = {}
    monkeypatch.setattr(demo, "run_demo", lambda url, widths, max_tokens, read_log, random_model: ran.update(
        random_model=random_model))
    monkeypatch.setattr(demo.signal, "signal", lambda *a: None)  # leave pytest's handlers alone
    if outcome == "interrupted":  # Ctrl-C: 130, as a shell reports it (it was 1, a failure's)
        with pytest.raises(SystemExit) as exit_:
            demo.main(["--cpu", "--port", "1234", *argv])
        assert exit_.value.code == code
    else:
        assert demo.main(["--cpu", "--port", "1234", *argv]) == code
    assert server.stopped and server.port == 1234
    assert server.args[server.args.index("--attention-backend") + 1] == "torch_native"
    assert server.log_path.parent.exists() is log_kept
    out = capsys.readouterr().out
    assert ("[demo] not ready" in out) is (outcome in ("error", "reset"))  # the reason, not a traceback
    assert ("server log kept at" in out) is log_kept
    assert ("server log removed (--keep-log keeps it)" in out) is not log_kept
    assert "starting SGLang with the bundled tiny Llama" in out
    assert ran == ({"random_model": True} if outcome == "ok" else {})


def test_a_server_that_stops_answering_mid_program_is_reported_as_such(monkeypatch, capsys, tmp_path):
    """The examples' connect() exits with advice to start a server ("or `make demo`"), wrong inside the demo."""
    monkeypatch.setattr(demo.tempfile, "tempdir", str(tmp_path))
    server = FakeServer()
    monkeypatch.setattr(demo, "ServerProcess", server)

    def run_demo(*args, **kwargs):
        raise SystemExit("no SGLang server answers at http://127.0.0.1:1 (refused)")

    monkeypatch.setattr(demo, "run_demo", run_demo)
    monkeypatch.setattr(demo.signal, "signal", lambda *a: None)
    assert demo.main(["--cpu"]) == 1
    assert server.stopped
    assert "[demo] the server stopped answering: no SGLang server answers" in capsys.readouterr().out


def test_a_signal_stops_the_server_and_exits_as_signalled(monkeypatch, capsys, tmp_path):
    """SIGTERM (a `kill`, CI cancelling the job) or SIGHUP (a closed terminal) was caught as the examples' SystemExit:
    "the server stopped answering: 143" and exit 1, so a caller could not tell a killed demo from a failed one."""
    monkeypatch.setattr(demo.tempfile, "tempdir", str(tmp_path))
    server = FakeServer()
    monkeypatch.setattr(demo, "ServerProcess", server)

    def run_demo(*args, **kwargs):
        demo._raise_on_sigterm(demo.signal.SIGTERM, None)

    monkeypatch.setattr(demo, "run_demo", run_demo)
    monkeypatch.setattr(demo.signal, "signal", lambda *a: None)
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--cpu"])
    assert exit_.value.code == 128 + demo.signal.SIGTERM and server.stopped
    out = capsys.readouterr().out
    assert "[demo] stopped by signal 15 (SIGTERM)" in out and "stopped answering" not in out
    assert "server log kept at" in out


@pytest.mark.parametrize("outcome", ["ok", "error", "no_start"])
def test_main_gives_the_callers_signal_handlers_back(monkeypatch, tmp_path, outcome):
    """main() called from Python left SIGTERM and SIGHUP raising the demo's Signalled in the caller afterwards."""
    monkeypatch.setattr(demo.tempfile, "tempdir", str(tmp_path))
    handlers = {signum: f"caller's {signum}" for signum in (demo.signal.SIGINT, demo.signal.SIGTERM)}
    handlers[demo.signal.SIGHUP] = None  # a handler not set from Python: its default comes back
    before = {**handlers, demo.signal.SIGHUP: demo.signal.SIG_DFL}

    def fake_signal(signum, handler):
        old, handlers[signum] = handlers[signum], handler
        return old

    monkeypatch.setattr(demo.signal, "signal", fake_signal)
    def no_launcher(*a, **kw):
        raise OSError("no launcher")

    server = no_launcher if outcome == "no_start" else FakeServer(TimeoutError("not ready") if outcome == "error"
                                                                  else None)
    monkeypatch.setattr(demo, "ServerProcess", server)
    monkeypatch.setattr(demo, "run_demo", lambda *a, **kw: None)
    assert demo.main(["--cpu"]) == (0 if outcome == "ok" else 1)
    assert handlers == before


def test_main_names_the_model_it_was_given(monkeypatch, capsys, tmp_path):
    """--model-path: the start line names that model, and the answers are not called random."""
    monkeypatch.setattr(demo.tempfile, "tempdir", str(tmp_path))
    server, ran = FakeServer(), {}
    monkeypatch.setattr(demo, "ServerProcess", server)
    monkeypatch.setattr(demo, "run_demo", lambda url, widths, max_tokens, read_log, random_model: ran.update(
        random_model=random_model))
    monkeypatch.setattr(demo.signal, "signal", lambda *a: None)
    (tmp_path / "my-model").mkdir()  # (an absolute path that does not exist is refused before the start)
    assert demo.main(["--cpu", "--model-path", str(tmp_path / "my-model")]) == 0
    assert server.args[server.args.index("--model-path") + 1] == str(tmp_path / "my-model")
    out = capsys.readouterr().out
    assert f"starting SGLang with model {tmp_path / 'my-model'}" in out and "tiny Llama" not in out
    assert ran == {"random_model": False}


def test_main_reports_what_the_server_runs_and_refuses_a_server_without_deft(monkeypatch, capsys, tmp_path):
    """Arguments after -- may change the demo's: its description of the server and whether it calls the answers
    random come from the server's /server_info, and a server that does not decode with deft shows nothing of it."""
    monkeypatch.setattr(demo.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(demo.signal, "signal", lambda *a: None)
    ran = {}
    monkeypatch.setattr(demo, "run_demo", lambda url, widths, max_tokens, read_log, random_model: ran.update(
        random_model=random_model))
    server = FakeServer()
    monkeypatch.setattr(demo, "ServerProcess", server)
    assert demo.main(["--cpu", "--", "--model-path", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"then the arguments after --: --model-path {tmp_path}" in out
    assert f"serving {tmp_path} on cpu in float32: prefill/extend on torch_native, decode on deft" in out
    assert ran == {"random_model": False}
    ran.clear()
    # (a decode backend after -- is refused before the start; a --config file may still change it)
    monkeypatch.setattr(demo, "ServerProcess", FakeServer(decode_attention_backend="torch_native"))
    assert demo.main(["--cpu", "--", "--config", str(tmp_path / "c.yaml")]) == 1
    out = capsys.readouterr().out
    assert "decode on torch_native" in out and "the server does not decode with deft" in out and ran == {}


def test_startup_progress_reads_the_last_rewrite_of_a_progress_line_and_its_limits():
    """A progress bar's \\r rewrites are one line in the log: the last rewrite is what it says. The
    heartbeat comes at exactly ``heartbeat_s`` of silence; a text of exactly ``width`` is not cut."""
    p = demo.StartupProgress(heartbeat_s=10, width=24)
    log = "Capturing batches (bs=4):\rLoading 3/3\r[2026-12-01 04:14:28] Load weight end. ok\n"
    assert p.update(log, 1.0) == ["server +1 s: Load weight end. ok"]
    assert p.update(log, 10.9) == []
    assert p.update(log, 11.0) == ["still starting after 11 s; the server log's last line: [2026-12-01 04:14:28]..."]
    log += "Capturing batches 8/36\rCapturing batches 9/36\n"
    assert p.update(log, 21.0) == ["still starting after 21 s; the server log's last line: Capturing batches 9/36"]
    p.width = len("Capturing batches 9/36")
    assert p.update(log, 31.0) == ["still starting after 31 s; the server log's last line: Capturing batches 9/36"]
    # A Python warning prints its message, then its source line: the message is the last line worth showing.
    p.width = 150
    log += "/x/y.py:3: UserWarning: no Triton here\n  warnings.warn(\n"
    assert p.update(log, 41.0) == ["still starting after 41 s; the server log's last line: /x/y.py:3: UserWarning: "
                                   "no Triton here"]


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port 70000: a TCP port is 1-65535"),
    (["--port", "-3"], "--port -3: a TCP port is 1-65535"),
    (["--timeout", "0"], "--timeout 0.0: seconds to wait for the server"),
    (["--model-path", "/nonexistent/model"], "--model-path /nonexistent/model: no such directory"),
    (["--", "--decode-log-interval", "40"], "--decode-log-interval after --: the demo sets --decode-log-interval 1"),
    (["--", "--log-level=warning"], "--log-level after --: the demo sets --log-level info"),
    # argparse takes an unambiguous abbreviation: SGLang's parser read this one as --decode-log-interval 40
    (["--", "--decode-log", "40"], "--decode-log-interval after --: the demo sets --decode-log-interval 1"),
    (["--", "--decode-l=40"], "--decode-log-interval after --: the demo sets --decode-log-interval 1"),
    # the server moved off 127.0.0.1: the demo waited for it there until --timeout
    (["--", "--host", "::1"], "--host after --: the demo's server listens on 127.0.0.1"),
    (["--", "--ho=0.0.0.0"], "--host after --: the demo's server listens on 127.0.0.1"),
    # overridden by the port ServerProcess appends, without a word
    (["--", "--port", "40000"], "--port after --: the demo's own --port (before --)"),
    (["--", "--po=40000"], "--port after --: the demo's own --port (before --)"),
    # a word before -- went to the launcher, whose parser refused it in the server's log
    (["extra"], "unrecognized arguments: extra (the launcher's arguments go after --)"),
    (["--widths", "2,2", "extra", "--", "--max-running-requests", "4"],
     "unrecognized arguments: extra (the launcher's arguments go after --)"),
    # refused only after the server's start (~10 s on the CPU)
    (["--", "--decode-attention-backend", "torch_native"],
     "--decode-attention-backend torch_native after --: the demo shows deft's decode"),
    (["--", "--decode-a=triton", "--decode-attention-backend", "deft"],
     "--decode-attention-backend triton after --: the demo shows deft's decode"),
])
def test_main_refuses_arguments_it_cannot_run_with_before_starting_anything(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(demo, "ServerProcess", lambda *a, **k: pytest.fail("a server was started"))
    with pytest.raises(SystemExit) as e:
        demo.main(["--cpu", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--decode-attention-backend", "deft"], ["--decode-a=deft"]],
                         ids=["deft", "deft-abbreviated"])
def test_a_decode_backend_after_dashes_that_keeps_deft_starts_the_server(monkeypatch, tmp_path, argv):
    monkeypatch.setattr(demo.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(demo.signal, "signal", lambda *a: None)
    monkeypatch.setattr(demo, "run_demo", lambda *a, **kw: None)
    server = FakeServer(decode_attention_backend="deft")
    monkeypatch.setattr(demo, "ServerProcess", server)
    assert demo.main(["--cpu", "--", *argv]) == 0
    assert server.args[-len(argv):] == argv


def test_the_program_reaches_its_server_past_a_proxy_and_the_environment_is_given_back(monkeypatch, tmp_path):
    """sglang.lang's requests (in the demo's process) went to http_proxy's proxy, as ServerProcess's did."""
    monkeypatch.setattr(demo.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(demo.signal, "signal", lambda *a: None)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("no_proxy", "corp.example")
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.delenv("NO_PROXY")  # (recorded by the setenv: taken back after the test whatever main leaves)
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda *a, **kw: seen.update(
        {key: demo.os.environ.get(key) for key in ("no_proxy", "NO_PROXY")}))
    monkeypatch.setattr(demo, "ServerProcess", FakeServer())
    assert demo.main(["--cpu"]) == 0
    assert seen == {"no_proxy": "corp.example,127.0.0.1,localhost", "NO_PROXY": "corp.example,127.0.0.1,localhost"}
    assert demo.os.environ["no_proxy"] == "corp.example" and "NO_PROXY" not in demo.os.environ
    monkeypatch.setenv("no_proxy", "*")  # every host already: left as it is (the merge raised KeyError on it)
    assert demo.main(["--cpu"]) == 0
    assert seen == {"no_proxy": "*", "NO_PROXY": None} and demo.os.environ["no_proxy"] == "*"


def test_flag_values_reads_both_spellings_and_a_missing_value():
    """(A missing value is SGLang's parser's to refuse, in the server's log; the demo lets it through.)"""
    args = ["--decode-a=triton", "--x", "--decode-attention-backend", "deft", "--decode-attention-backend"]
    assert demo.flag_values(args, demo.DECODE_BACKEND) == ["triton", "deft", None]


@pytest.mark.parametrize("arg", ["--decode", "--decode-", "--log-level-http", "--log-lev",
                                 "--log-requests", "--dec=3", "--h", "--p", "--port-x", "--hostname"])
def test_other_flags_are_not_taken_for_the_demos_own_flags(arg):
    """Words that are other SGLang options, or ambiguous prefixes its parser refuses itself."""
    assert not any(demo.names_flag(arg, flag) for flag in demo.SHORTEST)


def test_a_signal_the_caller_ignores_stays_ignored(monkeypatch, tmp_path):
    """Under nohup (SIGHUP ignored) the demo set its own handler, and a closed terminal stopped it (exit 129)."""
    monkeypatch.setattr(demo.tempfile, "tempdir", str(tmp_path))
    handlers = {demo.signal.SIGTERM: demo.signal.SIG_DFL, demo.signal.SIGHUP: demo.signal.SIG_IGN}
    seen = {}
    real_signal, real_getsignal = demo.signal.signal, demo.signal.getsignal  # (pytest's own signals pass through)

    def fake_signal(signum, handler):
        if signum not in handlers:
            return real_signal(signum, handler)
        old, handlers[signum] = handlers[signum], handler
        seen.setdefault(signum, []).append(handler)
        return old

    monkeypatch.setattr(demo.signal, "signal", fake_signal)
    monkeypatch.setattr(demo.signal, "getsignal", lambda signum: handlers.get(signum) or real_getsignal(signum))
    monkeypatch.setattr(demo, "ServerProcess", FakeServer())
    monkeypatch.setattr(demo, "run_demo", lambda *a, **kw: None)
    assert demo.main(["--cpu"]) == 0
    # (the server's stop ignores both while it runs, then gives back what was there)
    assert demo._raise_on_sigterm not in seen[demo.signal.SIGHUP]
    assert demo._raise_on_sigterm in seen[demo.signal.SIGTERM]
    assert handlers == {demo.signal.SIGTERM: demo.signal.SIG_DFL, demo.signal.SIGHUP: demo.signal.SIG_IGN}


def test_main_reports_a_port_in_use_and_leaves_no_log_dir(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(demo.tempfile, "tempdir", str(tmp_path))

    def in_use(*args, **kwargs):
        raise RuntimeError("port 1234 is in use (another server?)")

    monkeypatch.setattr(demo, "ServerProcess", in_use)
    monkeypatch.setattr(demo.signal, "signal", lambda *a: None)
    assert demo.main(["--cpu", "--port", "1234"]) == 1
    assert "could not start the server: port 1234 is in use" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("lines_out", [0, 1, 3, 5, 6])
def test_main_stops_the_server_when_stdout_is_a_closed_pipe(monkeypatch, tmp_path, lines_out):
    """``make demo | head -2``: once head exits every print raises; a started server must be stopped anyway,
    whichever print is the first to fail."""
    monkeypatch.setattr(demo.tempfile, "tempdir", str(tmp_path))
    server = FakeServer()
    monkeypatch.setattr(demo, "ServerProcess", server)
    monkeypatch.setattr(demo.signal, "signal", lambda *a: None)

    def broken_pipe(url, widths, max_tokens, read_log, random_model):
        demo.say("a line")  # what run_demo prints first
        return {}

    printed = []

    def print_to_closed_pipe(*args, **kwargs):
        printed.append(args)
        if len(printed) > lines_out:  # the first lines went out before head exited
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(demo, "run_demo", broken_pipe)
    monkeypatch.setattr("builtins.print", print_to_closed_pipe)
    with pytest.raises(BrokenPipeError):
        demo.main(["--cpu"])
    started = hasattr(server, "args")  # the first line is printed before the server starts
    assert started is (lines_out > 0) and server.stopped is started
    # No line could say where a kept log is: it was left behind, unnamed (and an empty folder when the first line failed).
    assert list(tmp_path.iterdir()) == []


def test_the_command_ends_without_a_traceback_when_stdout_is_closed(monkeypatch, capfd):
    """``make demo | head``: python -m sglang_deft.demo printed BrokenPipeError's traceback, exit 1."""
    def closed(argv=None):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(demo, "main", closed)
    monkeypatch.setattr(demo.os, "dup2", lambda fd, fd2: None)  # pytest's captured stdout stays as it is
    assert demo.command_line() == 1
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("path", ["models/tiny-llama-deftt", "./models/typo", "../tiny"])
def test_a_missing_local_model_path_is_refused_before_the_server_starts(monkeypatch, capsys, tmp_path, path):
    """Only an absolute path was checked: a typo of the bundled model's relative path started the server, which ended
    ~40 s later with transformers' traceback about hub repo ids inside the server log's dump."""
    (tmp_path / "work" / "models").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setattr(demo, "ServerProcess", lambda *a, **k: pytest.fail("a server was started"))
    with pytest.raises(SystemExit) as e:
        demo.main(["--cpu", "--model-path", path])
    assert e.value.code == 2 and f"--model-path {path.removeprefix('./')}: no such directory" in capsys.readouterr().err


def test_a_hub_id_is_left_to_sglang(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not demo.looks_local(demo.Path("meta-llama/Llama-3.1-8B-Instruct"))  # no meta-llama directory here
    assert demo.looks_local(demo.Path("/abs/model")) and demo.looks_local(demo.Path("../up"))
