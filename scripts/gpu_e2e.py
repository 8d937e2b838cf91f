"""GPU end to end: the deft decode backend against SGLang's own decode backends, same requests.

On the GPU host, from the repo root, with the devkit carried along (.kit/); ``scripts/gpu_session.sh e2e``
wraps this with the time limits and log bundling a 10-minute device call needs:

    source .kit/bootstrap.sh && python3 scripts/gpu_e2e.py --out "$OUT" --budget-s 530          # both models
    source .kit/bootstrap.sh && python3 scripts/gpu_e2e.py --out "$OUT" --models 8b              # one of them

Servers (``python -m sglang_deft.launch_server``, one GPU, all ``--attention-backend triton
--disable-cuda-graph``, so prefill/extend is SGLang's triton backend everywhere and only decode differs;
``--cuda-graph`` keeps SGLang's CUDA graphs on in every server instead):
- ``triton``: SGLang's triton decode, the reference;
- ``deft``: ``--decode-attention-backend deft`` (our Triton kernels);
- ``flashinfer``: ``--decode-attention-backend flashinfer``, SGLang's other built-in decode backend
  (``HybridAttnBackend``: FlashInfer decode, triton prefill). It measures the noise floor: how much
  two correct decode kernels differ from each other. If it does not start (e.g. a head_dim FlashInfer
  was not built for), the next of ``--noise-backends`` (``torch_native``) takes its place.
Models: ``tiny`` (the repo's ``models/tiny-llama-deft``, seeded weights with sharp attention; float16 by
default, see below), its variants with real models' attention heads (``TINY_VARIANTS``: ``tiny-d128``,
``tiny-d64``, ``tiny-d256``, ``tiny-gqa7``; everything said of ``tiny`` holds for them), the same under other
model families' code (``FAMILY_VARIANTS``: ``tiny-qwen2``, ``tiny-qwen3``, ``tiny-qwen3-moe``, ``tiny-mixtral``,
``tiny-phi3``), with sliding windows (``WINDOW_VARIANTS``: ``tiny-gemma2``, ``tiny-gemma3``, each with a ``-full``
control; ``tiny-gemma3-global``) and ``8b`` (``models/llama3-8b-shape``, ``--load-format dummy
--skip-tokenizer-init``, bfloat16). Requests (token ids, greedy, chosen-token logprobs and top-10):
a fork (prefix cached first, then k branches in one batch, as ``fork()`` does), a nested fork (each
branch's prompt plus triton's output, forked 2 ways), and an ``n > 1`` request; on ``tiny`` also a
nested ``fork()`` program through sglang.lang (text, reported only).

Criterion (``relative_verdict``; stated in the report), per workload, against the reference ``triton``:
  1. max |logprob_deft - logprob_triton| of the chosen token, over the steps where the two agree so
     far, <= max(K * the same number for flashinfer-vs-triton, LP_FLOOR);
  2. requests whose tokens diverge from triton's: deft's count <= K * flashinfer's count + DIV_FLOOR
     (DIV_FLOOR = max(1, ceil(requests / 8)): counts are small and Poisson-like, so a ratio alone
     would fail on 1 vs 3);
  3. every deft divergence is a near-tie at that noise scale: at the first differing step, the two
     tokens' logprobs differ by <= TIE_FACTOR * (the allowed logprob difference of 1.) in both servers
     (two tokens can swap order when each moves by the allowed difference; a token outside the other
     server's top-10 is no near-tie there: its gap is unknown, so the divergence fails).
  "flashinfer's" numbers are max(the workload's own, the model's over all its workloads, divergences
  as a rate per request) (``--noise-pool model``): a max over 8-16 requests rests on a handful of rare
  rounding flips, and the model-wide figure is the steadier estimate; it never tightens a workload's.
  K = 2, LP_FLOOR = 0.01, TIE_FACTOR = 2. I.e. deft differs from triton no more than SGLang's two
  built-in decode backends differ from each other, up to a factor of 2 (deft merges more partial
  results, in another order). A wrong attention on the tiny model (a missing node, wrong KV slots, a
  bad mask) moves logprobs by O(0.1-1) and flips tokens that are no near-tie: tokens there depend on
  the whole shared prefix (``context_sensitivity``: the fraction of branches whose triton tokens
  change when one early prompt token changes; must be >= 0.5 on tiny). Random dummy weights make
  attention almost uniform (DESIGN.md), so on ``8b`` the criterion shows the deft path runs at
  Llama-3-8B shapes and agrees numerically, not that it attends to the right tokens.
  Two limits of the workloads: ``n_gt_1`` samples greedily, so its n copies are the same tokens over the same
  KV, and a backend that swapped the copies' KV would give the same logprobs (it checks that the path serves
  n > 1, not which copy reads which slots; the forks check that); and ``context_sensitivity`` counts
  branches whose tokens change from the first generated one, which the prefill (triton in every server)
  decides, so it shows the tiny model reads its context, not by itself that decode attention does;
  ``decode_context_sensitivity`` (reported, not required) counts the branches that keep their first token
  under the changed prefix and still part later, which only the decode steps' attention over it can do.
  The absolute check of earlier runs (|diff| <= --atol while tokens agree, near-ties within --tie-tol with both
  tokens in both servers' top-k) is still reported (``absolute_ok``); it decides only when no noise server started,
  and then at most k x the divergence floor of distinct requests may diverge (Criterion.absolute_div_allowed).

Why float16 for tiny: the differences are rounding of the attention output amplified by the sharp tiny
model. In bf16 (8 significant bits) deft-vs-triton measured 0.05-0.11 with 4-8 divergences per workload
(H200, 2026-11-29), so greedy paths split early and fewer steps are compared; in fp16 (11 bits) the same
run gave 0.012-0.020 and 0-1 divergences: every step is compared and the band K * noise that a bug
must stay inside is ~5x narrower. ``--tiny-dtype bfloat16`` keeps the bf16 run (float32 is impossible
on CUDA: sgl_kernel's rmsnorm has no float32).

Kernel path vs reference path in the same server (``kernel_check`` per model): the deft server runs
with ``SGLANG_DEFT_VERIFY_EVERY=--kernel-check-every`` (16), so every 16th eager decode step computes
the first attention layer (and the first sliding-window one, in a model with both) with the Triton
kernels and with the fp32 PyTorch reference on the same inputs and logs the difference
(``sglang_deft.kernel_check``; its reference reads each request's KV from SGLang's ``req_to_token``, so a wrong
KV tree shows as a kernel error does). Reported with its tolerance, two roundings of the output to the
model's dtype at each check's magnitude and ``ROW_FACTOR`` roundings of each (query, head) row's at its own
(``within_tolerance``). It decides ``ok`` for models whose tokens cannot
(the 8b shape's dummy weights: attention outputs of ~1e-7, every logprob the same whatever the attention); on a GPU
a model is also not ok if the deft server logged no stage-1 kernel (the Triton kernels did not decode).

Time: the servers of a model start concurrently (``--parallel model``; ``all`` starts both models'
six at once, as ``scripts/gpu_session.sh e2e`` does; startup is mostly imports and JIT compiles, and
FlashInfer/Triton caches are file-locked), each with a capped KV pool (``--max-total-tokens``) and
``--mem-fraction-static 0.8``: SGLang sizes the pool from free memory before and after loading
weights (rest = after - (1 - 0.8) x before), which the other servers' allocations can shrink; 0.8
leaves that far above the cap (3 x 8b servers take ~60-90 GB of the H200's 139). Each server's
first few decode steps run right after it is ready, so a noise backend that starts but cannot
decode falls back too. Workload ``seconds`` are informational (other servers may be busy meanwhile).
``--budget-s`` skips a model that would not finish in time (the JSON says so). Writes
``$OUT/gpu_e2e.json`` after every server start and workload, the servers' logs under ``--log-dir``
(default ``$OUT/logs``) and their process-group ids in ``server_pgids.txt`` there (for the session
script to clean up after a hard kill). Exits 1 if a model fails or is skipped.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_report_files():
    """benchmarks/report_files.py by file (this script runs from anywhere; the benchmarks are no package)."""
    name = "deft_bench_report_files"  # the name bench_kernels registers it under: one module per process
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "report_files.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


REPORT_FILES = _load_report_files()
write_replacing = REPORT_FILES.write_replacing  # (bench_e2e writes through it too)


TOP_K = 10
# The prompts' seed; more seeds (--workload-seeds) run the same workloads on other prompts against the same servers,
# so that a divergence count of a few requests (the fork's 8) can be read against more of them.
WORKLOAD_SEEDS = (1234,)
SEED_MIN_S = 60  # budget left under which no further seed starts (a tiny model's three workloads take ~5 s)

MODELS = {
    "tiny": dict(path=REPO / "models" / "tiny-llama-deft", extra=[], vocab=300, prefix=300, branches=8,
                 new_tokens=32, nested_tokens=16, tokenizer=True, max_total_tokens=16384, min_budget_s=100,
                 sharp=True),
    "8b": dict(path=REPO / "models" / "llama3-8b-shape",
               extra=["--dtype", "bfloat16", "--load-format", "dummy", "--skip-tokenizer-init"], vocab=128000,
               prefix=2000, branches=16, new_tokens=32, nested_tokens=16, tokenizer=False,
               max_total_tokens=32768, min_budget_s=210),
}
# The tiny model with real models' attention heads (q heads, kv heads, head_dim), generated at the start of a
# run by scripts/make_tiny_model.py (same seed, scales and tokenizer; a few MB, so not shipped). The bundled
# model's head_dim 32 runs deft's portable Triton kernel on the GPU; these run the Hopper kernel that serves
# real models, under the same context-sensitive check: Llama-3-8B's heads (issue 3's shape), Llama-3.2-1B's,
# a Gemma-like head_dim 256 and Qwen2.5-7B's GQA group of 7 (hidden 112: a multiple of its 28 q heads,
# which transformers requires).
TINY_VARIANTS = {"tiny-d128": (32, 8, 128), "tiny-d64": (32, 8, 64), "tiny-d256": (16, 8, 256),
                 "tiny-gqa7": (28, 4, 128, 112)}
# The same tiny model under other families' model code (make_tiny_model.ARCHITECTURES), each with a real
# model's heads: Qwen2.5-7B's (q/k/v biases), Qwen3-8B's (q/k RMSNorm), Qwen3-30B-A3B's (mixture of experts
# in place of the MLP). SGLang's Mixtral derives head_dim from the hidden size (hidden / q heads), so Mixtral's
# 32 / 8 heads of 128 would need a hidden size of 4096; its variant keeps GQA 4 at 8 / 2 heads of 64 (the
# Hopper kernel serves 64 as well). Phi-3-mini's 32 / 32 heads of 96 (no GQA; a head dim the Hopper kernel pads to
# 128). Same prompts, criterion and context-sensitivity check as tiny.
FAMILY_VARIANTS = {"tiny-qwen2": ("qwen2", (28, 4, 128, 112)), "tiny-qwen3": ("qwen3", (32, 8, 128)),
                   "tiny-qwen3-moe": ("qwen3_moe", (32, 4, 128)), "tiny-mixtral": ("mixtral", (8, 2, 64, 512)),
                   "tiny-phi3": ("phi3", (32, 32, 96))}
# Models with sliding-window layers: Gemma-2's code with Gemma-2-9B's heads (16 / 8 of 256), every even layer
# attending its last 64 tokens, so that on the 300-token prompts each query's window starts inside the shared
# prefix. deft attends a window of w + 1 tokens (SGLang's sliding_window_size w), as SGLang's triton prefill,
# FlashInfer's window_left and Hugging Face's models do; SGLang 0.5.10's triton decode reads one token fewer
# (update_sliding_window_buffer: min(seq_len, w)), so the reference server's decode window is made its prefill's
# (REFERENCE_WINDOW_PATCH, eager). No noise server: torch_native ignores windows, and FlashInfer's decode parted
# from both triton's and deft's on Gemma-2 without any window (tiny-gemma2-full below, H200, f7c37d7: logprobs
# 0.15-0.23 away, divergences that are no near-ties), so the absolute check decides (``criterion_mode``).
# ``tiny-gemma2-full`` is its control: the same model with a window no sequence reaches, so deft's sliding-window
# plan is the full tree and the relative criterion, with torch_native as the noise server (which no window changes
# there), checks everything of Gemma-2's path but the windows.
# tiny-gemma3 is the same under Gemma-3's code (Gemma-3-12B's heads, also 16 / 8 of 256; its windowed layers 0 and 2)
# with its control; ``tiny-gemma3-global`` has every layer global (no window), which the CPU can serve
# (tests/test_e2e_cpu_families.py): Gemma-3's model code around deft's decode (q/k RMSNorm, no soft caps, layers
# of SGLang's DECODER_BIDIRECTIONAL type) against SGLang's torch_native decode.
WINDOW_VARIANTS = {"tiny-gemma2": ("gemma2", (16, 8, 256)), "tiny-gemma3": ("gemma3", (16, 8, 256))}
REFERENCE_WINDOW_PATCH = REPO / "scripts" / "reference_window"
REFERENCE_WINDOW_MARKER = "sglang-deft reference_window: triton decode reads its prefill's window"
for _name, _heads in TINY_VARIANTS.items():
    MODELS[_name] = dict(MODELS["tiny"], path=None, heads=_heads)
for _name, (_architecture, _heads) in FAMILY_VARIANTS.items():
    MODELS[_name] = dict(MODELS["tiny"], path=None, heads=_heads, architecture=_architecture)
# FlashInfer's cascade merge (VariableLengthMergeStates) has no head_dim 96: its decode server started, then died in
# the fork workload (H200, 023dbbf). torch_native is the noise server there.
MODELS["tiny-phi3"]["noise_unsupported"] = ("flashinfer",)
for _name, (_architecture, _heads) in WINDOW_VARIANTS.items():
    MODELS[_name] = dict(MODELS["tiny"], path=None, heads=_heads, architecture=_architecture,
                         reference_window_patch=True, noise_unsupported=("flashinfer", "torch_native", "triton"))
    MODELS[_name + "-full"] = dict(MODELS["tiny"], path=None, heads=_heads, architecture=_architecture,
                                   config=dict(sliding_window=4096), noise_unsupported=("flashinfer",))
MODELS["tiny-gemma3-global"] = dict(MODELS["tiny"], path=None, heads=WINDOW_VARIANTS["tiny-gemma3"][1],
                                    architecture="gemma3", config=dict(layer_types=["full_attention"] * 3))


def variant_dir(name: str) -> Path:
    return Path(tempfile.gettempdir()) / "sglang_deft_models" / name


def materialize_model(name: str, spec: dict) -> Path:
    """The model's directory; a variant of the tiny model is written there first (deterministic, ~5 s)."""
    if spec.get("heads") is None:
        return spec["path"]
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_tiny_model
    finally:
        sys.path.pop(0)
    return make_tiny_model.write_variant(variant_dir(name), *spec["heads"],
                                         architecture=spec.get("architecture", "llama"),
                                         config=spec.get("config"))


# --sampling-backend pytorch: FlashInfer's top-k/top-p sampler would be JIT-compiled mid-program (~80 s) on
# a fresh GPU host; measured and explained at COMMON_ARGS in benchmarks/bench_e2e.py.
GPU_ARGS = ["--attention-backend", "triton", "--disable-cuda-graph", "--grammar-backend", "none",
            "--log-level", "info", "--decode-log-interval", "8", "--mem-fraction-static", "0.8",
            "--max-running-requests", "64", "--sampling-backend", "pytorch"]
# CPU smoke run of this script's plumbing (not a GPU result): SGLang's CPU engine, torch_native prefill.
CPU_ARGS = ["--device", "cpu", "--dtype", "float32", "--attention-backend", "torch_native", "--grammar-backend",
            "none", "--log-level", "info", "--decode-log-interval", "8", "--max-running-requests", "16",
            "--sleep-on-idle"]
REFERENCE = "triton"


# --------------------------------------------------------------------------------------------------
# Criterion: pure functions over token ids and logprobs (tests/test_gpu_e2e_criterion.py)
# --------------------------------------------------------------------------------------------------
@dataclass
class Seq:
    """One generated sequence: token ids, the chosen tokens' logprobs, and per step {token: logprob}
    of the server's top-k."""
    ids: list[int]
    lps: list[float]
    tops: list[dict[int, float]]
    prompt: tuple[int, ...] | None = None  # the request's input ids, where known: repeats are merged by it


def parse_response(resp: dict, prompt: tuple[int, ...] | None = None) -> Seq:
    meta = resp["meta_info"]
    return Seq(ids=list(resp["output_ids"]), lps=[x[0] for x in meta["output_token_logprobs"]],
               tops=[{x[1]: x[0] for x in (step or [])} for step in meta["output_top_logprobs"]], prompt=prompt)


def request_prompts(payload: dict) -> list[tuple[int, ...]]:
    """Each answer's prompt: a batch's prompts in order, or one prompt ``n`` times (n > 1 answers it with n samples;
    greedy, they are repeats). A batch with n > 1, whose answers' order this would have to assume, is refused."""
    ids, n = payload["input_ids"], payload["sampling_params"].get("n", 1)
    prompts = [ids] if ids and isinstance(ids[0], int) else ids
    if n > 1 and len(prompts) > 1:
        raise ValueError("request_prompts: a batch of prompts with n > 1")
    return [tuple(p) for p in prompts for _ in range(n)]


@dataclass
class PairStats:
    """One request, one server against the reference."""
    steps: int
    diverged_at: int | None
    diffs: list[float]                 # |logprob - reference logprob| at each step before diverged_at
    tie_gap: float | None = None       # at diverged_at: max over both servers of (own top - other's token)
    tie_in_top_k: bool | None = None   # both tokens in both top-k lists (else tie_gap is a lower bound)
    # at diverged_at, both tokens in both top-k: the larger |logprob - reference logprob| of either token
    tie_lp_diff: float | None = None

    @property
    def steps_compared(self) -> int:
        return len(self.diffs)

    @property
    def max_diff(self) -> float:
        return max(self.diffs, default=0.0)


def _gap(lp_chosen: float, top: dict[int, float], other_token: int) -> tuple[float, bool]:
    """How far below this server's chosen token the other server's token is, in this server's logprobs.
    Not in the top-k: the smallest gap it can have (to the k-th logprob)."""
    if other_token in top:
        return lp_chosen - top[other_token], True
    return (lp_chosen - min(top.values()) if top else math.inf), False


def _lp_diff(a: float | None, b: float | None) -> float:
    """|a - b|, or inf where either is no finite logprob (None: JSON's null, which SGLang writes for NaN; NaN): every
    check is 'diff > limit', which a NaN passed, and max() kept a NaN that came first and hid the errors after it."""
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b)


def compare_pair(x: Seq, ref: Seq) -> PairStats:
    steps = min(len(x.ids), len(ref.ids))
    diffs = []
    for t in range(steps):
        if x.ids[t] != ref.ids[t]:
            gap_ref, in_ref = _gap(ref.lps[t], ref.tops[t], x.ids[t])
            gap_x, in_x = _gap(x.lps[t], x.tops[t], ref.ids[t])
            # The same context until here: each server's logprob of either token is the other's, within what a
            # near-tie allows (_tie_problem). Only the gap between the two tokens was checked, which a server whose
            # whole distribution was off at this step passed as long as its own two tokens were close.
            tie_lp = (max(_lp_diff(x.tops[t][ref.ids[t]], ref.lps[t]), _lp_diff(x.lps[t], ref.tops[t][x.ids[t]]))
                      if in_ref and in_x else None)
            return PairStats(steps, t, diffs, max(gap_ref, gap_x), in_ref and in_x, tie_lp)
        diffs.append(_lp_diff(x.lps[t], ref.lps[t]))
    return PairStats(steps, None, diffs)


def summarize(stats: list[PairStats]) -> dict:
    diffs = [d for s in stats for d in s.diffs]
    gaps = [s.tie_gap for s in stats if s.diverged_at is not None]
    tie_lps = [s.tie_lp_diff for s in stats if s.tie_lp_diff is not None]
    return {
        "requests": len(stats), "steps": sum(s.steps for s in stats),
        "steps_compared": sum(s.steps_compared for s in stats),
        "divergences": sum(s.diverged_at is not None for s in stats),
        "divergences_outside_top_k": sum(s.diverged_at is not None and not s.tie_in_top_k for s in stats),
        "max_abs_logprob_diff": max(diffs, default=0.0),
        "mean_abs_logprob_diff": sum(diffs) / len(diffs) if diffs else 0.0,
        "max_tie_gap": max(gaps, default=None),
        # what the near-tie rule's second half measured: the servers' logprobs of a divergence's two tokens
        "max_tie_logprob_diff": max(tie_lps, default=None),
        "diverged_at": [s.diverged_at for s in stats],
    }


def absolute_failures(stats: list[PairStats], atol: float, tie_tol: float) -> list[str]:
    """The earlier absolute criterion (reported; decides only without a noise server)."""
    out = []
    for i, s in enumerate(stats):
        if s.max_diff > atol:
            t = s.diffs.index(s.max_diff)
            out.append(f"request {i} step {t}: |logprob diff| {s.max_diff:.4f} > atol {atol}")
        if problem := _tie_problem(s, tie_tol):  # as the relative criterion's rule: outside a top-k the gap is unknown
            out.append(f"request {i} step {s.diverged_at}: not a near-tie ({problem}; tie_tol {tie_tol})")
    return out


@dataclass(frozen=True)
class Criterion:
    k: float = 2.0
    lp_floor: float = 0.01
    div_floor_frac: float = 0.125
    tie_factor: float = 2.0
    noise_pool: str = "model"  # "model": noise = max(this workload's, all workloads' of the model)
    # The largest logprob difference a noise server may show and still set the band, by the model's dtype: two
    # correct built-in backends measured at most 0.204 in bf16 (the tiny variants, e2e_correctness_heads_bf16_*) and
    # 0.094 in fp16 (tiny-mixtral, e2e_correctness_families_h200_f152b1c.json; tiny-phi3 0.084). One ceiling for both
    # let a noise server 0.23 off in fp16 (FlashInfer on Gemma-2, which parts from triton and deft there) set the band.
    # fp32 (the CPU smoke runs) takes fp16's.
    noise_lp_max: float = 0.3  # bfloat16
    noise_lp_max_fp16: float = 0.15

    def for_dtype(self, dtype: str) -> "Criterion":
        """This criterion for a model served in ``dtype``: its noise ceiling (``noise_lp_max``) is that dtype's."""
        return self if dtype == "bfloat16" else dataclasses.replace(self, noise_lp_max=self.noise_lp_max_fp16)

    def div_floor(self, requests: int) -> int:
        return max(1, math.ceil(self.div_floor_frac * requests))

    def absolute_div_allowed(self, requests: int) -> int:
        """Distinct requests that may diverge where no noise server ran (the absolute verdict): k x the floor, where
        the relative verdict allows k x the noise server's count + the floor (with no count measured, the floor
        counted k times: a choice). Without it any number of near-tie flips passed; in the windowed models' committed
        runs (no usable noise server) a workload's passes had at most 2 divergences (2 of 8 fork requests)."""
        return math.ceil(self.k * self.div_floor(requests))

    def describe(self) -> str:
        return (f"per workload, against triton decode: (1) max |chosen-token logprob diff| while tokens agree <= "
                f"max({self.k:g} x flashinfer-vs-triton's, {self.lp_floor:g}); (2) requests that diverge <= "
                f"{self.k:g} x flashinfer's count + max(1, ceil({self.div_floor_frac:g} x requests)); (3) at each "
                f"divergence both tokens within {self.tie_factor:g} x the allowed logprob diff of each other in "
                f"both servers, and each token's logprob within that of the other server's (near-tie; a token "
                f"outside either server's top-k is no near-tie: its gap is unknown). A logprob that is no finite "
                f"number fails (1). The noise pair must itself pass (3) at its own scale and differ by at most "
                f"{self.noise_lp_max:g} in bfloat16, {self.noise_lp_max_fp16:g} in float16 or float32 (the model's "
                f"dtype), else the noise floor is unusable and the workload fails. A workload with no step compared "
                f"fails. "
                f"'flashinfer' is the noise server: SGLang's flashinfer decode backend "
                f"(or the next of --noise-backends, see noise_backend) on the same requests, the measured "
                f"difference between two correct built-in backends. "
                + ("Noise numbers are max(the workload's, the model's over all workloads; divergences as a rate "
                   "per request) ('noise_pool': 'model')." if self.noise_pool == "model" else
                   "Noise numbers are the workload's own."))


def pooled_noise(noise_by_workload: list[list[PairStats]]) -> dict:
    """The noise pair over all workloads of a model: its max logprob diff and divergences per request."""
    flat = [s for stats in noise_by_workload for s in stats]
    z = summarize(flat)
    return {"max_abs_logprob_diff": z["max_abs_logprob_diff"], "divergences": z["divergences"],
            "requests": len(flat), "divergence_rate": z["divergences"] / max(1, len(flat))}


def _tie_problem(s: PairStats, allowed_gap: float) -> str | None:
    """Why a divergence is no near-tie at ``allowed_gap`` (None: it is one, or there is no divergence): its two
    tokens not known to be within ``allowed_gap`` of each other in both servers (outside a top-k, tie_gap is only a
    lower bound: in a flat top-k any token would pass), or the two servers' logprobs of those tokens further apart
    than that (a distribution off at that step, however close its own two tokens). NaN is never within a bound."""
    if s.diverged_at is None:
        return None
    if not s.tie_in_top_k:
        return f"a token outside the top-k: its gap is at least {s.tie_gap:.4f}, not known"
    if not s.tie_gap <= allowed_gap:
        return f"gap {s.tie_gap:.4f} > {allowed_gap:.4f}"
    if not s.tie_lp_diff <= allowed_gap:
        return f"the servers' logprobs of its two tokens differ by {s.tie_lp_diff:.4f} > {allowed_gap:.4f}"
    return None


def relative_verdict(deft: list[PairStats], noise: list[PairStats], crit: Criterion,
                     pooled: dict | None = None) -> dict:
    """The relative criterion for one workload. ``pooled`` (``pooled_noise`` of the model's workloads)
    raises the noise level to the model's where that is higher: a max over 8-16 requests rests on a
    handful of rare rounding flips, while the model-wide figure (same model, dtype and kind of requests)
    is the better estimate of how far two correct backends drift apart. Never tighter than the workload's own."""
    d, z = summarize(deft), summarize(noise)
    noise_lp, noise_div = z["max_abs_logprob_diff"], float(z["divergences"])
    if pooled is not None:
        noise_lp = max(noise_lp, pooled["max_abs_logprob_diff"])
        noise_div = max(noise_div, pooled["divergence_rate"] * len(deft))
    allowed_lp = max(crit.k * noise_lp, crit.lp_floor)
    allowed_div = round(crit.k * noise_div + crit.div_floor(len(deft)), 3)
    allowed_div = int(allowed_div) if float(allowed_div).is_integer() else allowed_div
    allowed_gap = crit.tie_factor * allowed_lp
    failures = []
    # The band is only as good as the noise server: its own divergences must be near-ties at its own scale
    # and its difference within what two correct backends show, else a broken one would widen the band.
    if z["max_abs_logprob_diff"] > crit.noise_lp_max:
        failures.append(f"noise floor unusable: the noise server's logprob diff {z['max_abs_logprob_diff']:.4f} > "
                        f"{crit.noise_lp_max:g}")
    for i, s in enumerate(noise):
        if problem := _tie_problem(s, allowed_gap):
            failures.append(f"noise floor unusable: noise request {i} step {s.diverged_at} is no near-tie ({problem})")
    if d["max_abs_logprob_diff"] > allowed_lp:
        failures.append(f"logprob diff {d['max_abs_logprob_diff']:.4f} > allowed {allowed_lp:.4f} "
                        f"(noise {z['max_abs_logprob_diff']:.4f})")
    if d["divergences"] > allowed_div:
        failures.append(f"{d['divergences']} divergences > allowed {allowed_div:g} (noise {z['divergences']})")
    for i, s in enumerate(deft):
        if problem := _tie_problem(s, allowed_gap):
            failures.append(f"request {i} step {s.diverged_at}: not a near-tie ({problem})")
    return {"ok": not failures, "failures": failures, "allowed_logprob_diff": allowed_lp,
            "allowed_divergences": allowed_div, "allowed_tie_gap": allowed_gap,
            "deft_max_abs_logprob_diff": d["max_abs_logprob_diff"],
            "noise_max_abs_logprob_diff": z["max_abs_logprob_diff"],
            "distinct_requests": d["requests"], "deft_divergences": d["divergences"], "noise_divergences": z["divergences"],
            "noise_level_used": {"max_abs_logprob_diff": noise_lp, "divergences": round(noise_div, 3),
                                 "pooled": pooled is not None},
            "ratio_logprob_diff": (d["max_abs_logprob_diff"] / noise_lp if noise_lp > 0 else None)}


def common_horizon(deft: list[PairStats], noise: list[PairStats]) -> dict:
    """Both pairs' max diff over the steps where all three servers agree (information, not criterion)."""
    dm = zm = 0.0
    steps = 0
    for a, b in zip(deft, noise):
        h = min(a.steps_compared, b.steps_compared)
        steps += h
        dm = max([dm, *a.diffs[:h]])
        zm = max([zm, *b.diffs[:h]])
    return {"steps": steps, "deft_max_abs_logprob_diff": dm, "noise_max_abs_logprob_diff": zm}


def count_failures(deft: list[Seq], ref: list[Seq], stats: list[PairStats]) -> list[str]:
    """What the pairwise comparison cannot see: it zips the requests and compares up to the shorter
    sequence, so a missing request or a generation cut short (or run on) with the same tokens would pass.
    After a divergence the lengths may differ (the contexts do)."""
    out = [] if len(deft) == len(ref) else [f"{len(deft)} requests answered, the reference {len(ref)}"]
    for i, (x, r, s) in enumerate(zip(deft, ref, stats)):
        if s.diverged_at is None and len(x.ids) != len(r.ids):
            out.append(f"request {i}: {len(x.ids)} tokens, the reference {len(r.ids)}, the same up to there")
    return out


def judge_workload(deft: list[Seq], ref: list[Seq], noise: list[Seq] | None, crit: Criterion,
                   atol: float, tie_tol: float, pooled: dict | None = None) -> dict:
    """The report entry for one workload: deft-vs-triton absolute fields (as in earlier reports), the
    noise pair's, and the verdict (relative when a noise server ran, else absolute). Either fails on
    requests or tokens missing from deft's answer (:func:`count_failures`)."""
    ds = [compare_pair(x, r) for x, r in zip(deft, ref)]
    entry = summarize(ds)
    counts = count_failures(deft, ref, ds)
    if deft and not entry["steps_compared"]:  # every request empty: nothing was compared, which passes nothing
        counts.append("no step compared: every request's answer (or the reference's) is empty")
    abs_fail = counts + absolute_failures(ds, atol, tie_tol)
    entry.update(absolute_ok=not abs_fail, absolute_failures=abs_fail)
    if noise is None:
        # Counted as the relative verdict counts: each distinct request once (n > 1 samples of a prompt are one).
        pairs = distinct_stats(deft, ref)
        distinct = sum(s.diverged_at is not None for s in pairs)
        allowed = crit.absolute_div_allowed(len(pairs))
        fails = abs_fail + ([f"{distinct} divergences > allowed {allowed} without a noise server"]
                            if distinct > allowed else [])
        entry.update(criterion="absolute", ok=not fails, failures=fails, distinct_requests=len(pairs),
                     distinct_divergences=distinct, allowed_divergences=allowed)
        return entry
    ns = [compare_pair(x, r) for x, r in zip(noise, ref)]
    # Repeats count once on both sides (n > 1 greedy samples are one request k times): one near-tie flip of deft's on
    # the one prompt counted k times against an allowance of 1, and one of the noise server's counted k times gave
    # deft k times the allowance.
    verdict = relative_verdict(distinct_stats(deft, ref), distinct_stats(noise, ref), crit, pooled)
    entry.update(criterion="relative", ok=verdict["ok"] and not counts, failures=counts + verdict["failures"],
                 relative=verdict, noise=summarize(ns), common_horizon=common_horizon(ds, ns))
    return entry


def distinct_stats(server: list[Seq], ref: list[Seq]) -> list[PairStats]:
    """One :class:`PairStats` per distinct request (its prompt, where the sequences know it) and (server, reference)
    pair of token sequences, a repeat merged into its first: the ``n_gt_1`` workload's k greedy samples of one prompt
    are one request k times, and counted k times they made the model-wide rate of divergences per request (``pooled_noise``) k times what one request adds, and
    one near-tie flip of deft's k divergences against an allowance of 1. Merged, not dropped: copies with the same
    tokens can still differ in logprobs (each is its own row of the batch), so the merged pair keeps each step's
    largest difference and the widest near-tie gap of them all. Two prompts are two requests whatever their tokens:
    keyed by the tokens alone, fork branches that answered alike (a dummy model's repeated token) were one."""
    groups: dict[tuple, list[PairStats]] = {}
    for x, r in zip(server, ref):
        groups.setdefault((x.prompt, r.prompt, tuple(x.ids), tuple(r.ids)), []).append(compare_pair(x, r))
    return [_worst_of(g) for g in groups.values()]


def _worst_of(copies: list[PairStats]) -> PairStats:
    """Copies of one pair (the same tokens, so the same steps and divergence) as one, at their worst."""
    first = copies[0]
    gaps = [s.tie_gap for s in copies if s.tie_gap is not None]
    tie_lps = [s.tie_lp_diff for s in copies if s.tie_lp_diff is not None]
    in_top_k = None if first.tie_in_top_k is None else all(s.tie_in_top_k for s in copies)
    return PairStats(steps=first.steps, diverged_at=first.diverged_at,
                     diffs=[max(step) for step in zip(*(s.diffs for s in copies))],
                     tie_gap=max(gaps) if gaps else None, tie_in_top_k=in_top_k,
                     tie_lp_diff=max(tie_lps) if in_top_k and tie_lps else None)


def judge_model(workloads: dict[str, tuple[list[Seq], list[Seq], list[Seq] | None]], crit: Criterion,
                atol: float, tie_tol: float) -> tuple[dict[str, dict], dict | None]:
    """Every workload's entry, {name: (deft, ref, noise)}, with the model-wide noise when
    ``crit.noise_pool == "model"``; returns (entries, pooled noise or None)."""
    pooled = None
    if crit.noise_pool == "model" and all(n is not None for _, _, n in workloads.values()) and workloads:
        pooled = pooled_noise([distinct_stats(n, ref) for _, ref, n in workloads.values()])
    return {name: judge_workload(d, r, n, crit, atol, tie_tol, pooled)
            for name, (d, r, n) in workloads.items()}, pooled


# --------------------------------------------------------------------------------------------------
# Plumbing: package overlay, servers, clock
# --------------------------------------------------------------------------------------------------
def make_overlay(dest: Path) -> Path:
    """A directory where ``import sglang_deft.kernels`` works without installing the repo.

    ``kernels/`` and ``patches/`` become ``sglang_deft.kernels``/``.patches`` only when installed
    (pyproject's package-dir); symlinks give the same layout. Put ``dest`` first on PYTHONPATH and run
    from a directory other than the repo root (``python -m`` puts the cwd first on sys.path, and the
    repo's own ``sglang_deft/`` has no ``kernels``)."""
    dest = Path(dest)
    pkg = dest / "sglang_deft"
    if pkg.exists():
        shutil.rmtree(pkg)
    pkg.mkdir(parents=True)
    for entry in (REPO / "sglang_deft").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    (pkg / "kernels").symlink_to(REPO / "kernels")
    (pkg / "patches").symlink_to(REPO / "patches")
    return dest


def importable_package_env() -> tuple[dict[str, str], Path]:
    """(env, cwd) under which ``sglang_deft`` with its ``kernels``/``patches`` subpackages imports, in
    this process and in the servers: an overlay (``make_overlay``), first on the path and their cwd.

    Always the overlay, also where the repo is installed (editable: the same files): a server started
    from the repo root would find the root's ``sglang_deft/`` first, which has no ``kernels``."""
    env = dict(os.environ)
    overlay = make_overlay(Path(tempfile.mkdtemp(prefix="sglang_deft_overlay_")))
    sys.path.insert(0, str(overlay))
    env["PYTHONPATH"] = os.pathsep.join([str(overlay)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env, overlay


class Clock:
    """Per-phase timings: printed as they happen and kept for the report."""

    def __init__(self):
        self.start = time.monotonic()
        self.phases: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def note(self, name: str, seconds: float | None = None, extra: str = "") -> None:
        if seconds is not None:
            self.phases[name] = round(seconds, 2)
        took = f" {seconds:.1f}s" if seconds is not None else ""
        print(f"[gpu_e2e +{self.elapsed():6.1f}s] {name}{took}{(' ' + extra) if extra else ''}", flush=True)


@dataclass
class Launched:
    role: str           # triton / deft / noise
    backend: str        # decode backend name (triton for the reference)
    server: object      # sglang_deft.server_process.ServerProcess
    t0: float
    ready_s: float | None = None


KILLED_WAIT_S = 60  # as ServerProcess.stop waits for a launcher after its SIGKILL


@dataclass
class Fleet:
    """Every server this run started, so that all are stopped on any exit (SIGTERM included)."""
    env: dict
    cwd: Path
    log_dir: Path
    clock: Clock
    running: list = field(default_factory=list)

    def launch(self, model: str, role: str, backend: str, args: list[str], pythonpath: Path | None = None) -> Launched:
        """``pythonpath``: a directory put first on this server's PYTHONPATH (its processes' sitecustomize)."""
        from sglang_deft.server_process import ServerProcess

        name = f"{model}-{role}" + (f"-{backend}" if role == "noise" else "")
        env = self.env
        if pythonpath is not None:
            env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))}
        server = ServerProcess(name, args, self.log_dir / f"{name}.log", cwd=self.cwd, env=env)
        launched = Launched(role, backend, server, time.monotonic())
        self.running.append(launched)
        with open(self.log_dir / "server_pgids.txt", "a") as f:  # start_new_session: pid == pgid
            f.write(f"{server.proc.pid} {name}\n")
        self.clock.note(f"{name} launched", extra=f"(pid {server.proc.pid})")
        return launched

    def wait(self, launched: Launched, timeout_s: float) -> float:
        launched.server.wait_ready(max(1.0, timeout_s))
        launched.ready_s = time.monotonic() - launched.t0
        self.clock.note(f"{launched.server.name} ready", launched.ready_s, "after launch")
        return launched.ready_s

    def stop(self, items: list[Launched]) -> None:
        """SIGTERM to all first, then wait: stopping one after another could take 30 s each."""
        from sglang_deft.server_process import process_group_alive

        alive = [x for x in items if x.server.proc.poll() is None]
        for x in alive:
            try:
                os.killpg(x.server.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        for x in alive:
            try:
                x.server.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(x.server.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:  # only a launcher stuck in the kernel (a GPU driver's teardown) is still here: not forever
                    x.server.proc.wait(timeout=KILLED_WAIT_S)
                except subprocess.TimeoutExpired:
                    self.clock.note(f"{x.server.name} survived SIGKILL for {KILLED_WAIT_S:.0f}s; not waiting for it")
        # The launcher's children (scheduler, detokenizer) share its process group and may outlive it by a
        # moment; the next model's servers should not start beside them.
        groups = [x.server.proc.pid for x in alive]
        while groups and time.monotonic() < deadline + 10:
            groups = [g for g in groups if process_group_alive(g)]
            if groups:
                time.sleep(0.2)
        for g in groups:
            try:
                os.killpg(g, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for x in items:
            x.server.stop()  # closes the log file; the process is gone by now
            if x in self.running:
                self.running.remove(x)

    def stop_all(self) -> None:
        self.stop(list(self.running))


# --------------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------------
def greedy(max_new_tokens: int, **extra) -> dict:
    return {"temperature": 0, "max_new_tokens": max_new_tokens, **extra}


def logprob_request(input_ids, max_new_tokens: int, **sampling) -> dict:
    return {"input_ids": input_ids, "sampling_params": greedy(max_new_tokens, **sampling),
            "return_logprob": True, "top_logprobs_num": TOP_K}


def _line(entry: dict) -> str:
    rel = entry.get("relative")
    text = f"ok={entry['ok']} deft diff {entry['max_abs_logprob_diff']:.4f} div {entry['divergences']}"
    if rel:  # the verdict's counts, each distinct (request, reference) pair once, beside its allowance
        text += (f" (distinct {rel['deft_divergences']})"
                 f" | noise diff {rel['noise_max_abs_logprob_diff']:.4f} div {rel['noise_divergences']}"
                 f" | allowed {rel['allowed_logprob_diff']:.4f} / {rel['allowed_divergences']}")
    elif "allowed_divergences" in entry:  # the absolute verdict's count, beside its allowance
        text += f" (distinct {entry['distinct_divergences']}) | allowed {entry['allowed_divergences']}"
    return text + "".join(f"\n    {f}" for f in entry["failures"][:5])


def run_workloads(servers: dict, spec: dict, crit: Criterion, atol: float, tie_tol: float, clock: Clock,
                  model: str, save, seed: int = WORKLOAD_SEEDS[0]) -> dict:
    """``servers``: role -> ServerProcess, the reference first; noise optional. ``seed`` draws the prompts."""
    import random

    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(3, spec["vocab"]) for _ in range(n)]  # noqa: E731
    prefix, k, T = ids(spec["prefix"]), spec["branches"], spec["new_tokens"]
    suffixes = [ids(4) for _ in range(k)]
    report, outputs, seqs_by_workload = {"workloads": {}}, {}, {}
    tag = "" if seed == WORKLOAD_SEEDS[0] else f" seed {seed}"

    def on_all(name, payload):
        per_server, seconds = {}, {}
        for role, server in servers.items():
            server.generate({"input_ids": prefix, "sampling_params": greedy(0)})  # fork() caches the prefix first
            start = time.monotonic()
            per_server[role] = server.generate(payload)
            seconds[role] = round(time.monotonic() - start, 3)
        outputs[name] = per_server
        prompts = request_prompts(payload)
        # (an answer past the prompts has none: count_failures reports the count)
        seqs = {role: [parse_response(r, prompts[i] if i < len(prompts) else None) for i, r in enumerate(rs)]
                for role, rs in per_server.items()}
        seqs_by_workload[name] = (seqs["deft"], seqs[REFERENCE], seqs.get("noise"))
        entry = judge_workload(*seqs_by_workload[name], crit, atol, tie_tol)  # final verdicts below
        entry["seconds"] = seconds
        report["workloads"][name] = entry
        clock.note(f"{model}{tag} {name}", sum(seconds.values()), _line(entry))
        save(report)

    on_all("fork", logprob_request([prefix + s for s in suffixes], T))
    # Nested: each branch's prompt and the reference's output, forked 2 ways (the radix tree holds the
    # finished branches now, so the batch's KV tree has two shared levels).
    level1 = [prefix + s + o["output_ids"] for s, o in zip(suffixes, outputs["fork"][REFERENCE])]
    nested = [p + ids(3) for p in level1 for _ in range(2)]
    on_all("nested_fork", logprob_request(nested, spec["nested_tokens"]))
    on_all("n_gt_1", logprob_request(prefix + ids(5), T, n=k))
    entries, report["pooled_noise"] = judge_model(seqs_by_workload, crit, atol, tie_tol)
    for name, entry in entries.items():
        entry["seconds"] = report["workloads"][name]["seconds"]
        report["workloads"][name] = entry
        clock.note(f"{model}{tag} {name} verdict", extra=_line(entry))
    save(report)

    # How much the reference's tokens depend on the shared prefix: one early token changed.
    perturbed = list(prefix)
    perturbed[4] = (perturbed[4] + 1) % spec["vocab"] or 3
    changed = servers[REFERENCE].generate({"input_ids": [perturbed + s for s in suffixes],
                                           "sampling_params": greedy(T)})
    base = outputs["fork"][REFERENCE]
    report["context_sensitivity"] = sum(x["output_ids"] != y["output_ids"] for x, y in zip(changed, base)) / k
    report["decode_context_sensitivity"] = decode_context_sensitivity(changed, base)
    return report


def decode_context_sensitivity(changed: list[dict], base: list[dict]) -> dict:
    """What ``context_sensitivity`` cannot show: a branch's first generated token comes from the prefill, but a
    branch that keeps its first token under the changed prefix and parts later does so through the decode
    steps' attention over the prefix. Information, not a criterion: ``fraction`` is None when every branch's
    first token changed."""
    same_first = [(x["output_ids"], y["output_ids"]) for x, y in zip(changed, base)
                  if x["output_ids"][:1] == y["output_ids"][:1]]
    parted = sum(a != b for a, b in same_first)
    return {"same_first_token": len(same_first), "parted_later": parted,
            "fraction": parted / len(same_first) if same_first else None}


def seed_totals(result: dict) -> dict:
    """Per workload, over the primary seed (``result``'s own workloads) and ``result["extra_seeds"]``: requests,
    deft's and the noise server's divergences from the reference, and how many seeds passed the criterion. Requests
    and divergences count each distinct request once (``distinct_stats``), as the verdicts do: the ``n_gt_1``
    workload's copies of one prompt counted per copy for deft but once for the noise server read as 8 against 1."""
    runs = {str(result["workload_seed"]): result, **result["extra_seeds"]}
    out = {}
    for name in result["workloads"]:
        entries = [r["workloads"][name] for r in runs.values() if name in r.get("workloads", {})]
        out[name] = {"seeds": len(entries), "seeds_ok": sum(e["ok"] for e in entries),
                     "requests": sum(_distinct(e)[0] for e in entries),
                     "deft_divergences": sum(_distinct(e)[1] for e in entries),
                     "noise_divergences": sum(e["relative"]["noise_divergences"] for e in entries
                                              if "relative" in e) if all("relative" in e for e in entries) else None,
                     "failed_seeds": [seed for seed, r in runs.items()
                                      if name in r.get("workloads", {}) and not r["workloads"][name]["ok"]]}
    return out


def _distinct(entry: dict) -> tuple[int, int]:
    """A workload entry's distinct requests and deft's divergences among them."""
    if "relative" in entry:
        return entry["relative"]["distinct_requests"], entry["relative"]["deft_divergences"]
    return entry["distinct_requests"], entry["distinct_divergences"]


# How long the sglang.lang program may take (1-2.5 s on a GPU, a few seconds on the CPU's tiny models).
LANG_PROGRAM_S = 300.0


def run_lang_program(servers: dict, timeout_s: float = LANG_PROGRAM_S) -> dict:
    """The nested fork() program through sglang.lang (text); reported, not part of the criterion. Run in a thread of
    its own and given ``timeout_s``: where a server stops answering mid-program, SGLang's interpreter warns, its
    worker thread ends, and the program's next fork waits for that worker forever (the run hung until the
    session's timeout, losing the models after this one)."""
    done: dict = {}

    def program():
        try:
            done["out"] = _lang_program(servers)
        except BaseException as e:  # re-raised in the caller's thread, where the model's error is recorded
            done["error"] = e

    worker = threading.Thread(target=program, name="sglang.lang program", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"the sglang.lang program did not finish within {timeout_s:g} s: a server stopped "
                           "answering mid-program (SGLang's interpreter then waits forever); see the servers' logs")
    if "error" in done:
        raise done["error"]
    return done["out"]


def _lang_program(servers: dict) -> dict:
    import sglang as sgl
    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

    @sgl.function
    def nested_forks(s, context):
        s += context
        branches = s.fork(3)
        for i, branch in enumerate(branches):
            branch += f" Idea {i + 1}:"
            branch += sgl.gen("idea", max_tokens=16, temperature=0)
        leaves = []
        for branch in branches:
            for j, leaf in enumerate(branch.fork(2)):
                leaf += f" Check {j + 1}:"
                leaf += sgl.gen("check", max_tokens=16, temperature=0)
                leaves.append(leaf)
        return [b["idea"] for b in branches] + [leaf["check"] for leaf in leaves]

    context = "The archive held letters from seven harbours, each sealed with wax of a different colour. " * 4
    texts = {role: nested_forks.run(context=context, backend=RuntimeEndpoint(s.url)).ret_value
             for role, s in servers.items()}
    out = {"generations": len(texts[REFERENCE])}
    for role in texts:
        if role != REFERENCE:
            out[f"identical_texts_{role}"] = sum(x == y for x, y in zip(texts[role], texts[REFERENCE]))
    out["identical_texts"] = out["identical_texts_deft"]
    return out


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------
def model_dtype(spec: dict, args) -> str:
    """The dtype the model's servers run in: the tiny models' --tiny-dtype (float32 on the CPU), else the model's own
    --dtype argument."""
    if args.device == "cpu":
        return "float32"
    if spec.get("sharp"):
        return args.tiny_dtype
    extra = list(spec["extra"])
    return extra[extra.index("--dtype") + 1] if "--dtype" in extra else "auto"


def model_base_args(name: str, spec: dict, args) -> list[str]:
    common = CPU_ARGS if args.device == "cpu" else GPU_ARGS
    if args.cuda_graph:
        common = [a for a in common if a != "--disable-cuda-graph"]
    extra = list(spec["extra"])
    if spec.get("sharp") and args.device != "cpu":
        extra = ["--dtype", args.tiny_dtype] + extra
    # --server-args last, where argparse's last value wins over the defaults above (the role's backend and
    # --deft-args / --noise-args still come after them: role_args)
    return ["--model-path", str(spec["path"]), *extra, *common, "--max-total-tokens", str(spec["max_total_tokens"]),
            *shlex.split(args.server_args)]


# Kernel check (sglang_deft.kernel_check): the deft server's Triton output against the fp32
# reference on the same inputs, the first layer of each kind of every N-th eager step. Tolerance
# (kernel_check.allowed_diff): two roundings of the output to the model's dtype at its magnitude (and, in float32, of
# the step's largest score).
def kernel_check_summary(deft_log: str) -> dict | None:
    """The deft server's kernel-check lines, summarised; None when it logged none (CPU: reference path)."""
    from sglang_deft.kernel_check import allowed_diff, parse_kernel_check_lines, tolerance_ratio, within_tolerance

    rows = parse_kernel_check_lines(deft_log)
    if not rows:
        return None
    # Each check judged at its own |out|, by the server's rule (it warned for these): a window layer's smaller
    # outputs must not borrow the allowance of a full layer's larger ones.
    within = [within_tolerance(r) for r in rows]
    ratios = [tolerance_ratio(r) for r in rows]  # NaN: inf, first
    at = max(range(len(rows)), key=ratios.__getitem__)
    worst = rows[at]
    # One line per rank, checked step and checked layer (each TP rank checks its own heads; a model with window
    # layers checks the first layer of each kind): checks = checked steps x ranks x kinds.
    return {"checks": len(rows), "checked_steps": len({r["step"] for r in rows}),
            "ranks": len({r.get("rank", 0) for r in rows}), "max_abs_diff": max(r["max_abs_diff"] for r in rows),
            "max_abs_out": max(r["max_abs_out"] for r in rows), "dtype": worst["dtype"],
            "max_row_rel_diff": max((r["max_row_rel_diff"] for r in rows if "max_row_rel_diff" in r), default=None),
            "worst": {k: worst[k] for k in ("step", "layer", "max_abs_diff", "max_abs_out", "max_row_rel_diff",
                                            "max_abs_score") if k in worst},
            "worst_tolerance_ratio": ratios[at],  # its difference over its allowance, batch's or row's
            # the worst check's own allowance
            "allowed": allowed_diff(worst["dtype"], worst["max_abs_out"], worst.get("max_abs_score", 0.0)),
            "within_tolerance": all(within), "outside_tolerance": within.count(False)}


STAGE1_LINE = re.compile(r"tree decode stage 1 on (\S+), (.*?): (Gluon kernel for Hopper|Triton kernel.*)$", re.M)


def stage1_kernels(deft_log: str) -> list[dict]:
    """Which stage-1 kernel served each configuration the deft server decoded (``kernels.tree_decode`` logs
    its choice once per configuration), so that a verdict says which kernel it is about."""
    return [{"device": m[1], "configuration": m[2], "kernel": m[3]} for m in STAGE1_LINE.finditer(deft_log)]


def role_args(base: list[str], role: str, backend: str, deft_args: list[str] = (),
              noise_args: list[str] = ()) -> list[str]:
    if role == "triton":
        return list(base)  # a copy: a caller may add to it (the window patch's flag), and every role starts from base
    own = {"deft": list(deft_args), "noise": list(noise_args)}.get(role, [])
    args = base + ["--decode-attention-backend", backend] + own
    if backend == "torch_native" and "--disable-cuda-graph" not in args:
        # torch_native has no CUDA-graph support (init_cuda_graph_state raises): as the noise
        # server it only has to decode the same requests, so it runs eagerly under --cuda-graph.
        args.append("--disable-cuda-graph")
    return args


class ModelRun:
    """The servers of one model: launched (maybe concurrently), awaited, checked, stopped."""

    def __init__(self, name: str, spec: dict, fleet: Fleet, args, result: dict):
        self.name, self.spec, self.fleet, self.args, self.result = name, spec, fleet, args, result
        self.base = model_base_args(name, spec, args)
        self.result["server_args"] = self.base
        self.result["deft_extra_args"] = shlex.split(args.deft_args)
        self.result["noise_extra_args"] = shlex.split(args.noise_args)
        # a backend that cannot serve this model is left out of the queue (it could start and pass the first
        # decodes, then fail mid-workload, past the point where the next one takes its place)
        asked = [b for b in args.noise_backends.split(",") if b]
        self.noise_queue = [b for b in asked if b not in spec.get("noise_unsupported", ())]
        self.noise_queued = bool(self.noise_queue)
        if len(self.noise_queue) < len(asked):
            self.result["noise_not_queued"] = [b for b in asked if b not in self.noise_queue]
        self.launched: dict[str, Launched] = {}
        self.retried: set[str] = set()

    def launch(self, role: str, backend: str) -> Launched:
        args = role_args(self.base, role, backend, shlex.split(self.args.deft_args), shlex.split(self.args.noise_args))
        patch = None
        if role == REFERENCE and self.spec.get("reference_window_patch"):
            patch = REFERENCE_WINDOW_PATCH
            if "--disable-cuda-graph" not in args:
                args.append("--disable-cuda-graph")  # its graph buffers hold w tokens a request
            self.result["reference_window_patch"] = str(patch.relative_to(REPO))
        launched = self.fleet.launch(self.name, role, backend, args, pythonpath=patch)
        self.launched[role] = launched
        return launched

    def launch_all(self, wait_each_s: float | None = None) -> None:
        """Reference, noise, deft; with ``wait_each_s`` one after another (``--parallel none``)."""
        plan = [("triton", "torch_native" if self.args.device == "cpu" else "triton")]
        if self.noise_queue:
            plan.append(("noise", self.noise_queue.pop(0)))
        plan.append(("deft", "deft"))
        for role, backend in plan:
            self.launch(role, backend)
            if wait_each_s is not None:
                self.wait_role(role, wait_each_s)

    def wait_role(self, role: str, timeout_s: float) -> bool:
        """Wait for ``role``'s server; on failure retry once after a port clash, and for the noise server
        fall back to the next ``--noise-backends`` entry. False if the role has no server in the end.
        ``timeout_s`` bounds the whole wait, retries and fallbacks included (the run's budget set it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            launched = self.launched[role]
            try:
                if launched.ready_s is None:
                    self.fleet.wait(launched, deadline - time.monotonic())
                    # /health_generate decodes at most a token: a few decode steps show the decode backend runs
                    # (FlashInfer may JIT-compile its decode module here: 1-2 min on a fresh machine).
                    start = time.monotonic()
                    launched.server.generate({"input_ids": [5, 6, 7, 8], "sampling_params": greedy(4)},
                                             timeout_s=max(1.0, min(300.0, deadline - time.monotonic())))
                    self.fleet.clock.note(f"{launched.server.name} first decode", time.monotonic() - start)
                self.result.setdefault("servers", {})[role] = {
                    "decode_backend": launched.backend, "ready_s": round(launched.ready_s, 1)}
                self.result[f"{role}_startup_s"] = round(launched.ready_s, 1)
                return True
            except (RuntimeError, TimeoutError, OSError, ValueError) as e:  # urllib errors are OSErrors
                port_taken = launched.server.port_taken()
                self.fleet.stop([launched])
                self.result.setdefault("server_errors", []).append(
                    {"role": role, "decode_backend": launched.backend, "error": str(e)[-3000:]})
                self.fleet.clock.note(f"{launched.server.name} FAILED", time.monotonic() - launched.t0)
                in_time = deadline - time.monotonic() >= 1  # no retry or fallback started past the wait's budget
                if not in_time:
                    self.result["server_errors"][-1]["budget_spent"] = True
                if in_time and port_taken and role not in self.retried:
                    self.retried.add(role)
                    self.launch(role, launched.backend)
                elif in_time and role == "noise" and self.noise_queue:
                    self.launch(role, self.noise_queue.pop(0))
                else:
                    del self.launched[role]
                    if role != "noise":
                        raise
                    return False

    def run(self, deadline: float, save) -> None:
        """Wait for the servers, run the workloads, judge; ``save(interrupted=None)`` writes the report (partial
        results as they come; with the exception that stopped the run, the report marked interrupted first)."""
        clock, spec, result = self.fleet.clock, self.spec, self.result
        remaining = lambda: deadline - time.monotonic()  # noqa: E731
        try:
            if not self.launched:
                sequential = self.args.parallel == "none"
                self.launch_all(wait_each_s=min(self.args.startup_timeout, remaining() - 30) if sequential else None)
            for role in ("triton", "noise", "deft"):
                if role in self.launched:
                    timeout = min(self.args.startup_timeout, remaining() - 30)
                    if timeout < 1 and self.launched[role].ready_s is None:
                        # Waits of a second each (and fallback noise servers started past the deadline) failed it
                        # as "no noise server served", the budget unnamed: it is skipped for the budget, by name.
                        result.update(ok=False, skipped=(
                            f"{remaining():.0f}s of the budget left with its {role} server still starting: run it "
                            f"on its own (--models {self.name})"))
                        clock.note(f"{self.name} skipped", extra=result["skipped"])
                        return
                    if role == "noise" and not self.wait_role(role, timeout):
                        clock.note(f"{self.name}: no noise server; absolute criterion only")
                    elif role != "noise":
                        self.wait_role(role, timeout)
                    save()
            servers = {role: self.launched[role].server for role in (REFERENCE, "noise", "deft")
                       if role in self.launched}
            if self.spec.get("reference_window_patch") and REFERENCE_WINDOW_MARKER not in servers[REFERENCE].log():
                raise RuntimeError("the reference server did not apply scripts/reference_window (its line is not in "
                                   "the server's log): its triton decode would read one token fewer than deft")
            result["noise_backend"] = self.launched["noise"].backend if "noise" in self.launched else None
            result["criterion_mode"] = "relative" if result["noise_backend"] else "absolute"
            spec = dict(spec)
            if self.args.smoke:
                spec.update(branches=4, new_tokens=8, nested_tokens=4)
            atol = self.args.atol if self.args.atol is not None else (
                0.02 if (spec.get("sharp") and self.args.tiny_dtype == "float16") else 0.05)
            result["atol"], result["tie_tol"] = atol, self.args.tie_tol
            result["dtype"] = dtype = model_dtype(spec, self.args)
            crit = self.args.criterion.for_dtype(dtype)
            result["noise_lp_max"] = crit.noise_lp_max

            def save_partial(partial):
                result.update(partial)
                save()

            start = time.monotonic()
            seeds = self.args.workload_seeds
            result.update(run_workloads(servers, spec, crit, atol, self.args.tie_tol, clock,
                                        self.name, save_partial, seeds[0]))
            if len(seeds) > 1:
                result["workload_seed"], extra = seeds[0], result.setdefault("extra_seeds", {})
                for i, seed in enumerate(seeds[1:], 1):
                    if remaining() < SEED_MIN_S:  # stop while the servers can still be stopped within the budget
                        result["seeds_skipped"] = seeds[i:]
                        clock.note(f"{self.name}: {remaining():.0f}s of the budget left, seeds {seeds[i:]} skipped")
                        break

                    def save_seed(partial, key=str(seed)):
                        extra[key] = partial
                        save()

                    extra[str(seed)] = run_workloads(servers, spec, crit, atol, self.args.tie_tol,
                                                     clock, self.name, save_seed, seed)
                result["seed_totals"] = seed_totals(result)
            clock.note(f"{self.name} workloads", time.monotonic() - start)
            if spec["tokenizer"]:
                start = time.monotonic()
                result["sglang_lang_nested_forks"] = run_lang_program(servers)
                clock.note(f"{self.name} sglang.lang program", time.monotonic() - start)
            from sglang_deft.sharing_metrics import parse_sharing_lines

            deft_log = servers["deft"].log()
            rows = parse_sharing_lines(deft_log)
            if rows:
                last = rows[-1]
                result["sharing"] = {"decode_steps": last["total_steps"],
                                     "attended_kv_tokens": last["total_attended_kv_tokens"],
                                     "unique_kv_tokens": last["total_unique_kv_tokens"],
                                     "ratio": (last["total_attended_kv_tokens"]
                                               / max(1.0, last["total_unique_kv_tokens"]))}
            result["kernel_check"] = kernel_check_summary(deft_log)
            result["stage1_kernels"] = stage1_kernels(deft_log)
            per_seed = [result, *result.get("extra_seeds", {}).values()]
            result["ok"] = (all(w["ok"] for r in per_seed for w in r["workloads"].values()) and bool(rows)
                            and not result.get("seeds_skipped"))  # asked for, not checked
            if spec.get("sharp"):  # the criterion is meaningful there only if the prefix drives the tokens
                result["ok"] = result["ok"] and all(r["context_sensitivity"] >= 0.5 for r in per_seed)
            if self.args.device != "cpu":
                # The Triton kernels must have decoded (SGLANG_DEFT_DECODE_IMPL=reference in the caller's
                # environment made the servers decode by the reference, checked against itself), and where the
                # tokens cannot tell (the 8b shape's dummy weights: attention outputs ~1e-7, every logprob equal),
                # the kernel check is the verdict: its reference reads each request's KV from req_to_token.
                if not result["stage1_kernels"]:
                    result["ok"] = False
                    result["not_ok_because"] = ("the deft server logged no stage-1 kernel: the Triton kernels did "
                                                "not decode (SGLANG_DEFT_DECODE_IMPL?)")
                elif not spec.get("sharp") and not (result["kernel_check"] or {}).get("within_tolerance"):
                    result["ok"] = False
                    result["not_ok_because"] = ("a model whose tokens do not depend on its attention (dummy weights) "
                                                "is judged by its kernel check, which "
                                                + ("logged nothing" if not result["kernel_check"] else
                                                   "found a difference past rounding"))
                elif (result["kernel_check"] or {}).get("within_tolerance") is False:
                    # A token dropped from a long prefix can stay inside the logprob band; the check cannot miss it.
                    result["ok"] = False
                    result["not_ok_because"] = (f"the kernel check found {result['kernel_check']['outside_tolerance']} "
                                                "checks past rounding against the fp32 reference")
            if self.noise_queued and result["criterion_mode"] != "relative":
                # A noise server was asked for and none served (server_errors: a failed start, or one still
                # starting when the budget's timeout came): the absolute check alone is not what the run is for.
                result["ok"] = False
                result["not_ok_because"] = "no noise server served: the relative criterion was not applied"
                if any(e.get("budget_spent") for e in result.get("server_errors", [])):
                    result["not_ok_because"] += " (the run's budget ran out while it started)"
                if result.get("noise_not_queued"):
                    result["not_ok_because"] += (f" ({', '.join(result['noise_not_queued'])} cannot serve this "
                                                 "model and was not started)")
        except Exception:
            result.update(ok=False, error=traceback.format_exc())
        except BaseException as e:  # SIGTERM (SystemExit) or Ctrl-C mid-model: saved before this model's servers
            # stop below (up to 30 s, past gpu_session.sh's 15 s grace), not after, as main's handler alone did
            result.update(ok=False, interrupted=f"{type(e).__name__}: {e}")
            save(e)
            raise
        finally:
            start = time.monotonic()
            self.fleet.stop(list(self.launched.values()))
            clock.note(f"{self.name} servers stopped", time.monotonic() - start)


def device_info(commit: str | None) -> dict:
    info: dict = {"torch": None, "gpu": None, "commit": None}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:  # nvidia-smi, not torch.cuda: this process stays out of the GPU
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        info["gpu"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        pass
    info["commit"] = REPORT_FILES.commit_label(commit)
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="deft vs SGLang's triton and flashinfer decode on the GPU, same requests")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_e2e_out")))
    p.add_argument("--log-dir", type=Path, default=None, help="server logs (default OUT/logs)")
    p.add_argument("--models", default=None,
                   help="comma-separated: " + ", ".join(MODELS) + " (default tiny,8b; tiny with --device cpu, which "
                        "runs the tiny models only)")
    p.add_argument("--tiny-dtype", default="float16", choices=["float16", "bfloat16"],
                   help="float16 (default) rounds 8x finer than bfloat16: a narrower noise band (module docstring)")
    p.add_argument("--noise-backends", default=None,
                   help="decode backends for the noise-floor server, tried in order (default flashinfer,torch_native;"
                        " '' for none)")
    p.add_argument("--k", type=float, default=Criterion.k, help="deft may differ up to k x the noise pair")
    p.add_argument("--lp-floor", type=float, default=Criterion.lp_floor, help="absolute floor, logprob")
    p.add_argument("--div-floor-frac", type=float, default=Criterion.div_floor_frac,
                   help="divergence floor = max(1, ceil(frac x requests))")
    p.add_argument("--tie-factor", type=float, default=Criterion.tie_factor)
    p.add_argument("--noise-pool", default=Criterion.noise_pool, choices=["model", "workload"],
                   help="noise level per workload: max(its own, the model's over all workloads), or its own")
    p.add_argument("--atol", type=float, default=None,
                   help="absolute check (reported): 0.02 for the tiny models in float16, else 0.05")
    p.add_argument("--tie-tol", type=float, default=0.1, help="absolute check: near-tie logprob gap")
    p.add_argument("--parallel", default="model", choices=["none", "model", "all"],
                   help="start servers one at a time, a model's servers together, or every server at once")
    p.add_argument("--budget-s", type=float, default=0,
                   help="wall-clock budget; skip models that would overrun (0: none)")
    p.add_argument("--startup-timeout", type=float, default=360,
                   help="seconds for each role's server to answer its first decode, retries and fallbacks included")
    p.add_argument("--commit", default=os.environ.get("DEFT_COMMIT"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a smoke run of this script on SGLang's CPU engine (tiny models only, torch_native prefill)")
    p.add_argument("--smoke", action="store_true", help="shorter workloads (CPU smoke runs)")
    p.add_argument("--kernel-check-every", type=int, default=16, metavar="N",
                   help="the deft server checks the first layer of each kind (full, window) of every N-th eager "
                        "decode step against the fp32 reference (sglang_deft.kernel_check; 0: off); reported as "
                        "kernel_check")
    p.add_argument("--deft-args", default="", metavar="ARGS",
                   help="extra launcher arguments for the deft server only, one string, e.g. "
                        "--deft-args='--tp 2' (TP=2 deft against TP=1 triton and flashinfer)")
    p.add_argument("--noise-args", default="", metavar="ARGS",
                   help="extra launcher arguments for the noise-floor server only, e.g. --deft-args='--tp 2' "
                        "--noise-backends triton --noise-args='--tp 2': deft at TP=2 may differ from TP=1 "
                        "triton by as much as triton at TP=2 does")
    p.add_argument("--server-args", default="", metavar="ARGS",
                   help="extra launcher arguments for every server, one string, e.g. --server-args='--tp 2' "
                        "(the 8b shape with dummy weights: TP=2 changes the model's rounding, so its TP=2 "
                        "check compares TP=2 servers); they override this script's defaults (--dtype excepted: "
                        "--tiny-dtype)")
    p.add_argument("--workload-seeds", default=",".join(map(str, WORKLOAD_SEEDS)), metavar="S1,S2,...",
                   help="the prompts' seeds: the first gives the report's workloads as always, each further one the "
                        "same workloads on other prompts against the same servers (extra_seeds, seed_totals); "
                        "the model is ok only if every seed passes")
    p.add_argument("--cuda-graph", action="store_true",
                   help="servers keep SGLang's CUDA graphs (default: all run with --disable-cuda-graph)")
    p.add_argument("--make-overlay", type=Path, default=None, metavar="DIR",
                   help="only build the sglang_deft overlay in DIR, print DIR, exit (scripts/gpu_session.sh)")
    args = p.parse_args(argv)
    if args.noise_backends is None:
        args.noise_backends = "torch_native" if args.device == "cpu" else "flashinfer,torch_native"
    args.criterion = Criterion(args.k, args.lp_floor, args.div_floor_frac, args.tie_factor, args.noise_pool)
    try:
        args.workload_seeds = [int(x) for x in args.workload_seeds.split(",") if x.strip()]
    except ValueError:
        p.error(f"--workload-seeds takes comma-separated integers, not {args.workload_seeds!r}")
    if not args.workload_seeds or len(set(args.workload_seeds)) < len(args.workload_seeds):
        p.error(f"--workload-seeds needs at least one seed and no repeats: {args.workload_seeds}")
    for flag, value in (("--server-args", args.server_args), ("--deft-args", args.deft_args),
                        ("--noise-args", args.noise_args)):
        if any(a == "--dtype" or a.startswith("--dtype=") for a in shlex.split(value)):
            p.error(f"{flag} --dtype: the tiny models' dtype is --tiny-dtype (the report's tolerances follow it)")
    # The reference and noise servers stand for correct built-in decoding: one that decoded with deft would judge deft
    # by itself (a noise server equal to deft widens the band by whatever deft is off).
    if "deft" in args.noise_backends.split(","):
        p.error("--noise-backends deft: the noise server must be another backend than the one it judges")
    for flag, value in (("--server-args", args.server_args), ("--noise-args", args.noise_args)):
        words = shlex.split(value)
        for i, word in enumerate(words):
            name, _, inline = word.partition("=")
            if name == "--decode-attention-backend":
                p.error(f"{flag} {name}: each role's decode backend is this script's (the reference's triton, "
                        "--noise-backends for the noise server)")
            if name == "--attention-backend" and (inline or (words[i + 1] if i + 1 < len(words) else "")) == "deft":
                p.error(f"{flag} --attention-backend deft: that server would decode with deft")
    return args


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make_overlay is not None:
        print(make_overlay(args.make_overlay))
        return 0
    names = [n for n in (args.models or ("tiny" if args.device == "cpu" else "tiny,8b")).split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"gpu_e2e.py: unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    too_large = [n for n in names if args.device == "cpu" and not MODELS[n].get("sharp")]
    if too_large:  # (were left out without a word, and the run reported complete)
        print(f"gpu_e2e.py: --device cpu runs the tiny models only, not {', '.join(too_large)} (Llama-3-8B's shape: "
              "16 GB of dummy bfloat16 weights, GPU-sized); drop it from --models", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    clock = Clock()
    deadline = clock.start + (args.budget_s if args.budget_s > 0 else 10 ** 9)
    log_dir = args.log_dir or args.out / "logs"
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "server_pgids.txt").write_text("")
    env, cwd = importable_package_env()
    env["SGLANG_DEFT_VERIFY_EVERY"] = str(args.kernel_check_every)  # read by the deft server only
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **device_info(args.commit),
        "device_mode": args.device,
        "criterion": args.criterion.describe(),
        "criterion_params": {"k": args.k, "lp_floor": args.lp_floor, "div_floor_frac": args.div_floor_frac,
                             "tie_factor": args.tie_factor, "noise_pool": args.noise_pool, "top_k": TOP_K,
                             "noise_lp_max": {"bfloat16": args.criterion.noise_lp_max,
                                              "float16": args.criterion.noise_lp_max_fp16,
                                              "float32": args.criterion.noise_lp_max_fp16},
                             "reference": REFERENCE, "noise_backends": args.noise_backends},
        "absolute_check": ("while tokens agree |logprob diff| <= atol; at a divergence both tokens within tie_tol, "
                           "in both servers' top-k; where it decides (no noise server), at most k x max(1, "
                           "ceil(div_floor_frac x requests)) distinct requests diverge"),
        "tiny_dtype": args.tiny_dtype if args.device != "cpu" else "float32",
        "cuda_graph": args.cuda_graph and args.device != "cpu",
        "workload_seeds": args.workload_seeds,
        "parallel": args.parallel, "budget_s": args.budget_s,
        "models": {}, "timings": clock.phases,
    }
    out_json = args.out / "gpu_e2e.json"

    def save(interrupted: BaseException | None = None):
        """The report as it stands; with ``interrupted`` (SIGTERM's SystemExit, Ctrl-C), first marked as stopped by it."""
        if interrupted is not None and not report.get("interrupted"):
            report.update(ok=False, complete=False, interrupted=f"{type(interrupted).__name__}: {interrupted}")
            clock.note(f"interrupted ({type(interrupted).__name__})")
        report["wall_s"] = round(clock.elapsed(), 1)
        write_replacing(out_json, json.dumps(report, indent=2))

    fleet = Fleet(env, cwd, log_dir, clock)
    runs: dict[str, ModelRun] = {}
    save()
    try:
        for name in names:
            spec = MODELS[name]
            report["models"][name] = {}
            if spec.get("heads"):
                report["models"][name]["heads"] = list(spec["heads"])
                report["models"][name]["architecture"] = spec.get("architecture", "llama")
                spec = dict(spec, path=materialize_model(name, spec))
                clock.note(f"{name}: generated at {spec['path']}")
            if not spec["path"].exists():
                report["models"][name] = {"ok": False, "error": f"model not found: {spec['path']} "
                                                                f"(carry .kit for the 8b shape)"}
                continue
            runs[name] = ModelRun(name, spec, fleet, args, report["models"][name])
        if args.parallel == "all":
            for run in runs.values():
                run.launch_all()
        for name, run in runs.items():
            left = deadline - time.monotonic()
            if not run.launched and left < run.spec["min_budget_s"]:
                run.result.update(ok=False, skipped=f"{left:.0f}s of the budget left, {name} needs about "
                                                    f"{run.spec['min_budget_s']}s: run it on its own (--models {name})")
                clock.note(f"{name} skipped", extra=run.result["skipped"])
                save()
                continue
            run.run(deadline, save)
            save()
    except BaseException as e:  # SIGTERM (SystemExit) or Ctrl-C: keep what was measured, say why it stopped
        save(e)  # before the servers' stop, which may outlast the caller's grace (up to 30 s)
        raise
    finally:
        fleet.stop_all()
        save()
    report["complete"] = all(not m.get("skipped") for m in report["models"].values()) and bool(names)
    report["ok"] = report["complete"] and all(m.get("ok") for m in report["models"].values())
    save()
    print(json.dumps(report, indent=2))
    clock.note(f"done: ok={report['ok']} complete={report['complete']}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
