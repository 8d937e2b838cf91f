"""The examples' fork programs against a fake `/generate` server (no SGLang runtime, no model).

Checks the tree each example builds and prints, the requests `sglang.lang` sends for it (one
`max_new_tokens=0` prefix commit per fork, one generation per branch), and best-of-n's selection.
The fake's completion is a deterministic function of the request text, so the branches'
texts can be traced back to the prompts they were generated from.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytest.importorskip("sglang.lang")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_completion(text: str, n_tokens: int) -> str:
    h = hashlib.sha256(text.encode()).hexdigest()
    return "".join(f" w{h[2 * i:2 * i + 2]}" for i in range(n_tokens))


class FakeServer:
    def __init__(self, refuse_generations: bool = False, scored_answers: list[tuple[str, float]] | None = None,
                 delay_s: float = 0.0, refuse_every_second: bool = False):
        """``scored_answers``: (text, logprob) for the requests that ask for logprobs, in the order they come;
        ``delay_s``: each generation's wait before its answer; ``refuse_every_second``: refuse the second, fourth, ...
        generation only (some branches fail, the others go on)."""
        self.requests: list[dict] = []
        scored = list(scored_answers or [])
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/get_model_info":
                    self._send({"model_path": "fake-model", "is_generation": True})
                else:
                    self.send_error(404)

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append(req)
                    count = len(outer.generations())
                n = req["sampling_params"].get("max_new_tokens", 8)
                if n:
                    time.sleep(delay_s)
                if n and (refuse_generations or (refuse_every_second and count % 2 == 0)):
                    # what SGLang answers to, e.g., a negative temperature
                    body = json.dumps({"error": {"message": "temperature must be non-negative"}}).encode()
                    self.send_response(400)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                out = fake_completion(req["text"], n)
                meta = {"prompt_tokens": len(req["text"]), "completion_tokens": n}
                if req.get("return_logprob"):
                    # Mean logprob decreases with the first hex digit of the hash: deterministic.
                    lp = -int(hashlib.sha256(req["text"].encode()).hexdigest()[0], 16) / 4
                    if scored:
                        with outer.lock:
                            out, lp = scored.pop(0)
                    meta["output_token_logprobs"] = [[lp, 7, None]] * n
                self._send({"text": out, "meta_info": meta})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def generations(self):
        return [r for r in self.requests if r["sampling_params"].get("max_new_tokens") != 0]

    def commits(self):
        return [r for r in self.requests if r["sampling_params"].get("max_new_tokens") == 0]


@pytest.fixture
def server():
    s = FakeServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def test_tree_of_thought_two_levels(server, capsys):
    tot = load_example("tree_of_thought")
    res = tot.main(server.url, widths=(3, 2), max_tokens=5)
    root = res["tree"]
    assert [c.label.split(" (")[0] for c in root.children] == ["thought 1", "thought 2", "thought 3"]
    assert root.children[1].label == f"thought 2 ({tot.THOUGHT_ANGLES[1]})"
    assert [c.label.split(" (")[0] for c in root.children[1].children] == ["answer 2.1", "answer 2.2"]
    assert root.depth() == 3 and len(res["answers"]) == 6
    # 3 thoughts + 6 answers generated; 1 commit of the question + 3 of the thoughts.
    assert len(server.generations()) == 9 and len(server.commits()) == 4
    assert all(g["sampling_params"]["temperature"] == 0.0 for g in server.generations())
    # Each answer was generated from the full text of its own path.
    for leaf_text, answer in zip(res["leaf_texts"], res["answers"]):
        prompt = leaf_text[: leaf_text.rindex(answer)]
        assert answer == fake_completion(prompt, 5)
        assert leaf_text.startswith(tot.HEADER + "Question: " + tot.QUESTION)
    assert res["leaf_texts"][3].count("Thought 2 (") == 1 and "Answer 2.2 (" in res["leaf_texts"][3]
    out = capsys.readouterr().out
    assert out.count("thought ") == 3 and out.count("answer ") == 6 and "|   `-- answer 1.2" in out


def test_tree_of_thought_three_levels(server):
    tot = load_example("tree_of_thought")
    res = tot.main(server.url, widths=(2, 2, 2), max_tokens=3, temperature=0.5, quiet=True)
    assert res["tree"].depth() == 4 and len(res["answers"]) == 8
    assert res["tree"].leaves()[-1].label.startswith("answer 2.2.2 (")
    assert len(server.generations()) == 2 + 4 + 8 and len(server.commits()) == 1 + 2 + 4
    assert all(g["sampling_params"]["temperature"] == 0.5 for g in server.generations())


def test_few_shot_parallel_sampling(server, capsys):
    ex = load_example("few_shot_parallel_sampling")
    res = ex.main(server.url, n=5, shots=12, max_tokens=4)
    assert len(res["answers"]) == 5 and len(res["tree"].children) == 5
    gens = server.generations()
    assert len(gens) == 5 and len(server.commits()) == 1
    assert len({g["text"] for g in gens}) == 1  # every branch continues the same prompt
    assert gens[0]["text"].count("Question:") == 13 and res["prompt_chars"] > 1000
    assert all(abs(g["sampling_params"]["temperature"] - 0.8) < 1e-9 for g in gens)
    assert capsys.readouterr().out.count("sample ") == 5


def test_best_of_n_picks_majority_then_logprob(server, capsys):
    ex = load_example("best_of_n")
    res = ex.main(server.url, n=4, max_tokens=3, answer_tokens=2)
    assert len(res["answers"]) == 4 and res["tree"].depth() == 3
    # The fake is deterministic and all branches share one prompt: identical reasonings, identical
    # answers, so all 4 vote for the same answer.
    assert res["votes"] == {res["answers"][0].strip(): 4}
    assert sum(1 for g in server.generations() if g.get("return_logprob")) == 4
    assert "<- picked" in capsys.readouterr().out

    # Through the program, with answers that differ: majority ("b"), then the higher mean logprob of the two
    # paths that answered it (-2 against -3; "c" has the best logprob, but one vote). The branches run on
    # threads, so which path sends which answer request varies; the pick's answer and score do not.
    s = FakeServer(scored_answers=[(" a", 0.0), (" b", -3.0), (" b ", -2.0), (" c", 1.0)])
    s.thread.start()
    try:
        res = ex.main(s.url, n=4, max_tokens=3, answer_tokens=2, quiet=True)
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()
    assert res["votes"] == {"a": 1, "b": 2, "c": 1}
    assert res["answers"][res["best"]].strip() == "b" and res["scores"][res["best"]] == -2.0

    # Selection rule on its own: majority first, then mean logprob, then the earlier path.
    assert ex.pick(["a", "b", "b", "c"], [0.0, -3.0, -2.0, 1.0])[0] == 2
    assert ex.pick(["a", "b", "c"], [-1.0, -0.5, -0.7])[0] == 1
    assert ex.pick(["x", "x"], [-1.0, -1.0])[0] == 0


def test_tree_view_format():
    sys.path.insert(0, str(EXAMPLES))
    try:
        from tree_view import Node, format_tree
    finally:
        sys.path.pop(0)
    root = Node("q", "a\nb")
    t1 = root.add("t1", "x" * 100)
    t1.add("a1", "y")
    root.add("t2", "z\x1b[2J").note = "best"
    assert format_tree(root, width=20).splitlines() == [
        'q: "a b"',
        '|-- t1: "xxxxxxxxxxxxxxxxx..."',
        '|   `-- a1: "y"',
        '`-- t2: "z?[2J"  [best]',
    ]


@pytest.mark.parametrize("name", ["tree_of_thought", "best_of_n", "few_shot_parallel_sampling"])
def test_a_failed_generation_is_raised_not_waited_for(name):
    """A branch whose gen the server refuses ends its worker thread: tree_of_thought's next fork() of it waited
    forever. Every example raises the server's error instead."""
    s = FakeServer(refuse_generations=True)
    s.thread.start()
    outcome = []

    def run():
        try:
            load_example(name).main(s.url, quiet=True)
            outcome.append("returned")
        except RuntimeError as e:
            outcome.append(str(e))

    try:
        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(60)
        assert outcome, f"{name} still waiting after 60 s"
        assert "a generation in this branch failed" in outcome[0], outcome
        assert "temperature must be non-negative" in outcome[0], outcome
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()


def _run_example_command(name: str, s: FakeServer, interrupt: bool) -> tuple[int, str]:
    """The example run as its command line, against ``s``; with ``interrupt``, SIGINT once a generation is under way.
    Its exit code and stderr, or a failure if it is still running 60 s later."""
    s.thread.start()
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / f"{name}.py"), "--url", s.url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if interrupt:
            deadline = time.monotonic() + 60
            while not s.generations() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            assert s.generations(), f"{name} sent no generation in 60 s"
            proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"{name} still running 60 s later (sglang.lang's fork threads kept it): {err[-2000:]}")
        return proc.returncode, err
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()


@pytest.mark.parametrize("name", ["tree_of_thought", "best_of_n", "few_shot_parallel_sampling"])
def test_ctrl_c_ends_an_example_at_once(name):
    """sglang.lang's fork() threads are not daemons: after Ctrl-C the traceback kept their states alive and the
    interpreter's exit waited on them forever (a second Ctrl-C ended it, with another traceback)."""
    rc, err = _run_example_command(name, FakeServer(delay_s=3.0), interrupt=True)
    assert rc == 130, err
    assert err.strip().endswith(f"{name}.py: interrupted"), err


@pytest.mark.parametrize("name", ["tree_of_thought", "best_of_n", "few_shot_parallel_sampling"])
def test_an_example_whose_other_branches_go_on_ends_at_a_failed_one(name):
    """A refused generation in one branch, with the others answered: the error printed, then the same endless wait
    on the branches' threads as after Ctrl-C (only a refusal of every branch ended every thread). sglang.lang's
    traceback per failed generation came before the error; the error names the server's reply."""
    rc, err = _run_example_command(name, FakeServer(refuse_every_second=True), interrupt=False)
    assert rc == 1, err
    assert f"{name}.py: error: a generation in this branch failed" in err, err
    assert "temperature must be non-negative" in err, err
    assert "Traceback" not in err, err


def test_a_local_server_is_reached_past_a_proxy(monkeypatch):
    """With http_proxy set, sglang.lang's requests to 127.0.0.1 went to the proxy (a closed port here)."""
    load_example("tree_of_thought")
    import tree_view
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("no_proxy", "corp.example")
    monkeypatch.setenv("NO_PROXY", "")  # (recorded, so that connect()'s value is taken back after the test)
    s = FakeServer()
    s.thread.start()
    try:
        assert tree_view.connect(s.url) is not None
        assert load_example("few_shot_parallel_sampling").main(s.url, n=2, quiet=True)
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()
    assert os.environ["no_proxy"] == os.environ["NO_PROXY"] == "corp.example,127.0.0.1"


def test_no_server_and_a_negative_temperature_are_clear_errors():
    import argparse
    import socket

    load_example("tree_of_thought")  # puts examples/ on the path, as every example does
    import tree_view
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(SystemExit, match=f"no SGLang server answers at http://127.0.0.1:{port}"):
        tree_view.connect(f"http://127.0.0.1:{port}")
    # Something else answers there: an HTTP 404 (a plain file server), or SGLang's error raised as a traceback before
    s = FakeServer()
    s.thread.start()
    try:
        assert tree_view.connect(s.url + "/") is not None  # a trailing slash asked for //get_model_info
        # host:port without http:// was "unknown url type", reported as no server answering there
        assert tree_view.connect(s.url.removeprefix("http://")).base_url == s.url
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()
    import http.server

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(SystemExit, match="does not answer GET /get_model_info as an SGLang server does"):
            tree_view.connect(f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert tree_view.temperature_arg("0.5") == 0.5
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number >= 0"):
            tree_view.temperature_arg(bad)
    for url, why in (("http://127.0.0.1:abc", "nonnumeric port"), ("http://[::1", "Invalid IPv6 URL")):
        with pytest.raises(SystemExit, match=rf"--url {re.escape(url)}: not a URL \({why}"):
            tree_view.connect(url)  # were tracebacks: http.client's InvalidURL, urlsplit's ValueError
    # Through the Python API, past the command lines' checks (best_of_n's n=0 ended in max() of nothing).
    tot = load_example("tree_of_thought")
    for widths in ((), (2, 0)):
        with pytest.raises(ValueError, match="each of at least 1 branch"):
            tot.main("http://127.0.0.1:1", widths=widths)
    with pytest.raises(ValueError, match="max_tokens=0: must be at least 1"):
        tot.main("http://127.0.0.1:1", max_tokens=0)
    for kwargs in ({"n": 0}, {"max_tokens": 0}, {"answer_tokens": 0}):
        with pytest.raises(ValueError, match="each must be at least 1"):
            load_example("best_of_n").main("http://127.0.0.1:1", **kwargs)
    for kwargs in ({"n": 0}, {"max_tokens": 0}, {"shots": -3}):
        with pytest.raises(ValueError, match="n and max_tokens must be at least 1, shots at least 0"):
            load_example("few_shot_parallel_sampling").main("http://127.0.0.1:1", **kwargs)


def test_a_local_ipv6_server_is_reached_past_a_proxy_too(monkeypatch):
    """For http://[::1]:PORT connect() added "::1" to no_proxy, which urllib (sglang.lang's client) matches against
    "[::1]:PORT" and so never bypassed: the proxy's refusal read as no server there. Both spellings now."""
    import urllib.request

    load_example("tree_of_thought")
    import tree_view
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.setenv("NO_PROXY", "")
    with pytest.raises(SystemExit):  # nothing listens there; what matters is how it was asked
        tree_view.connect("http://[::1]:9")
    assert urllib.request.proxy_bypass_environment("[::1]:9")  # urllib's spelling
    assert "::1" in os.environ["no_proxy"].split(",")  # requests'
