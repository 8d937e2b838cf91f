"""The three examples and the demo against a real SGLang server on the CPU (deft decode backend).

One server for the module: the bundled tiny Llama, ``--device cpu --attention-backend torch_native
--decode-attention-backend deft --dtype float32``, started and stopped with the demo's own code
(`sglang_deft.server_process.ServerProcess` with `demo.server_args`), so the demo's start / health
wait / process-group shutdown is what runs here. Generations are a few tokens long: the module takes
about a server start plus a few seconds. A second test interrupts `python -m sglang_deft.demo` while
its server starts and checks that no server process survives.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from sglang_deft import demo
from sglang_deft.server_process import ServerProcess, process_group_alive


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("deft-server") / "server.log"
    srv = ServerProcess("demo", demo.server_args(demo.MODEL_DIR, gpu=False), log)
    progress = demo.StartupProgress()
    srv.startup_messages = []
    try:
        srv.wait_ready(600, on_poll=lambda elapsed: srv.startup_messages.extend(progress.update(srv.log(), elapsed)))
        yield srv
    finally:
        srv.stop()
    assert not process_group_alive(srv.proc.pid), "server processes survived ServerProcess.stop()"


def run_with_sharing(server, fn):
    before = server.log()
    res = fn()
    deadline = time.monotonic() + 5
    while True:  # the scheduler logs a step after the client may have seen its tokens
        sharing = demo.sharing_summary(before, server.log())
        if (sharing and demo._quiet_for(server.log)) or time.monotonic() > deadline:
            return res, sharing
        time.sleep(0.3)


def test_tree_of_thought(server):
    tot = demo.load_example("tree_of_thought")
    res, sharing = run_with_sharing(
        server, lambda: tot.main(server.url, widths=(2, 2), max_tokens=4, quiet=True))
    root = res["tree"]
    assert root.depth() == 3 and len(res["answers"]) == 4
    assert all(a.strip() for a in res["answers"])
    assert len(set(res["answers"])) > 1  # branch prompts differ, so do greedy continuations
    for thought in root.children:
        for answer in thought.children:
            leaf_text = next(t for t in res["leaf_texts"] if answer.label.split()[1] + " (" in t)
            assert thought.text.strip() and answer.text.strip()  # "" would be in any text
            assert thought.text in leaf_text and answer.text in leaf_text
    assert sharing is not None and sharing["steps"] > 0
    # 2 x 2 branches on one ~450-token question. How many of them decode in one step depends on when the client's
    # requests arrive, so the ratio varies with the machine's load: 1.46-2.32 in four runs on the 2-core box beside
    # two busy processes, 1.49 once in CI (where 1.5 was the bound).
    assert sharing["ratio"] > 1.25, sharing


def test_few_shot_parallel_sampling(server):
    ex = demo.load_example("few_shot_parallel_sampling")
    res, sharing = run_with_sharing(
        server, lambda: ex.main(server.url, n=4, shots=12, max_tokens=4, quiet=True))
    assert len(res["answers"]) == 4 and all(a.strip() for a in res["answers"])
    # 4 branches decode together over one ~700-token prompt: almost 4x.
    assert sharing is not None and sharing["peak_ratio"] > 3.0, sharing


def test_best_of_n(server):
    ex = demo.load_example("best_of_n")
    res = ex.main(server.url, n=3, max_tokens=4, answer_tokens=3, quiet=True)
    assert len(res["answers"]) == 3 and 0 <= res["best"] < 3
    assert all(s > float("-inf") and s <= 0 for s in res["scores"]), res["scores"]
    assert sum(res["votes"].values()) == 3


def test_demo_run(server, capsys):
    res = demo.run_demo(server.url, widths=(2, 2, 2), max_tokens=3, read_log=server.log)
    assert res["tree"].depth() == 4 and len(res["answers"]) == 8
    out = capsys.readouterr().out
    assert "sharing metrics logged by the deft backend" in out and "answer 2.2.2" in out
    assert res["sharing"]["ratio"] > 1.5


def test_demo_reports_a_real_servers_startup_milestones(server):
    # The milestone patterns are SGLang 0.5.10's log lines: this fails if the real server's differ.
    said = "\n".join(server.startup_messages)
    for milestone in ("Load weight end", "KV Cache is allocated", "decode_backend=deft"):
        assert milestone in said, said


def test_startup_progress_reports_milestones_once_and_a_heartbeat_when_quiet():
    p = demo.StartupProgress(heartbeat_s=30, width=60)
    log = ("[2026-12-01 04:14:28] Init torch distributed begin.\n"
           "[2026-12-01 04:14:28 TP0] Load weight begin. avail mem=22.00 GB\n"
           "Capturing batches (bs=4):  10%|#\rCapturing batches (bs=2):  50%|#####\n"
           "Capturing batches (bs=256):   0%|   | 0/36 [00:00<?, ?it/s][2026-12-01 04:19:18] tree decode stage 1 "
           "on cuda:0\n"
           "[2026-12-01 04:14:29 TP0] Capture cuda graph begin. This can take up to several minutes. "
           "avail mem=21.00 GB\n"
           "[2026-12-01 04:14:30 TP0] Load weight e")  # a line still being written
    assert p.update(log, 2.0) == ["server +2 s: Load weight begin. avail mem=22.00 GB",
                                  "server +2 s: tree decode stage 1 on cuda:0",
                                  "server +2 s: Capture cuda graph begin. This can take up to several min..."]
    assert p.update(log, 20.0) == []  # nothing new, and under the heartbeat
    assert p.update(log, 33.0) == ["still starting after 33 s; the server log's last line: [2026-12-01 "
                                   "04:14:29 TP0] Capture cuda graph begin. This ..."]
    log += "nd. elapsed=0.03 s\nCapturing batches (bs=1):  90%|#########\n"
    assert p.update(log, 40.0) == ["server +40 s: Load weight end. elapsed=0.03 s"]
    assert p.update(log, 75.0) == ["still starting after 75 s; the server log's last line: Capturing "
                                   "batches (bs=1):  90%|#########"]


def test_demo_ctrl_c_during_startup_stops_the_server(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "sglang_deft.demo", "--cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, TMPDIR=str(tmp_path)))  # the kept log: in pytest's tmp_path
    pgid = None
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if m := re.search(r"server pid (\d+)", line):
                pgid = int(m.group(1))
            if "waiting for" in line:
                break
        assert pgid is not None, "".join(out)
        time.sleep(8)  # let the launcher get going (imports, scheduler processes)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
        out.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
        if pgid is not None and process_group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
            pytest.fail("the demo left its server running:\n" + "".join(out))
    text = "".join(out)
    assert proc.returncode == 130, text  # as a shell reports a process SIGINT ended
    assert "interrupted" in text and "server stopped" in text, text


@pytest.mark.parametrize("argv,message", [
    (["--widths", "abc"], "expected branch counts per level"),
    (["--widths", "2,,2"], "expected branch counts per level"),
    (["--widths", "2,0"], "every level needs at least 1 branch"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
])
def test_demo_refuses_bad_arguments_before_starting_a_server(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(demo, "ServerProcess", lambda *a, **k: pytest.fail("the demo started a server"))
    with pytest.raises(SystemExit) as e:
        demo.main(["--cpu", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_gpu_server_samples_without_flashinfer_jit():
    # FlashInfer's sampler is JIT-compiled at first use, mid-program (77-86 s of silence on a fresh H200);
    # the demo's GPU server must use SGLang's PyTorch sampler instead (demo.server_args's comment).
    args = demo.server_args(demo.MODEL_DIR, gpu=True)
    assert args[args.index("--sampling-backend") + 1] == "pytorch"
    assert args[args.index("--decode-attention-backend") + 1] == "deft"
    assert "--sampling-backend" not in demo.server_args(demo.MODEL_DIR, gpu=False)
