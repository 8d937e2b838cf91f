"""`python -m sglang_deft.demo` (`make demo`): the tree-of-thought example on a deft server.

Starts ``python -m sglang_deft.launch_server`` with the bundled tiny Llama
(``models/tiny-llama-deft``) and ``--decode-attention-backend deft`` -- on the GPU when there is one and
``SGLANG_USE_CPU_ENGINE=1`` is not set (``server_setup.default_device``; prefill/extend: ``triton``; sampling:
``pytorch``), else on the CPU (prefill/extend:
``torch_native``, float32) -- waits until it answers, runs ``examples/tree_of_thought.py``
against it, prints the tree, the answers and the sharing metrics the deft backend logged (KV tokens
attended per request summed vs unique KV tokens read), and shuts the server down. The server runs
in its own process group, which is killed on every way out: normal exit, an exception, Ctrl-C or
SIGTERM.

The model is random (seeded, see scripts/make_tiny_model.py): its text is meaningless. What the
demo shows is the tree of forks and how much KV the decode steps shared.

Options: ``--cpu`` forces the CPU, ``--widths 3,2,2`` changes the tree, ``--max-tokens``, ``--model-path``
(another model; the bundled one by default), ``--port``, ``--timeout`` (seconds to wait for the server),
``--show-server-log``, ``--keep-log``; arguments after ``--`` go to the launcher.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

from sglang_deft.server_process import NO_PROXY_KEYS, ServerProcess, with_local_hosts_unproxied

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "models" / "tiny-llama-deft"
EXAMPLES_DIR = REPO / "examples"


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def say_if_possible(msg: str) -> None:
    """``say`` where nothing may stop what follows: stdout may be a closed pipe (``make demo | head``) or a
    hung-up terminal, and the print then raises."""
    try:
        say(msg)
    except OSError:
        pass


# The demo reads the sharing lines from the log: one per decode step, at info level.
DEMO_LOGGING = {"--decode-log-interval": "1", "--log-level": "info"}
# The shortest spelling of each that SGLang 0.5.10's parser takes for it (argparse accepts any unambiguous
# abbreviation: "--decode-l" is no other option's, while any "--log-level" shorter than itself is also
# "--log-level-http"'s).
DEMO_LOGGING_SHORTEST = {"--decode-log-interval": "--decode-l", "--log-level": "--log-level"}
# Where the demo reaches its server, set by it too: after --, --host moved the server off 127.0.0.1, where the demo
# kept waiting for it until --timeout, and --port was overridden by the port ServerProcess appends. (Their shortest
# spellings: "--h" is also "--help"'s, "--p" many options'.)
DEMO_ADDRESS = {"--host": "the demo's server listens on 127.0.0.1, where the demo waits for it and sends its program",
                "--port": "the demo's own --port (before --) picks the server's port"}
# The demo shows deft's decode: another decode backend after -- was refused only once the server had started (~10 s
# on the CPU). ("--decode-" is also --decode-log-interval's.)
DECODE_BACKEND = "--decode-attention-backend"
SHORTEST = {**DEMO_LOGGING_SHORTEST, "--host": "--ho", "--port": "--po", DECODE_BACKEND: "--decode-a"}
# Every flag the demo refuses after --, and why.
REFUSED_AFTER_DASHES = {**{flag: f"the demo sets {flag} {value}, as it reads the server's per-step sharing lines from "
                                 "its log" for flag, value in DEMO_LOGGING.items()}, **DEMO_ADDRESS}


def names_flag(arg: str, flag: str) -> bool:
    """Whether the command-line word ``arg`` gives SGLang's ``flag`` (also abbreviated, also as ``--flag=value``)."""
    option = arg.split("=", 1)[0]
    return flag.startswith(option) and option.startswith(SHORTEST[flag])


def flag_values(args: list[str], flag: str) -> list[str | None]:
    """The values ``args`` give SGLang's ``flag`` (None: the flag ends the list, SGLang's parser refuses it)."""
    return [a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else None)
            for i, a in enumerate(args) if names_flag(a, flag)]


def use_gpu(force_cpu: bool) -> bool:
    """Whether the launcher will run on the GPU: its choice without ``--device`` (the demo's GPU flags would
    be refused on the CPU, e.g. under SGLANG_USE_CPU_ENGINE=1)."""
    from sglang_deft.server_setup import default_device

    return not force_cpu and default_device() == "cuda"


def server_args(model: Path, gpu: bool, extra: list[str] = ()) -> list[str]:
    """The launcher's arguments (ServerProcess adds the port)."""
    args = [
        "--model-path", str(model),
        "--host", "127.0.0.1",
        "--decode-attention-backend", "deft",
        "--grammar-backend", "none",   # no constrained decoding here; xgrammar may be absent
        "--random-seed", "0",
        "--max-total-tokens", "16384",  # the tiny model needs little KV; don't reserve GBs
        *[x for flag, value in DEMO_LOGGING.items() for x in (flag, value)],
    ]
    if gpu:
        # --sampling-backend pytorch: sglang.lang's fork() sends its prefix-caching requests with default
        # (sampled) params, so the program's batches take SGLang's top-k/top-p sampler, whose FlashInfer
        # kernel is JIT-compiled at first use: on a fresh GPU host the demo sat silent for 77-86 s in the
        # middle of the program (nvcc building FlashInfer's cached_ops/sampling, H200, 2026-12-01). The
        # demo's own generations are greedy (argmax under either backend). Same flag in bench_e2e.py.
        args += ["--attention-backend", "triton", "--sampling-backend", "pytorch"]
    else:
        args += ["--device", "cpu", "--attention-backend", "torch_native", "--dtype", "float32"]
    return args + list(extra)


def complete_lines(log_text: str) -> str:
    """``log_text`` up to its last newline: the server may be writing the line after it."""
    return log_text[:log_text.rfind("\n") + 1]


class StartupProgress:
    """SGLang's startup milestones, picked out of the server log as it grows.

    A first start on a GPU takes one to two minutes (weights, Triton compiles, CUDA-graph capture for
    every batch size) and the launcher's output goes to the log file, so without this the demo would
    sit silent that long. Milestone lines are reported as they appear; when none has appeared for
    `heartbeat_s`, the log's last line is, so a stuck start shows where it stuck.
    """

    # SGLang 0.5.10's own startup lines (model_runner, cuda_graph_runner, http_server) and the deft
    # backend's (the stage-1 kernel it chose; the planner's C library when it is built).
    # A log line may follow a progress bar's text on the same line (tqdm writes no newline).
    MILESTONE = re.compile(r"\[\d{4}-\d\d-\d\d [^\]]*\]\s*(Load weight (?:begin|end)|KV Cache is allocated"
                           r"|Capture .*\b(?:begin|end)\b|Using hybrid attention backend|tree decode stage 1 on"
                           r"|sglang-deft: building|The server is fired up)")

    def __init__(self, heartbeat_s: float = 30.0, width: int = 150):
        self.heartbeat_s = heartbeat_s
        self.width = width
        self.consumed = 0        # characters of the log already looked at (whole lines only)
        self.last_line = ""
        self.last_report = 0.0

    def update(self, log_text: str, elapsed: float) -> list[str]:
        """Messages for what the log gained since the last call, `elapsed` seconds into the start."""
        end = len(complete_lines(log_text))
        new = log_text[self.consumed:end] if end > self.consumed else ""
        self.consumed = max(self.consumed, end)
        messages = []
        for raw in new.splitlines():
            line = raw.rsplit("\r", 1)[-1].strip()  # a progress bar rewrites its line with \r
            if not line or line.startswith("warnings.warn("):  # a Python warning's echo of its own source line
                continue
            self.last_line = line
            if m := self.MILESTONE.search(line):
                messages.append(f"server +{elapsed:.0f} s: {self._short(line[m.start(1):])}")
        if messages:
            self.last_report = elapsed
        elif elapsed - self.last_report >= self.heartbeat_s:
            self.last_report = elapsed
            messages.append(f"still starting after {elapsed:.0f} s; the server log's last line: "
                            f"{self._short(self.last_line) or '(empty)'}")
        return messages

    def _short(self, text: str) -> str:
        return text if len(text) <= self.width else text[: self.width - 3] + "..."


def sharing_summary(log_before: str, log_after: str) -> dict | None:
    """Sharing over what was logged between two snapshots of the server log.

    The deft backend logs ``DeFT decode sharing: ... total_steps= total_attended_kv_tokens=
    total_unique_kv_tokens=`` every ``--decode-log-interval`` decode steps
    (``sglang_deft.sharing_metrics``); the difference of the running totals is this program's share.
    """
    from sglang_deft.sharing_metrics import parse_sharing_lines

    before = parse_sharing_lines(complete_lines(log_before))
    after = parse_sharing_lines(complete_lines(log_after))
    new = after[len(before):]
    if not new:
        return None
    # With data parallelism (--dp-size) each DP rank's scheduler logs its own running totals.
    steps = attended = unique = 0
    for rank in {r.get("dp_rank") for r in new}:
        base = next((r for r in reversed(before) if r.get("dp_rank") == rank), {})
        last = next(r for r in reversed(new) if r.get("dp_rank") == rank)
        steps += int(last["total_steps"] - base.get("total_steps", 0))
        attended += int(last["total_attended_kv_tokens"] - base.get("total_attended_kv_tokens", 0))
        unique += int(last["total_unique_kv_tokens"] - base.get("total_unique_kv_tokens", 0))
    peak = max(new, key=lambda r: r["ratio"])
    return {
        "lines": len(new),
        "steps": steps,
        "attended_kv_tokens": attended,
        "unique_kv_tokens": unique,
        "ratio": attended / unique if unique else 1.0,
        "peak_ratio": peak["ratio"],
        "peak_attended_kv_tokens": int(peak["attended_kv_tokens"]),
        "peak_unique_kv_tokens": int(peak["unique_kv_tokens"]),
    }


def print_sharing(m: dict | None) -> None:
    if m is None:
        say("no 'DeFT decode sharing' line was logged during the program (is the decode backend "
            "deft? lines come every --decode-log-interval steps, and when decoding pauses)")
        return
    say(f"sharing metrics logged by the deft backend over the program's {m['steps']} decode steps:")
    print(f"  KV tokens attended (summed over requests): {m['attended_kv_tokens']:>8}   "
          f"= what a per-request decode kernel reads")
    print(f"  unique KV tokens read:                     {m['unique_kv_tokens']:>8}   "
          f"= what deft reads (each shared segment once)")
    print(f"  ratio:                                     {m['ratio']:>8.2f}x")
    print(f"  highest-sharing step:                      {m['peak_ratio']:>8.2f}x "
          f"({m['peak_attended_kv_tokens']} attended / {m['peak_unique_kv_tokens']} unique)")


def load_example(name: str):
    path = EXAMPLES_DIR / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the demo runs from a checkout of sglang-deft")
    spec = importlib.util.spec_from_file_location(f"sglang_deft_example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_demo(url: str, widths=(2, 2), max_tokens: int = 8, read_log=None, random_model: bool = True) -> dict:
    """Run the tree-of-thought example against `url` and print tree, answers and sharing.

    `read_log()` returns the server log so far (None: no metrics). `random_model`: the server runs the
    bundled tiny model, whose random weights make random text (the answers' header says so). Returns the
    example's result plus "sharing" (the summary, or None) and "seconds".
    """
    tot = load_example("tree_of_thought")
    n_leaves = 1
    for w in widths:
        n_leaves *= w
    say(f"running examples/tree_of_thought.py: {len(widths)} levels of fork() "
        f"({','.join(map(str, widths))}), {n_leaves} answers, {max_tokens} tokens per generation")
    log_before = read_log() if read_log else ""
    t0 = time.monotonic()
    res = tot.main(url, widths=widths, max_tokens=max_tokens, quiet=True)
    seconds = time.monotonic() - t0
    print()
    print(tot.format_tree(res["tree"]))
    print()
    say(f"answers ({n_leaves}" + ("; the model is random, so the text is too):" if random_model else "):"))
    for leaf in res["tree"].leaves():
        print(f"  {leaf.label}: {tot.one_line(leaf.text, 200)}")
    print()
    sharing = None
    if read_log:
        # The scheduler logs a step's line after the step; the client may see the last tokens first.
        deadline = time.monotonic() + 3.0
        while True:
            sharing = sharing_summary(log_before, read_log())
            if time.monotonic() > deadline or (sharing and sharing["steps"] > 0 and _quiet_for(read_log)):
                break
            time.sleep(0.3)
        print_sharing(sharing)
    say(f"program ran in {seconds:.1f} s")
    return {**res, "sharing": sharing, "seconds": seconds}


def _quiet_for(read_log, wait: float = 0.5) -> bool:
    """True when the log did not grow during `wait` seconds."""
    n = len(read_log())
    time.sleep(wait)
    return len(read_log()) == n


def _is_bundled(model_path: Path) -> bool:
    return model_path.resolve() == MODEL_DIR.resolve()


def describe_server(info: dict) -> str:
    """One line of what the server runs, from its ``/server_info``."""
    prefill = info.get("prefill_attention_backend") or info.get("attention_backend")
    dtype = "the model's dtype" if info.get("dtype") == "auto" else info.get("dtype")
    return (f"serving {info.get('model_path')} on {info.get('device')} in {dtype}: prefill/extend on {prefill}, "
            f"decode on {info.get('decode_attention_backend')}")


class Signalled(SystemExit):
    """The demo was sent SIGTERM or SIGHUP (or interrupted: SIGINT): it stops the server and exits 128 + the signal,
    as a shell reports a process the signal ended (not 1 with "the server stopped answering", the examples'
    SystemExit)."""


def _raise_on_sigterm(signum, frame):  # SIGTERM, SIGHUP
    raise Signalled(128 + signum)


def looks_local(path: Path) -> bool:
    """Whether ``--model-path`` names a local path rather than a Hugging Face id ("org/name"): absolute, under ``..``,
    or under a directory that is here (``models/tiny-llama-deftt``, a typo of the bundled model, is no hub id). A bare
    name may be a hub id ("gpt2"; argparse's Path already made "./gpt2" that)."""
    if path.is_absolute() or path.parts[:1] == ("..",):
        return True
    return len(path.parts) > 1 and Path(path.parts[0]).is_dir()


def main(argv=None) -> int:
    tot = load_example("tree_of_thought")  # fail before starting a server if the checkout lacks it
    ap = argparse.ArgumentParser(prog="python -m sglang_deft.demo",
                                 description="Run the tree-of-thought example on a deft server with the bundled "
                                             "tiny model.")
    ap.add_argument("--cpu", action="store_true", help="use the CPU even if a GPU is available")
    ap.add_argument("--model-path", type=Path, default=MODEL_DIR)
    ap.add_argument("--port", type=int, default=0, help="default: a free port")
    ap.add_argument("--widths", type=tot.parse_widths, default=(2, 2),
                    help="branches per fork level (default 2,2)")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens per generation")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the server")
    ap.add_argument("--show-server-log", action="store_true")
    ap.add_argument("--keep-log", action="store_true", help="keep the server log after a success")
    ap.add_argument("server_args", nargs="*", help="extra launcher arguments (after --)")
    args = ap.parse_args(argv)
    raw = sys.argv[1:] if argv is None else list(argv)
    after_dashes = raw[raw.index("--") + 1:] if "--" in raw else []
    if len(args.server_args) > len(after_dashes):  # argparse gave the launcher a word before --, e.g. a typo
        stray = args.server_args[:len(args.server_args) - len(after_dashes)]
        ap.error(f"unrecognized arguments: {' '.join(stray)} (the launcher's arguments go after --)")
    if args.max_tokens < 1:
        ap.error("--max-tokens must be at least 1")
    if not 0 <= args.port <= 65535:
        ap.error(f"--port {args.port}: a TCP port is 1-65535 (0 or none: a free one)")
    if not args.timeout > 0:
        ap.error(f"--timeout {args.timeout}: seconds to wait for the server, more than 0")
    if looks_local(args.model_path) and not args.model_path.exists():
        # (a relative one may be a Hugging Face id, which SGLang fetches) Otherwise transformers' traceback about
        # repo ids came after the server's start, ~10 s on the CPU, inside the server log's dump.
        ap.error(f"--model-path {args.model_path}: no such directory")
    for flag, why in REFUSED_AFTER_DASHES.items():
        if any(names_flag(a, flag) for a in args.server_args):
            ap.error(f"{flag} after --: {why}")
    for backend in flag_values(args.server_args, DECODE_BACKEND):
        if backend not in (None, "deft"):  # (None: SGLang's parser refuses the flag without a value itself)
            ap.error(f"{DECODE_BACKEND} {backend} after --: the demo shows deft's decode, which that would replace")

    t_start = time.monotonic()
    # The server runs in a process group of its own, which a closed terminal's SIGHUP does not reach: the
    # demo must stop it then too. The caller's handlers come back at the end (main() called from Python).
    # A signal the caller ignores stays ignored: under nohup a closed terminal's SIGHUP ended the demo.
    callers = {signum: signal.signal(signum, _raise_on_sigterm) for signum in (signal.SIGTERM, signal.SIGHUP)
               if signal.getsignal(signum) is not signal.SIG_IGN}
    # The program's requests (sglang.lang's, in this process) go to 127.0.0.1 past any proxy the environment names,
    # as ServerProcess's own do: with http_proxy set they reached the proxy instead.
    proxy_env = {key: os.environ.get(key) for key in NO_PROXY_KEYS}
    unproxied = with_local_hosts_unproxied(os.environ)
    os.environ.update({key: unproxied[key] for key in NO_PROXY_KEYS if key in unproxied})  # (no_proxy=*: as it was)
    try:
        return _run(args, t_start)
    finally:
        for signum, handler in callers.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: not set from Python
        for key, value in proxy_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run(args, t_start: float) -> int:
    """The server started, the program run against it, the server stopped (main's arguments, checked)."""
    gpu = use_gpu(args.cpu)
    where = ("GPU: prefill/extend on triton" if gpu
             else "CPU: prefill/extend on torch_native, float32")
    model = "the bundled tiny Llama" if _is_bundled(args.model_path) else f"model {args.model_path}"
    extra = f"; then the arguments after --: {' '.join(args.server_args)}" if args.server_args else ""
    say(f"starting SGLang with {model}, decode attention 'deft' ({where}{extra})")
    log_dir = Path(tempfile.mkdtemp(prefix="sglang-deft-demo-"))  # after the first print, which may fail
    log_path = log_dir / "server.log"
    try:
        server = ServerProcess("demo", server_args(args.model_path, gpu, args.server_args), log_path,
                               port=args.port or None)
    except (RuntimeError, OSError) as e:  # the port is in use, or the launcher cannot start
        shutil.rmtree(log_dir, ignore_errors=True)
        say(f"could not start the server: {e}")
        return 1
    ok, signalled, piped_away = False, None, False
    # sglang.lang's worker threads report a generation the server refused, or one cut off by the stop (an interrupted
    # run), as a warning with its traceback per branch; the demo says the reason in one line.
    warnings.filterwarnings("ignore", message=".*Error in stream_executor.*")
    try:  # from here on every way out stops the server
        say(f"command: {' '.join(server.command)}")
        say(f"server log: {log_path}")
        say(f"server pid {server.proc.pid} (its own process group)")
        say(f"waiting for {server.url} (the first start imports SGLang and loads the model) ...")
        progress = StartupProgress()

        def report_startup(elapsed: float) -> None:
            for message in progress.update(server.log(), elapsed):
                say(message)

        ready_s = server.wait_ready(args.timeout, on_poll=report_startup)
        say(f"server ready after {ready_s:.1f} s")
        # What the server runs, from the server: arguments after -- may have changed the demo's.
        info = server.server_info()
        say(describe_server(info))
        if info.get("decode_attention_backend") != "deft":
            raise RuntimeError("the server does not decode with deft (an argument after -- changed it), so there is "
                               "no deft decode to show")
        run_demo(server.url, args.widths, args.max_tokens, read_log=server.log,
                 random_model=_is_bundled(Path(info["model_path"])))
        if args.show_server_log:
            print(server.log())
        ok = True
    except KeyboardInterrupt:  # exits 130 below, as a shell reports a process SIGINT ended
        say_if_possible("interrupted")
        signalled = Signalled(128 + signal.SIGINT)
    except Signalled as e:
        signalled = e
        say_if_possible(f"stopped by signal {e.code - 128} ({signal.Signals(e.code - 128).name})")
    except BrokenPipeError:  # stdout closed (`make demo | head`): nothing to say it on; the stop below still runs
        piped_away = True
        raise
    # the server exited or did not answer in time (its log says why), answered with no JSON (it died mid-reply:
    # OSError, ValueError), or it is not what the demo shows
    except (RuntimeError, TimeoutError, OSError, ValueError) as e:
        say_if_possible(str(e))
    except SystemExit as e:  # the examples' connect(): nothing answers at the server's URL any more
        say_if_possible(f"the server stopped answering: {e}")
    finally:
        # A second Ctrl-C, SIGTERM or SIGHUP cannot cut the stop short (ignored before anything is printed): it
        # sends SIGKILL to whatever outlives SIGTERM's grace, which an interrupted stop would skip.
        handlers = {signum: signal.signal(signum, signal.SIG_IGN)
                    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        say_if_possible("shutting the server down")
        try:
            server.stop()
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: not set from Python
        # A log kept for a failure is named on stdout; with stdout closed no line could say where it is.
        kept = (not ok and not piped_away) or args.keep_log
        if not kept:
            shutil.rmtree(log_dir, ignore_errors=True)
        say_if_possible(f"server stopped; total {time.monotonic() - t_start:.1f} s"
                        + (f"; server log kept at {log_path}" if kept else "; server log removed (--keep-log keeps it)"))
    if signalled is not None:
        raise signalled
    return 0 if ok else 1


def command_line() -> int:
    """``main`` as ``python -m sglang_deft.demo`` runs it: a stdout closed by its reader (``make demo | head``) ends
    the demo with exit code 1 and no traceback (the server is stopped by then)."""
    try:
        return main()
    except BrokenPipeError:
        # Python's recipe: stdout pointed at devnull, so that the interpreter's flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(command_line())
