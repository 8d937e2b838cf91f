"""Sliding-window KV trees on the host: what a full window plan's tree build costs and how much of the windows it
shares, on forks of one cached prompt whose branches have the same or different lengths.

Per case, ``DecodeKVTreeBuilder.build_window`` (the tree a window layer's plan is made from when it is planned in
full; steady steps build nothing) is timed over repeated builds of one decode step's batch (median), and its
``attended_tokens`` (every query's window, what a per-request kernel reads) and ``unique_tokens`` (what the tree
holds: each position once per run that reads it, plus the private nodes) are reported with their ratio:

* ``same_256``: 256 branches of 8 tokens on a 1000-token prompt: every window starts at one place;
* ``distinct_256``: 256 branches of 8-263 tokens: 256 different starts inside the prompt;
* ``mixed_64``: 64 branches of 3-9 tokens: 7 starts;
* ``nested_64``: tree of thought: 8 groups of 200 tokens each on the prompt, each forked into 8 branches of 3-73
  tokens: 8 starts in the prompt, each shared by one branch of every group (runs that part a group's branches read
  its 200 tokens again: ``_run_skips`` counts them).

With ``--steps N``, each case also decodes N steps through a window ``DecodeStepPlanner`` (full plans with room,
then steady steps that move the windows in place: ``sglang_deft/step_planner.py``) and reports the KV positions its
plans read in all (``steady_read_tokens``; ``steady_steps`` of them steady) against what a fresh tree would read at
every step (``fresh_read_tokens``). Steady steps keep the runs of their full plan while every window start moves on,
and each run's shared part shrinks; a fresh tree may then choose other runs.

Run: ``python benchmarks/bench_window_tree.py [--window 512] [--repeats 50] [--steps 130]`` (the CPU's KV slots; on a
CUDA host the gather of the slots runs on the device: ``--device cuda``; on the CPU it sets ``TRITON_INTERPRET=1`` for
the steady steps' update kernel).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # radix_sim: real SGLang memory objects on the host

PROMPT = 1000
GROUP_TOKENS = 200
# Each case: the branches' own tokens, and how many groups (each GROUP_TOKENS on the prompt) fork into them.
CASES = {"same_256": ([8] * 256, 1), "distinct_256": (list(range(8, 264)), 1),
         "mixed_64": ([3 + i % 7 for i in range(64)], 1), "nested_64": ([3 + 10 * i for i in range(8)], 8)}


def fork(branch_tokens: list[int], groups: int, prompt_len: int, steps: int):
    """A radix simulator holding a cached prompt forked into ``branch_tokens`` (under each of ``groups`` cached
    groups of GROUP_TOKENS when more than one), room for ``steps`` decode steps, and the branches prefilled."""
    from radix_sim import RadixSim

    B = groups * len(branch_tokens)
    group_tokens = GROUP_TOKENS if groups > 1 else 0
    sim = RadixSim(kv_slots=prompt_len + groups * (group_tokens + sum(branch_tokens)) + (steps + 2) * B + 64,
                   max_reqs=B, max_context=prompt_len + group_tokens + max(branch_tokens) + steps + 8)
    prompt = sim.tokens(prompt_len)
    sim.run_to_cache(prompt)
    ids = []
    for _ in range(groups):
        group = prompt + (sim.tokens(group_tokens) if group_tokens else [])
        if group_tokens:
            sim.run_to_cache(group)
        ids += [group + sim.fresh(n) for n in branch_tokens]
    return sim, sim.prefill([sim.new_req(i) for i in ids])


def run_case(branch_tokens: list[int], window: int, repeats: int, device: torch.device, groups: int = 1) -> dict:
    from sglang_deft.kv_tree_builder import DecodeKVTreeBuilder

    sim, reqs = fork(branch_tokens, groups, PROMPT, 0)
    seq_lens = sim.prepare_decode(reqs)
    builder = DecodeKVTreeBuilder(sim.req_to_token.to(device))
    built = builder.build_window(reqs, seq_lens, window)  # the radix part is kept from here on, as in a server
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        built = builder.build_window(reqs, seq_lens, window)
        _sync(device)  # the build's gathers on a GPU are asynchronous: host and device time, both
        times.append(1e6 * (time.perf_counter() - t0))
    # Where the requests' windows start (a request shorter than the window from its first token): the branches'
    # lengths counted these only while every window began inside its branch.
    starts = {max(0, int(n) - window) for n in seq_lens}
    return {"branches": len(reqs), "starts": len(starts), "window": window,
            "build_us": round(statistics.median(times), 1), "attended_tokens": built.attended_tokens,
            "unique_tokens": built.unique_tokens, "ratio": round(built.attended_tokens / built.unique_tokens, 3)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steady_reads(branch_tokens: list[int], window: int, steps: int, device: torch.device,
                 prompt_len: int = PROMPT, groups: int = 1) -> dict:
    """KV positions read over ``steps`` decode steps of one fork through a window step planner, and by fresh trees."""
    from sglang_deft.kernels import TreeDecodePlanner
    from sglang_deft.kv_tree_builder import DecodeKVTreeBuilder
    from sglang_deft.step_planner import SLACK_TOKENS, DecodeStepPlanner
    from sglang_deft.tree_attention import PlanLimits, new_graph_plan

    sim, reqs = fork(branch_tokens, groups, prompt_len, steps)
    B = len(reqs)
    # The shapes of attention do not change the tree or the plan's reads; small heads keep the buffers small.
    heads, kv_heads, head_dim = 8, 2, 16
    buffers = new_graph_plan(PlanLimits(max_items=16 * B + 64, max_partials=64 * B + 256), B,
                             B * (window + 2 * SLACK_TOKENS) + 1, heads, kv_heads, head_dim, torch.float32, device)
    planner = DecodeStepPlanner(DecodeKVTreeBuilder(sim.req_to_token.to(device)),
                                TreeDecodePlanner(heads, kv_heads, head_dim, kv_dtype=torch.float32), buffers,
                                window=window)
    read = fresh = steady = 0
    for _ in range(steps):
        seq_lens = sim.prepare_decode(reqs)
        planner.builder.req_to_token.copy_(sim.req_to_token)
        step = planner.plan(reqs, seq_lens, B)
        read, steady = read + step.unique_tokens, steady + step.steady
        fresh += DecodeKVTreeBuilder(sim.req_to_token).build_window(reqs, seq_lens, window).unique_tokens
        sim.finish_decode(reqs)
    return {"steps": steps, "steady_steps": steady, "steady_read_tokens": read, "fresh_read_tokens": fresh,
            "read_ratio": round(read / fresh, 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=0, help="also decode this many steps through a window step planner")
    args = p.parse_args(argv)
    # (each failed only after the first case was built: no median of 0 repeats, a division by 0 steps, the
    # builder's own error for a window under 1)
    if args.window < 1:
        p.error("--window must be at least 1 token")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.steps < 0:
        p.error("--steps must be at least 0")
    if torch.device(args.device).type == "cpu":
        # The steady steps' kernel (kernels/tail_update.py) runs on CPU tensors only in Triton's interpreter, which
        # Triton chooses as the kernels are defined: before sglang_deft.kernels is imported (by the step planner).
        os.environ["TRITON_INTERPRET"] = "1"
    if not torch.cuda.is_available():  # SGLang importable without CUDA, as in the tests
        import sglang_deft.cpu_compat

        sglang_deft.cpu_compat.install()
    for name, (branch_tokens, groups) in CASES.items():
        r = run_case(branch_tokens, args.window, args.repeats, torch.device(args.device), groups)
        print(f"{name:>13}: {r['branches']} branches, {r['starts']} starts, window {r['window']}: build "
              f"{r['build_us']} us, attended {r['attended_tokens']}, unique {r['unique_tokens']}, "
              f"ratio {r['ratio']}", flush=True)
        if args.steps:
            r = steady_reads(branch_tokens, args.window, args.steps, torch.device(args.device), groups=groups)
            print(f"{'':>13}  {r['steps']} steps ({r['steady_steps']} steady): read {r['steady_read_tokens']}, "
                  f"fresh trees {r['fresh_read_tokens']}, ratio {r['read_ratio']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
