"""Tree of thought: a question, several thoughts, several answers per thought (nested `fork()`).

    python examples/tree_of_thought.py --url http://127.0.0.1:30000 [--widths 2,2] [--max-tokens 8]

The question is sent once; `s.fork(2)` starts two thoughts that share its KV; each thought forks
again into answers that share the question *and* their thought. With `--widths 3,2,2` the tree has
three levels. On a `--decode-attention-backend deft` server every decode step reads each shared
segment (question, thoughts) once for all the branches below it.

With the bundled random tiny model the text is meaningless; the shape of the tree is the point.
`main()` returns {"tree": Node, "answers": [leaf texts], "leaf_texts": [full text of each leaf]}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import sglang as sgl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tree_view import (Node, check_branch, connect, format_tree, generated,  # noqa: E402
                       one_line, run_as_command, temperature_arg)  # noqa: F401 (one_line: for the demo)

QUESTION = (
    "A farmer has 17 sheep, a dog and two fields. Every morning he moves half of the sheep from "
    "the north field to the south field, and every evening the dog brings a third of the sheep in "
    "the south field back to the north field. All the sheep start in the north field on Monday. "
    "How many sheep are in the south field on Friday evening, and which field holds more of them "
    "at the end of the week?"
)
# Each branch gets its own angle, so that even greedy decoding (the default) explores different
# continuations; branch i of a level uses entry i % len.
THOUGHT_ANGLES = ["work forwards day by day", "write an equation", "try small numbers first",
                  "work backwards from Friday", "draw a table"]
ANSWER_ANGLES = ["in one number", "with a check", "in one sentence", "as a guess"]
HEADER = (
    "Solve the problem by exploring several lines of thought. Write each thought in one line, "
    "then give a short answer under each thought.\n\n"
)


@sgl.function
def tree_of_thought(s, question, widths=(2, 2), max_tokens=8, temp=0.0):
    s += HEADER + "Question: " + question + "\n"
    root = Node("question", question)
    frontier = [(s, root, "")]
    pending = []  # (state, node, variable): read after every branch of every level was submitted
    for level, width in enumerate(widths):
        last = level == len(widths) - 1
        kind = "Answer" if last else "Thought"
        angles = ANSWER_ANGLES if last else THOUGHT_ANGLES
        var = f"level{level}"
        nxt = []
        for state, node, path in frontier:
            # fork() caches the prefix with a max_new_tokens=0 request only if the state's text is
            # already filled when it looks; sync() makes that so (without it the root prompt is
            # often not committed and concurrent branches prefill private copies of it). The
            # wait is for this state alone: the other states of this level keep decoding.
            state.sync()
            # A failed gen ends the branch's worker thread, and fork() would wait for it forever.
            check_branch(state)
            for i, f in enumerate(state.fork(width)):
                label = f"{path}{i + 1}"
                angle = angles[i % len(angles)]
                f += f"{kind} {label} ({angle}):"
                f += sgl.gen(var, max_tokens=max_tokens, temperature=temp)
                f += "\n"
                child = node.add(f"{kind.lower()} {label} ({angle})")
                nxt.append((f, child, label + "."))
                pending.append((f, child, var))
        frontier = nxt
    for f, node, var in pending:
        node.text = generated(f, var)
    return root, [f for f, _, _ in frontier]


def main(url="http://127.0.0.1:30000", question=QUESTION, widths=(2, 2), max_tokens=8,
         temperature=0.0, quiet=False):
    if len(widths) < 1 or min(widths) < 1:
        raise ValueError(f"widths {tuple(widths)}: at least one level, each of at least 1 branch")
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: must be at least 1")
    sgl.set_default_backend(connect(url))
    # Argument names of an sgl.function must not collide with `.run()`'s own (n, temperature, ...).
    state = tree_of_thought.run(question=question, widths=tuple(widths), max_tokens=max_tokens,
                                temp=temperature)
    root, leaves = state.ret_value
    result = {
        "tree": root,
        "answers": [leaf.text for leaf in root.leaves()],
        "leaf_texts": [f.text() for f in leaves],
    }
    if not quiet:
        print(format_tree(root))
    return result


def parse_widths(text: str) -> tuple[int, ...]:
    """``--widths``: branches per fork level, comma separated, each at least 1."""
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected branch counts per level, such as 2,2") from None
    if min(widths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every level needs at least 1 branch")
    return widths


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    ap.add_argument("--widths", type=parse_widths, default=(2, 2),
                    help="branches per level, comma separated (default 2,2: two levels of fork())")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--temperature", type=temperature_arg, default=0.0)
    a = ap.parse_args()
    if a.max_tokens < 1:
        ap.error("--max-tokens must be at least 1")
    run_as_command(main, url=a.url, widths=a.widths, max_tokens=a.max_tokens, temperature=a.temperature)
