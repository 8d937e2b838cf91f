"""A fork tree and its indented printout, shared by the examples.

Each example builds a `Node` tree mirroring its `fork()` calls: the root holds the shared prompt,
each child the text its branch generated. `format_tree` renders it with ASCII connectors so the
output survives any terminal or CI log.
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import sys
import traceback
import urllib.error
import urllib.parse
import warnings
from dataclasses import dataclass, field


@dataclass
class Node:
    label: str                      # "prompt", "thought 1", "sample 3", ...
    text: str = ""                  # what this node added to the shared text
    children: list["Node"] = field(default_factory=list)
    note: str = ""                  # e.g. "votes: 2", "<- picked"

    def add(self, label: str, text: str = "") -> "Node":
        child = Node(label, text)
        self.children.append(child)
        return child

    def leaves(self) -> list["Node"]:
        if not self.children:
            return [self]
        return [leaf for c in self.children for leaf in c.leaves()]

    def depth(self) -> int:
        return 1 + max((c.depth() for c in self.children), default=0)


def one_line(text: str, width: int) -> str:
    # One line, and no control characters (a model may emit any byte; an ESC would reach the terminal).
    flat = "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def format_tree(root: Node, width: int = 72) -> str:
    """Indented view: one line per node, `label: "text"`, children below their parent."""
    lines: list[str] = []

    def line(node: Node) -> str:
        s = f'{node.label}: "{one_line(node.text, width)}"'
        return s + (f"  [{node.note}]" if node.note else "")

    def walk(node: Node, indent: str) -> None:
        for i, child in enumerate(node.children):
            last = i == len(node.children) - 1
            lines.append(indent + ("`-- " if last else "|-- ") + line(child))
            walk(child, indent + ("    " if last else "|   "))

    lines.append(line(root))
    walk(root, "")
    return "\n".join(lines)


def check_branch(state) -> None:
    """Raises the server's error if any generation of this branch failed. (sglang.lang keeps one error per
    state, not which of its gens it came from.)"""
    err = state.error()
    if err is not None:
        raise RuntimeError(f"a generation in this branch failed: {err!r}") from err


def generated(state, var: str) -> str:
    """The text a branch generated into ``var``; raises if a generation of the branch failed."""
    check_branch(state)
    return state[var]


def connect(url: str):
    """SGLang's frontend endpoint for the server at ``url``; exits with what to do when nothing answers there."""
    import sglang as sgl

    url = url.rstrip("/")  # SGLang appends "/get_model_info": a trailing slash would ask for "//get_model_info"
    if "://" not in url:  # host:port, as curl takes it (urllib said "unknown url type", as if no server were there)
        url = f"http://{url}"
    try:
        host = urllib.parse.urlsplit(url).hostname
    except ValueError as e:  # an unclosed IPv6 bracket
        raise SystemExit(f"--url {url}: not a URL ({e})") from None
    if host in ("127.0.0.1", "localhost", "::1"):
        # A server on this machine is reached directly: with http_proxy set (and it not in no_proxy) sglang.lang's
        # requests went to the proxy, and "no SGLang server answers" was said of a running one. Both variables get
        # the entries of either (libraries read the lowercase one first); "*" already bypasses every host. An IPv6
        # host goes in both spellings: urllib matches no_proxy against "[::1]:port", requests against "::1".
        hosts = [h.strip() for key in ("no_proxy", "NO_PROXY") for h in os.environ.get(key, "").split(",") if h.strip()]
        if "*" not in hosts:
            local = [host, f"[{host}]"] if ":" in host else [host]
            os.environ["no_proxy"] = os.environ["NO_PROXY"] = ",".join(dict.fromkeys(hosts + local))
    try:
        return sgl.RuntimeEndpoint(url)
    except (urllib.error.URLError, ConnectionError) as e:
        raise SystemExit(f"no SGLang server answers at {url} ({getattr(e, 'reason', e)}): start one with "
                         "`python -m sglang_deft.launch_server --model-path MODEL --decode-attention-backend deft "
                         "--grammar-backend none` "
                         "(or `make demo`, which starts one and runs tree_of_thought.py), or pass --url") from None
    except http.client.InvalidURL as e:  # a port that is not a number (not a ValueError)
        raise SystemExit(f"--url {url}: not a URL ({e})") from None
    except (RuntimeError, ValueError) as e:  # an HTTP error status or a body that is not SGLang's JSON
        raise SystemExit(f"the server at {url} does not answer GET /get_model_info as an SGLang server does "
                         f"({str(e)[:200]}): is --url an SGLang server's address?") from None


def temperature_arg(text: str) -> float:
    """``--temperature``: SGLang refuses a negative one (HTTP 400); nan and inf are no temperature."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text}: the temperature must be a finite number >= 0")
    return value


def run_as_command(main, **kwargs) -> None:
    """Run an example's ``main`` as its command line does, ending the process on Ctrl-C (exit 130) or an error
    (exit 1) instead of hanging there. sglang.lang gives every fork() branch a worker thread that is not a daemon
    and ends only when its state is garbage-collected or one of its own generations fails; after an uncaught
    exception the traceback (kept for the interpreter's exit) keeps the states alive, and the exit waits on their
    threads forever (a second Ctrl-C was needed). So the error is printed here and the process ends at once.

    sglang.lang also warns of each failed generation with its traceback ("Error in stream_executor: Traceback
    ..."), which came before that one line; every example reads its branches through ``check_branch``, whose error
    names the server's reply, so those warnings are left out unless Python's -W asks for warnings."""
    if not sys.warnoptions:
        warnings.filterwarnings("ignore", message="Error in stream_executor")
    try:
        main(**kwargs)
        return
    except KeyboardInterrupt:
        code, message = 130, "interrupted"
    except RuntimeError as e:  # a failed generation (check_branch), as sglang.lang reports it
        code, message = 1, f"error: {e}"
    except Exception:  # anything else: its traceback, which says where
        code, message = 1, traceback.format_exc().rstrip()
    name = os.path.basename(sys.argv[0]) or "example"
    # The other branches' threads go on until the exit: sglang.lang's warning for each failed one ("Error in
    # stream_executor: Traceback ...") came after this message, which is then not the last line. (Warning filters
    # are the process's, so this silences those threads too.)
    warnings.simplefilter("ignore")
    try:
        sys.stdout.flush()
        print(f"{name}: {message}", file=sys.stderr, flush=True)
    finally:
        os._exit(code)  # not sys.exit: the interpreter's exit would wait on the branches' threads
