"""Host time of the deft backend's per-step work, outside a server: what ``plan_host_us`` in the
server's sharing line measures, broken down.

Per decode step (graph replay or eager) the backend calls ``DecodeStepPlanner.plan``: a full plan
(KV tree from the radix tree, plan into the fixed buffers, room after every tail) or a steady step
(the last plan updated on the device). This script makes the same call on the batches of
``bench_e2e.py``'s cases, driven through real SGLang memory objects (``tests/radix_sim.py``: radix
cache, request-to-token pool, requests), checks what some steps' plans read, and times the calls
(medians of steady steps and of full plans, and the mean over the timed steps, what ``plan_host_us``
averages over a server's steps; the warm-up steps, the batch's first full plan among them, are not
timed, so over a long decode the server's mean is this one plus that plan's share):

* ``idle``: the device has nothing queued;
* ``busy`` (CUDA only): a ~3 ms device kernel is queued first, as in the server, where the previous
  step is still running while the next one is planned. A host-to-device copy that waits for the
  device shows up here.

``--window W``: a model with sliding-window layers of W tokens (the backend's ``window_tokens``): each step also
plans the window layers' step as the backend does (a step planner of its own, ``window=W``, into buffers of its
own: full plans and steady steps that move the windows on the device), timed apart (``window_steady_us``,
``window_full_us``, ``window_mean_us``); and, for comparison in the same run, the window tree built and planned in
full (``window_replan_us``: what the backend did every step before its window plans took steady steps). After
the full plan and for the batch's rows, as an eager step does; before a CUDA-graph replay the backend plans it
first and for the padded rows: the same work.

Run: ``python benchmarks/bench_step_host.py [--device cuda] [--window W] [--out DIR]`` (on a CPU it sets
``TRITON_INTERPRET=1`` for the steady steps' kernel; the device ops run on the host, so only the Python/numpy part
means anything).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # radix_sim: real SGLang memory objects on the host
sys.path.insert(0, str(REPO / "benchmarks"))  # card_tag, report_files
from card_tag import tag_from_name  # noqa: E402
from report_files import commit_label, write_replacing  # noqa: E402  (after the path it is found on)


CASES = {  # key: (shared prefix tokens, branches, private tokens per branch) as in bench_e2e.py
    "p16k_64": (16000, 64, 8),
    "p4k_64": (4000, 64, 8),
    "p1k_256": (1000, 256, 8),
    "nosharing_64x2k": (0, 64, 2048),
}
HEADS = (32, 8, 128)  # llama3-8b: q heads, kv heads, head_dim
MAX_BS = 256  # --cuda-graph-max-bs on the H200


def make_batch(prefix: int, branches: int, private: int, steps: int):
    from radix_sim import RadixSim

    room = 64  # past the last step: a full row would cut the steady steps' room short
    sim = RadixSim(max_reqs=branches, max_context=prefix + private + steps + room,
                   kv_slots=prefix + branches * (private + steps + room))
    prompt = sim.tokens(prefix)
    if prefix:
        sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.fresh(private)) for _ in range(branches)])
    return sim, reqs


def run_case(key: str, device: torch.device, steps: int, warmup: int, busy: bool, window: int | None = None) -> dict:
    from sglang_deft.kernels import TreeDecodePlanner
    from sglang_deft.kernels.reference import plan_kv_reads
    from sglang_deft.kv_tree_builder import DecodeKVTreeBuilder
    from sglang_deft.step_planner import SLACK_TOKENS, DecodeStepPlanner
    from sglang_deft.tree_attention import new_graph_plan, plan_graph_step, plan_limits, window_plan_limits

    prefix, branches, private = CASES[key]
    sim, reqs = make_batch(prefix, branches, private, steps + warmup)
    hq, hkv, d = HEADS
    buffers = new_graph_plan(plan_limits(MAX_BS, hq, hkv, device), MAX_BS, sim.kv_slots, hq, hkv, d,
                             torch.bfloat16, device)
    r2t = sim.req_to_token.to(device)
    # The backend's: tree builder + planner writing the CUDA graphs' buffers, steady steps in place.
    planner = TreeDecodePlanner(hq, hkv, d)
    step_planner = DecodeStepPlanner(DecodeKVTreeBuilder(r2t), planner, buffers)
    if window is not None:  # the backend's window buffers, and a replan's (as before steady window steps)
        window_planner = DecodeStepPlanner(DecodeKVTreeBuilder(r2t), planner, new_graph_plan(
            window_plan_limits(plan_limits(MAX_BS, hq, hkv, device), MAX_BS), MAX_BS,
            MAX_BS * (window + 2 * SLACK_TOKENS) + 1, hq, hkv, d,
            torch.bfloat16, device), window=window)
        replan_builder = DecodeKVTreeBuilder(r2t)
        replan_buffers = new_graph_plan(window_plan_limits(plan_limits(MAX_BS, hq, hkv, device), MAX_BS), MAX_BS,
                                        MAX_BS * window, hq, hkv, d,
                                        torch.bfloat16, device)
    times = {True: [], False: []}  # steady steps, full plans
    window_times = {True: [], False: []}
    replan_times = []
    for step in range(steps + warmup):
        seq_lens = sim.prepare_decode(reqs)
        r2t.copy_(sim.req_to_token)  # the server's table lives on the device (not timed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            if busy:
                torch.cuda._sleep(6_000_000)  # ~3 ms at H200 clocks: the previous step, still running
        t0 = time.perf_counter()
        planned = step_planner.plan(reqs, seq_lens, branches)
        t1 = time.perf_counter()
        if planned is None:
            raise RuntimeError(f"{key}: the step does not fit the plan buffers")
        if window is not None:
            window_step = window_planner.plan(reqs, seq_lens, branches)
            t2 = time.perf_counter()
            built = replan_builder.build_window(reqs, seq_lens, window, kv_out=replan_buffers.kv_indices)
            replanned = plan_graph_step(replan_buffers, built.tree, branches, torch.bfloat16, planner)
            t3 = time.perf_counter()
            if window_step is None or replanned is None:
                raise RuntimeError(f"{key}: the window tree does not fit its plan buffers")
        if step in (0, 1, steps + warmup - 1):  # what the plans read: each query's row (its window), once
            reads = plan_kv_reads(planned.plan)
            window_reads = [plan_kv_reads(p) for p in (window_step.plan, replanned)] if window is not None else []
            for b, (req, n) in enumerate(zip(reqs, seq_lens.tolist())):
                row = sim.req_to_token[req.req_pool_idx, :n].tolist()
                if sorted(reads[b]) != sorted(row):
                    raise AssertionError(f"{key} step {step}: query {b} does not read its row once")
                if any(sorted(r[b]) != sorted(row[-window:]) for r in window_reads):
                    raise AssertionError(f"{key} step {step}: query {b} does not read its window once")
        if step >= warmup:
            times[planned.steady].append(1e6 * (t1 - t0))
            if window is not None:
                window_times[window_step.steady].append(1e6 * (t2 - t1))
                replan_times.append(1e6 * (t3 - t2))
        sim.finish_decode(reqs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    row = {"case": key, "batch": branches, "kv_tokens": planned.unique_tokens,
           "mode": "busy" if busy else "idle", "checked_reads": True, **_medians(times, ""), "window": window}
    if window is not None:
        row.update(_medians(window_times, "window_"), window_replan_us=round(statistics.median(replan_times), 1))
    return row


def _medians(times: dict, prefix: str) -> dict:
    """Steady and full steps' counts and medians, and the mean over both (``times``: us by steady flag)."""
    med, every = statistics.median, times[True] + times[False]
    return {f"{prefix}steady_steps": len(times[True]), f"{prefix}full_steps": len(times[False]),
            f"{prefix}steady_us": round(med(times[True]), 1) if times[True] else None,
            f"{prefix}full_us": round(med(times[False]), 1) if times[False] else None,
            f"{prefix}mean_us": round(statistics.fmean(every), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--window", type=int, default=None, metavar="W",
                   help="sliding-window layers attending W tokens: also time each step's window plan, and a replan")
    p.add_argument("--out", type=Path, default=None,
                   help="writes step_host[_window]_<card>.json there (the card as card_tag.py names it: h200, ...; "
                        "cpu)")
    args = p.parse_args(argv)
    keys = [key.strip() for key in args.cases.split(",") if key.strip()]
    unknown = [key for key in keys if key not in CASES]
    if unknown or not keys:  # checked before any case runs, not at the first unknown one after the others
        p.error(f"--cases {args.cases!r}: {'unknown ' + ', '.join(unknown) if unknown else 'no case'}; "
                f"the cases are {', '.join(CASES)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    if args.window is not None and args.window < 1:
        p.error("--window must be at least 1 token")
    device = torch.device(args.device)
    if device.type == "cpu":
        # The steady steps' kernel (kernels/tail_update.py) runs on CPU tensors only in Triton's interpreter, which
        # Triton chooses as the kernels are defined: before sglang_deft.kernels is imported (run_case).
        os.environ["TRITON_INTERPRET"] = "1"
    if not torch.cuda.is_available():  # SGLang importable without CUDA, as in the tests
        import sglang_deft.cpu_compat

        sglang_deft.cpu_compat.install()
    # A run of some cases is named for them: it replaced a whole run's file under the same name.
    subset = "" if keys == list(CASES) else "_" + "_".join(keys)
    # This process times on the GPU, so torch names the card --device picked (nvidia-smi may count GPUs otherwise).
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    name = (f"step_host{'_window' if args.window else ''}{subset}_"
            f"{(tag_from_name(gpu_name) or 'cuda') if device.type == 'cuda' else 'cpu'}.json")
    rows = []
    report = {"device": gpu_name,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit_label(), "complete": False,
              "argv": sys.argv[1:] if argv is None else list(argv), "cases": keys, "steps": args.steps,
              "warmup": args.warmup, "window": args.window, "rows": rows}
    for key in keys:
        for busy in ([False, True] if device.type == "cuda" else [False]):
            r = run_case(key, device, args.steps, args.warmup, busy, args.window)
            rows.append(r)
            print(f"{r['case']:>16} B={r['batch']:<4} {r['mode']:<4} steady {r['steady_us']} us "
                  f"x{r['steady_steps']}, full {r['full_us']} us x{r['full_steps']}, mean {r['mean_us']} us"
                  + (f"; window plan: steady {r['window_steady_us']} us x{r['window_steady_steps']}, full "
                     f"{r['window_full_us']} us x{r['window_full_steps']}, mean {r['window_mean_us']} us, planned "
                     f"in full every step {r['window_replan_us']} us" if args.window else ""), flush=True)
            _write(args.out, name, report)  # after every row: gpu_session.sh's timeout keeps what was measured
    report["complete"] = True
    _write(args.out, name, report)
    return 0


def _write(out: Path | None, name: str, report: dict) -> None:
    """The report as ``name`` in ``out`` (if given), whole or not at all (``report_files.write_replacing``)."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    write_replacing(out / name, json.dumps(report, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
