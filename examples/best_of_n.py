"""Best-of-n / self-consistency: n sampled reasoning paths, each with a final answer; pick one.

    python examples/best_of_n.py --url http://127.0.0.1:30000 [-n 5]

The question is shared; `fork(n)` samples n short reasoning paths, then each path appends
"Answer:" and generates its final answer (two generations per branch on the branch's own growing
text). The pick is self-consistency: the final answer given by the most paths wins; ties (always,
with a random model) go to the path whose answer has the highest mean token log-probability, which
the server returns with `return_logprob`.

With the bundled random tiny model the text is meaningless; the shape and the selection are the
point. `main()` returns {"tree": Node, "answers": [n final answers], "reasonings": [...],
"scores": [mean logprob per answer], "votes": {answer: count}, "best": index}.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import sglang as sgl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tree_view import Node, connect, format_tree, generated, run_as_command, temperature_arg  # noqa: E402

QUESTION = ("Tom has 3 boxes with 12 apples each. He gives away 9 apples and buys 5 more. "
            "How many apples does he have now?")


def _mean_logprob(state, var: str) -> float:
    meta = state.get_meta_info(var) or {}
    lps = [t[0] for t in meta.get("output_token_logprobs") or [] if t[0] is not None]
    return sum(lps) / len(lps) if lps else float("-inf")


@sgl.function
def self_consistency(s, question, branches=4, max_tokens=8, answer_tokens=4, temp=0.8):
    s += "Question: " + question + "\nLet's think step by step."
    s.sync()  # so that fork() commits the shared prompt once (see tree_of_thought.py)
    forks = s.fork(branches)
    forks += sgl.gen("reasoning", max_tokens=max_tokens, temperature=temp)
    forks += "\nAnswer:" + sgl.gen("answer", max_tokens=answer_tokens, temperature=temp,
                                    return_logprob=True)
    return [(generated(f, "reasoning"), generated(f, "answer"), _mean_logprob(f, "answer"))
            for f in forks.states]


def pick(answers: list[str], scores: list[float]) -> tuple[int, Counter]:
    """Majority vote on the stripped answer; ties broken by the higher mean log-probability."""
    votes = Counter(a.strip() for a in answers)
    best = max(range(len(answers)), key=lambda i: (votes[answers[i].strip()], scores[i], -i))
    return best, votes


def main(url="http://127.0.0.1:30000", n=4, question=QUESTION, max_tokens=8, answer_tokens=4,
         temperature=0.8, quiet=False):
    if min(n, max_tokens, answer_tokens) < 1:  # as the command line refuses them (n=0 ended in max() of nothing)
        raise ValueError(f"n={n}, max_tokens={max_tokens}, answer_tokens={answer_tokens}: each must be at least 1")
    sgl.set_default_backend(connect(url))
    # Argument names of an sgl.function must not collide with `.run()`'s own (n, temperature, ...).
    state = self_consistency.run(question=question, branches=n, max_tokens=max_tokens,
                                 answer_tokens=answer_tokens, temp=temperature)
    paths = state.ret_value
    reasonings = [p[0] for p in paths]
    answers = [p[1] for p in paths]
    scores = [p[2] for p in paths]
    best, votes = pick(answers, scores)

    root = Node("question", question)
    for i, (r, a, sc) in enumerate(paths):
        path = root.add(f"path {i + 1}", r)
        leaf = path.add("answer", a)
        leaf.note = f"votes {votes[a.strip()]}, mean logprob {sc:.2f}" + ("  <- picked" if i == best else "")
    if not quiet:
        print(format_tree(root))
        print(f"\npicked path {best + 1}: {answers[best].strip()!r}")
    return {"tree": root, "answers": answers, "reasonings": reasonings, "scores": scores,
            "votes": dict(votes), "best": best}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    ap.add_argument("-n", type=int, default=4, help="number of sampled paths")
    ap.add_argument("--max-tokens", type=int, default=8, help="reasoning tokens per path")
    ap.add_argument("--answer-tokens", type=int, default=4)
    ap.add_argument("--temperature", type=temperature_arg, default=0.8)
    a = ap.parse_args()
    if min(a.n, a.max_tokens, a.answer_tokens) < 1:
        ap.error("-n, --max-tokens and --answer-tokens must be at least 1")
    run_as_command(main, url=a.url, n=a.n, max_tokens=a.max_tokens, answer_tokens=a.answer_tokens,
                   temperature=a.temperature)
