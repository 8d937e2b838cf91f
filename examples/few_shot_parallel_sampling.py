"""Few-shot parallel sampling: one long few-shot prompt, n sampled answers (one `fork(n)`).

    python examples/few_shot_parallel_sampling.py --url http://127.0.0.1:30000 [-n 8] [--shots 16]

The prompt (instructions plus `--shots` worked examples, several hundred tokens) is the shared
root; the n branches differ only in the few tokens each samples. A sequence-at-a-time decode kernel
reads the whole prompt once per branch at every step; the deft backend reads it once per step.

With the bundled random tiny model the answers are meaningless; the shape is the point.
`main()` returns {"tree": Node, "answers": [n texts], "prompt_chars": int}.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import sglang as sgl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tree_view import Node, connect, format_tree, generated, run_as_command, temperature_arg  # noqa: E402

INSTRUCTIONS = "Answer each arithmetic question with a number. Think step by step if needed.\n\n"


def few_shot_prompt(shots: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts = [INSTRUCTIONS]
    for _ in range(shots):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        parts.append(f"Question: What is {a} + {b} times {c}?\n"
                     f"Answer: {b} times {c} is {b * c}, plus {a} is {a + b * c}.\n\n")
    return "".join(parts)


@sgl.function
def parallel_sampling(s, prompt, question, branches=4, max_tokens=8, temp=0.8):
    s += prompt + "Question: " + question + "\nAnswer:"
    s.sync()  # so that fork() commits the shared prompt once (see tree_of_thought.py)
    forks = s.fork(branches)
    forks += sgl.gen("answer", max_tokens=max_tokens, temperature=temp)
    return [generated(f, "answer") for f in forks.states]


def main(url="http://127.0.0.1:30000", n=4, shots=12, question="What is 23 + 41 times 3?",
         max_tokens=8, temperature=0.8, quiet=False):
    if min(n, max_tokens) < 1 or shots < 0:  # as the command line refuses them
        raise ValueError(f"n={n}, max_tokens={max_tokens}, shots={shots}: n and max_tokens must be at least 1, "
                         "shots at least 0")
    sgl.set_default_backend(connect(url))
    prompt = few_shot_prompt(shots)
    # Argument names of an sgl.function must not collide with `.run()`'s own (n, temperature, ...).
    state = parallel_sampling.run(prompt=prompt, question=question, branches=n,
                                  max_tokens=max_tokens, temp=temperature)
    answers = state.ret_value
    root = Node(f"few-shot prompt ({shots} examples, {len(prompt)} chars) + question", question)
    for i, a in enumerate(answers):
        root.add(f"sample {i + 1}", a)
    if not quiet:
        print(format_tree(root))
    return {"tree": root, "answers": answers, "prompt_chars": len(prompt)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    ap.add_argument("-n", type=int, default=4, help="number of parallel samples")
    ap.add_argument("--shots", type=int, default=12, help="worked examples in the prompt")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--temperature", type=temperature_arg, default=0.8)
    a = ap.parse_args()
    if min(a.n, a.max_tokens) < 1 or a.shots < 0:
        ap.error("-n and --max-tokens must be at least 1, --shots at least 0")
    run_as_command(main, url=a.url, n=a.n, shots=a.shots, max_tokens=a.max_tokens, temperature=a.temperature)
