"""End-to-end decode throughput: SGLang servers with deft, flashinfer and triton decode, same requests.

On the GPU host, from the repo root, with the devkit carried along (.kit/); ``scripts/gpu_session.sh
bench-e2e`` wraps this with the time limits, cleanup and log bundle a 10-minute device call needs:

    source .kit/bootstrap.sh && python3 benchmarks/bench_e2e.py --out "$OUT" --budget-s 520 --commit <sha>
    python3 benchmarks/plot_e2e.py "$OUT/e2e_h200.json"                        # -> e2e_h200.png
    .venv/bin/python benchmarks/bench_e2e.py --device cpu --smoke --out /tmp/e2e_cpu   # CPU dry run, ~1 min

Servers (``python -m sglang_deft.launch_server``, one per model and decode backend, started together where they fit):
``--attention-backend triton --decode-attention-backend {deft,flashinfer,triton}``, so prefill/extend
is SGLang's triton backend everywhere and only decode differs (flashinfer decode runs in SGLang's
``HybridAttnBackend``; triton decode is the plain triton backend). Per-backend extra arguments:
``--deft-args=...``, ``--flashinfer-args=...`` and ``--triton-args=...`` (default none: SGLang's
defaults, CUDA graphs on, up to ``--cuda-graph-max-bs 256``, for every backend;
``--deft-args=--disable-cuda-graph`` measures deft's eager steps).
Models: ``8b`` (``models/llama3-8b-shape``, dummy weights, bfloat16, ``--skip-tokenizer-init``) and
``tiny`` (``models/tiny-llama-deft``, float16, with its tokenizer, for the sglang.lang program); by name only,
``8b_d256`` (the 8b shape with 16 q / 8 kv heads of 256), ``8b_text`` (the 8b shape with its stand-in tokenizer on,
for the tree of thought at that size: ``--cases tot_3level_8b``) and ``gemma3_12b`` (Gemma-3-12B's text model with dummy
weights: sliding-window layers at their real size; ``--cases p16k_64_gemma3,p4k_64_gemma3,nosharing_gemma3``).

Cases (same request contents for every backend; token ids from a RNG seeded by case and repetition):
- fork-shaped batches on 8b: the prefix is sent first with ``max_new_tokens=1`` (cached, as ``fork()``
  does), then ONE ``/generate`` with B prompts (prefix + 8 private tokens each, distinct first private
  token) and N new tokens each, ``ignore_eos``, greedy: 16000 x 64 x 256, 4000 x 64 x 256, 1000 x 256 x 128;
- no sharing on 8b: 64 distinct 2048-token prompts, 128 new tokens each (the same request with prefix 0);
- a 3-level tree-of-thought ``sglang.lang`` program (4 x 4 x 4 forks, 32 tokens per generation) on tiny.
  Tiny-model numbers measure per-step overhead (scheduling, planning, Python), not attention bandwidth.

Measures (per case and backend; each case is run ``--repeats`` times, the best run is reported, all kept):
- ``server_log_tok_s_median``: SGLang's own ``Decode batch, #running-req: B, ... gen throughput (token/s): X``
  lines (every ``--decode-log-interval`` decode steps), median over the lines logged while all B requests
  ran, without the first of them (its window starts at the previous line, so it spans the batch's
  prefill and the idle time before it) and the one logged after the batch released its KV (``#token: 0``).
  The headline ``<backend>_tok_s`` when there are such lines;
- ``client_tok_s``: B x (N - 1), the tokens decoded after each request's first / (time of the last chunk -
  time the last request got its first token). The batch is streamed with ``stream_interval`` > N, so each
  request sends two chunks: its first token (end of its prefill) and its end. SGLang runs every pending
  prefill before decoding, so from the last first token on, all B requests decode together;
- ``tpot_ms``: that decode window / (N - 1), the time per output token of every request;
- ``sharing_ratio``: KV tokens attended / unique KV tokens over the decode steps: measured from the deft
  server's ``DeFT decode sharing`` lines (but the first, which may hold the previous batch's last steps);
  for the others the case shape's theoretical value
  (``sharing_ratio_source`` says which). The sglang.lang case reports client tok/s (tokens / wall) only.
- ``same_outputs``: the output check. Every request's generated ids are digested (``output_digests`` per
  run); per backend, how many of a case's requests decoded to the same ids as the reference backend's run
  of the same repetition, in that backend's worst repetition. Greedy decoding of the same requests should agree, up
  to near ties that a backend's rounding can flip; the table shows it as ``equal / requests``. A weak
  check on dummy weights (the 8B shape's attention barely moves its tokens): the correctness criterion
  is ``scripts/gpu_e2e.py``'s; this one catches a backend that decodes garbage or nothing.

Time and memory: the servers start concurrently (startup is imports, CUDA-graph capture and FlashInfer's
JIT; caches are file-locked) where they fit the card together, as on the H200; else in waves, each started once the
last one's cases ran and its servers stopped (``server_waves``: each server's memory estimated from its model's
config and KV pool, ``server_memory_gib``, against 90% of the card's, ``--gpu-memory-gib``; on an 80 GB H100 the
default run is three waves, one 8b server at a time and the tiny servers beside the last; the JSON's ``memory`` says
what was estimated). Each server has a capped KV pool (``--max-total-tokens``, the largest case's
tokens + 10%: ~150k tokens, 19 GiB on 8b) and ``--mem-fraction-static 0.8``. SGLang sizes the pool as
free-after-weights - (1 - fraction) x free-before-weights, capped at ``--max-total-tokens``; other servers'
allocations shrink both terms, and 0.8 keeps the result above the cap (3 x (15 GiB weights + 19 GiB KV +
~6 GiB) + 3 tiny servers ~ 122 GiB of the H200's 140). A low fraction would make it negative: the tiny
servers use 0.8 too and are kept small by their cap. Each server's ``max_total_num_tokens`` is read back and
a case that would not fit is not run (the JSON says so). Cases run one backend at a time while the other
servers idle (``--sleep-on-idle``); all repetition-1 runs come before any repetition 2, and ``--budget-s``
skips what would not finish in time (``skipped`` in the JSON). Measured on the H200: startup with
FlashInfer's JIT 107-146 s, warm-ups 1-4 s (~10 s with the radix cache off), each repetition of all cases
~1 min, stop 2 s (~4 min in all).

Writes ``$OUT/e2e_<tag>.json`` and ``$OUT/e2e_<tag>.md`` (tag: the GPU's, ``h200``, ``h100`` ...; ``cpu`` with
``--device cpu``) after every measurement, so a killed run keeps what it measured; server logs and process-group ids
(``server_pgids.txt``, for the session script's cleanup) under ``--log-dir``. Exits 1 unless every case
has a good run on every backend (``complete``; a skipped second repetition alone does not count).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import random
import re
import shlex
import signal
import statistics
import sys
import tempfile
import time
import traceback
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_by_file(name: str, path: Path):
    """A repo script as a module, registered under ``name`` (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


# scripts/gpu_e2e.py's server fleet (launch, wait, stop by process group, pgid file), package overlay, clock, device
# info and SIGTERM handler are reused here, not copied.
gpu_e2e = _load_by_file("gpu_e2e", REPO / "scripts" / "gpu_e2e.py")


# benchmarks/card_tag.py: what nvidia-smi says of this host's first GPU (its tag, h200 or h100 ..., and its memory).
card = _load_by_file("deft_bench_card_tag", REPO / "benchmarks" / "card_tag.py")


# --------------------------------------------------------------------------------------------------
# Models, cases, server arguments
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    path: Path
    args: tuple[str, ...]
    id_range: tuple[int, int]  # random prompt token ids: clear of special tokens, inside the vocabulary
    min_pool_tokens: int       # --max-total-tokens at least this (the cases may ask for more)
    # A config.json written to ``path`` before the servers start (``materialize_model``): a shape no kit holds
    config: dict | None = None
    # Sliding-window layers: the tokens a window layer's query attends and those layers' share of all attention
    # layers (``theoretical_sharing_ratio``)
    window: int | None = None
    window_share: float = 0.0


# Gemma-3-12B's text model (Gemma3ForCausalLM, as google/gemma-3-12b's text_config): 48 layers, five sliding-window
# layers of 1024 tokens to one global, 16 q / 8 kv heads of 256, hidden 3840, a 262k vocabulary; dummy weights.
# Its global layers' linear RoPE scaling (x8) is left out: it changes no shape and no cost, and transformers 4 and 5
# spell it differently. SGLang keeps this model's KV in one pool (Gemma-3 is not among its hybrid SWA models), so
# every layer's KV stays: 48 x 8 x 256 x 2 x 2 bytes = 384 KiB a token.
GEMMA3_12B_LAYERS = 48
GEMMA3_12B_CONFIG = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 3840,
    "intermediate_size": 15360, "num_hidden_layers": GEMMA3_12B_LAYERS, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256, "vocab_size": 262208,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "sliding_window": 1024,
    "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(GEMMA3_12B_LAYERS)],
    "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh", "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "attention_bias": False, "tie_word_embeddings": True, "bos_token_id": 2,
    "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16",
}


MODELS = {
    "cuda": {
        "8b": ModelSpec(REPO / "models" / "llama3-8b-shape",
                        ("--dtype", "bfloat16", "--load-format", "dummy", "--skip-tokenizer-init"),
                        (1000, 128000), 16384),
        "tiny": ModelSpec(REPO / "models" / "tiny-llama-deft", ("--dtype", "float16"), (3, 300), 16384),
        # The 8b shape with 16 q / 8 kv heads of 256 (Gemma-2-9B's attention; the same hidden size, 4096;
        # 256 KB of KV per token, so that two servers' pools fit one H200 beside each other).
        "8b_d256": ModelSpec(REPO / "models" / "llama3-8b-shape",
                             ("--dtype", "bfloat16", "--load-format", "dummy", "--skip-tokenizer-init",
                              "--json-model-override-args",
                              json.dumps({"num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256})),
                             (1000, 128000), 16384),
        # The 8b shape with its stand-in tokenizer on, for the sglang.lang program at a real model's size (the
        # random model's tokens past that tokenizer's 326 decode to nothing, so the branches' text is the prompt's).
        "8b_text": ModelSpec(REPO / "models" / "llama3-8b-shape", ("--dtype", "bfloat16", "--load-format", "dummy"),
                             (1000, 128000), 16384),
        # A sliding-window model at its real size (Gemma-3-12B's text model, above). The config is written to a
        # temporary directory; the servers read no tokenizer (--skip-tokenizer-init: prompts are token ids).
        "gemma3_12b": ModelSpec(Path(tempfile.gettempdir()) / "sglang_deft_bench_models" / "gemma3-12b-shape",
                                ("--dtype", "bfloat16", "--load-format", "dummy", "--skip-tokenizer-init"),
                                (1000, 200000), 16384, config=GEMMA3_12B_CONFIG, window=GEMMA3_12B_CONFIG["sliding_window"],
                                window_share=GEMMA3_12B_CONFIG["layer_types"].count("sliding_attention")
                                / GEMMA3_12B_LAYERS),
    },
    # SGLang's CPU engine; its float32 path is the one the CPU tests use.
    "cpu": {"tiny": ModelSpec(REPO / "models" / "tiny-llama-deft", ("--device", "cpu", "--dtype", "float32"),
                              (3, 300), 8192)},
}
# --sampling-backend pytorch: a batch mixing greedy requests (top_k=1) with sampled ones (sglang.lang's
# fork sends its prefix-caching requests with default sampling params) takes the top-k/top-p sampler,
# whose FlashInfer kernel is JIT-compiled on first use: ~80 s, stalling the first server on a fresh
# GPU host mid-program (measured in the e2e logs of 2026-11-30; with this flag the program took 2.5 s on a
# fresh host, d49ecce). Greedy batches use argmax either way.
COMMON_ARGS = {
    "cuda": ["--attention-backend", "triton", "--grammar-backend", "none", "--log-level", "info",
             "--decode-log-interval", "16", "--mem-fraction-static", "0.8", "--max-running-requests", "256",
             "--cuda-graph-max-bs", "256", "--sampling-backend", "pytorch",
             # idle schedulers (all but the measured one) otherwise spin on a CPU core each
             "--sleep-on-idle"],
    "cpu": ["--attention-backend", "torch_native", "--grammar-backend", "none", "--log-level", "info",
            "--decode-log-interval", "2", "--max-running-requests", "16", "--sleep-on-idle"],
}
# triton and flashinfer decode need CUDA: on the CPU, SGLang's torch_native decode is the baseline.
BACKENDS = {"cuda": ("deft", "flashinfer", "triton"), "cpu": ("deft", "torch_native")}
BASELINE = {"cuda": "flashinfer", "cpu": "torch_native"}
DEFAULT_BACKEND_ARGS = {"cuda": {}, "cpu": {}}
# The decode backends a run may compare (--backends), each with its --<backend>-args.
KNOWN_BACKENDS = ("deft", "flashinfer", "triton", "torch_native")


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    model: str
    new_tokens: int
    prefix: int = 0                       # shared prefix (0: no sharing)
    branches: int = 0
    private: int = 0                      # tokens of each branch's own after the prefix
    widths: tuple[int, ...] = ()          # sglang.lang tree of thought: forks per level
    target: float | None = None           # the goal: deft tok/s >= target x the baseline's
    est_s: float = 0.0                    # rough seconds for all backends before a run measured it

    @property
    def is_lang(self) -> bool:
        return bool(self.widths)

    @property
    def kv_tokens(self) -> int:
        """KV slots the batch holds at its end (prefix once, every branch's private part and output)."""
        return self.prefix + self.branches * (self.private + self.new_tokens)

    def kv_tokens_held(self, radix_cache: bool) -> int:
        """``kv_tokens`` on a server with the radix cache; without it every branch holds the prefix too."""
        return self.kv_tokens if radix_cache else self.branches * (self.prefix + self.private + self.new_tokens)

    def shape(self) -> dict:
        if self.is_lang:
            return {"widths": list(self.widths), "new_tokens": self.new_tokens}
        return {"prefix": self.prefix, "branches": self.branches, "private": self.private,
                "new_tokens": self.new_tokens}


# est_s: the devkit's triton rates (the slowest backend; shared/devkit/README.md) x 3 backends, plus
# prefill and request overheads. Used only to decide, under --budget-s, whether a first run fits.
FULL_CASES = (
    Case("p16k_64", "prefix 16000 x 64 branches x 256 new", "8b", 256, 16000, 64, 8, target=2.5, est_s=45),
    Case("p4k_64", "prefix 4000 x 64 branches x 256 new", "8b", 256, 4000, 64, 8, target=1.8, est_s=25),
    Case("p1k_256", "prefix 1000 x 256 branches x 128 new", "8b", 128, 1000, 256, 8, target=1.3, est_s=20),
    Case("nosharing_64x2k", "no sharing, 64 x 2048 prompt x 128 new", "8b", 128, 0, 64, 2048, target=0.95,
         est_s=35),
    Case("tot_3level", "tree of thought (sglang.lang), 4 x 4 x 4 forks x 32 tokens, tiny model", "tiny", 32,
         widths=(4, 4, 4), est_s=20),
)
# Head dim 256 (`--cases p4k_64_d256,nosharing_d256`; not in the default run).
HEAD_DIM_CASES = (
    Case("p4k_64_d256", "prefix 4000 x 64 branches x 256 new, 16 q / 8 kv heads of 256", "8b_d256", 256,
         4000, 64, 8, est_s=35),
    Case("nosharing_d256", "no sharing, 64 x 2048 prompt x 128 new, 16 q / 8 kv heads of 256", "8b_d256", 128,
         0, 64, 2048, est_s=60),
)
# A sliding-window model at its real size (`--cases p16k_64_gemma3,p4k_64_gemma3,nosharing_gemma3`; not in the default
# run): Gemma-3-12B's shape, five layers in six attending each query's last 1024 tokens. The forks' branches grow in
# step, so their windows start at the same place and share the prompt's part of them; the global layers share the
# whole prompt. Without sharing every window layer still reads its 1024 tokens per request.
GEMMA3_CASES = (
    Case("p16k_64_gemma3", "prefix 16000 x 64 branches x 256 new, Gemma-3-12B's shape (1024-token windows)",
         "gemma3_12b", 256, 16000, 64, 8, est_s=90),
    Case("p4k_64_gemma3", "prefix 4000 x 64 branches x 256 new, Gemma-3-12B's shape (1024-token windows)",
         "gemma3_12b", 256, 4000, 64, 8, est_s=60),
    Case("nosharing_gemma3", "no sharing, 32 x 1024 prompt x 128 new, Gemma-3-12B's shape (1024-token windows)",
         "gemma3_12b", 128, 0, 32, 1024, est_s=45),
)
# One request decoding after a long prompt (`--cases single_32k`; not in the default run): a single user's
# long-context chat, where the step has 32 (query, head) merges and each query's KV is split over the SMs.
LOW_CONCURRENCY_CASES = (
    Case("single_32k", "one request, 32000 prompt x 256 new", "8b", 256, 0, 1, 32000, est_s=40),
)
# The tree of thought at a real model's size (`--cases tot_3level_8b`; not in the default run): whether deft's
# per-step host work, which the tiny model's short steps expose, shows beside an 8B step. ``prefix``: characters of a
# document before the question (the stand-in tokenizer is byte-level: a token a character), so that the branches
# share a context worth reading once.
LANG_8B_CASES = (
    Case("tot_3level_8b", "tree of thought (sglang.lang), 4 x 4 x 4 forks x 32 tokens after a 2000-token document, "
         "8B shape", "8b_text", 32, prefix=2000, widths=(4, 4, 4), est_s=30),
)
SMOKE_CASES = (
    Case("fork_smoke", "prefix 64 x 4 branches x 8 new (smoke)", "tiny", 8, 64, 4, 8),
    Case("nosharing_smoke", "no sharing, 4 x 48 prompt x 8 new (smoke)", "tiny", 8, 0, 4, 48),
    Case("tot_smoke", "tree of thought (sglang.lang), 2 x 2 x 2 forks x 4 tokens (smoke)", "tiny", 4,
         widths=(2, 2, 2)),
)
# One small fork batch per server before anything is timed, concurrently on all servers: Triton compiles
# (deft's kernels, SGLang's triton backend) and FlashInfer JIT happen on first use.
WARMUP = {"cuda": {"8b": Case("warmup", "warm-up", "8b", 32, 2048, 64, 8),
                   "8b_d256": Case("warmup", "warm-up", "8b_d256", 32, 2048, 64, 8),
                   "8b_text": Case("warmup", "warm-up", "8b_text", 32, 2048, 64, 8),
                   "gemma3_12b": Case("warmup", "warm-up", "gemma3_12b", 32, 2048, 64, 8),
                   "tiny": Case("warmup", "warm-up", "tiny", 8, 128, 8, 8)},
          "cpu": {"tiny": Case("warmup", "warm-up", "tiny", 4, 16, 2, 4)}}


def pool_tokens(model: str, spec: ModelSpec, cases: list[Case], radix_cache: bool = True) -> int:
    """--max-total-tokens: the largest case on this model + 10% (SGLang admits a request only when its
    prompt and max_new_tokens fit), rounded up to 1024."""
    need = max([c.kv_tokens_held(radix_cache) for c in cases if c.model == model and not c.is_lang], default=0)
    return max(spec.min_pool_tokens, math.ceil(need * 1.1 / 1024) * 1024)


# --------------------------------------------------------------------------------------------------
# GPU memory: the servers start in waves that fit the card
# --------------------------------------------------------------------------------------------------
# A server's memory beyond its weights and KV pool (CUDA context, activations, CUDA graphs up to batch 256, what
# --mem-fraction-static leaves free): 1 GiB + a third of its weights' size. Set from two runs of the default servers:
# on the H200 (140 GiB) all six (3 x 8b, 3 x tiny) start together and every KV pool gets the tokens asked for; on an
# H100 (80 GB; e2e_h100_43154c5.md) they do not (two failed to start), and two 8b servers alone left the second's
# pool 5.7 GiB short of its 18.75. An 8b server is then 15 + 18.75 + 6 GiB: two of them need 79.4 GiB, above the
# H100's usable 71.7, and the default run needs 122 of the H200's 126.
SERVER_OVERHEAD_GIB = 1.0
SERVER_OVERHEAD_PER_WEIGHT = 1 / 3
# A later wave starts only with this much of --budget-s left: a start takes about a minute on the H200 (more with
# FlashInfer's JIT), and a wave that cannot also run a case only costs the time it takes to stop.
WAVE_MIN_S = 120
USABLE_MEMORY_SHARE = 0.9  # of the card's total: the rest for fragmentation and what the estimate misses
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


def model_config(spec: ModelSpec) -> dict:
    """The model's config as its servers load it: ``spec.config`` or its config.json, with the
    ``--json-model-override-args`` of its arguments applied."""
    config = dict(spec.config) if spec.config is not None else json.loads((spec.path / "config.json").read_text())
    args = list(spec.args)
    if "--json-model-override-args" in args:
        config.update(json.loads(args[args.index("--json-model-override-args") + 1]))
    return config


def server_memory_gib(spec: ModelSpec, pool_tokens: int) -> float:
    """What one server of this model with a KV pool of ``pool_tokens`` takes on the GPU, estimated: the weights of a
    dense decoder (attention, gated MLP, embeddings: the benchmark's models), the KV pool and ``SERVER_OVERHEAD_*``."""
    c = model_config(spec)
    args = list(spec.args)
    nbytes = _DTYPE_BYTES[args[args.index("--dtype") + 1]] if "--dtype" in args else 2
    hidden, layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    kv_heads, head_dim = c.get("num_key_value_heads", heads), c.get("head_dim") or hidden // heads
    per_layer = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * c["intermediate_size"]
    embeddings = c["vocab_size"] * hidden * (1 if c.get("tie_word_embeddings") else 2)
    weights = (layers * per_layer + embeddings) * nbytes / 2 ** 30
    kv = pool_tokens * layers * kv_heads * head_dim * 2 * nbytes / 2 ** 30
    return weights + kv + SERVER_OVERHEAD_GIB + SERVER_OVERHEAD_PER_WEIGHT * weights


def server_waves(servers: list[tuple[str, str]], need_gib: dict, usable_gib: float | None) -> list[list[tuple[str, str]]]:
    """The servers (in launch order) as consecutive groups whose estimated memory fits ``usable_gib`` together; one
    group without a limit. A server that does not fit alone gets a group of its own (its start says whether it fits)."""
    waves: list[list[tuple[str, str]]] = []
    used = 0.0
    for key in servers:
        if waves and (usable_gib is None or used + need_gib[key] <= usable_gib):
            waves[-1].append(key)
            used += need_gib[key]
        else:
            waves.append([key])
            used = need_gib[key]
    return waves


def radix_cache_on(extra_args: str | None) -> bool:
    """Whether a server started with these extra arguments keeps SGLang's radix cache (shared prefixes)."""
    return "--disable-radix-cache" not in shlex.split(extra_args or "")


def server_args(device: str, model: str, backend: str, cases: list[Case], backend_args: dict[str, str]) -> list[str]:
    spec = MODELS[device][model]
    extra = backend_args.get(backend, "")
    return ["--model-path", str(spec.path), *spec.args, *COMMON_ARGS[device],
            "--max-total-tokens", str(pool_tokens(model, spec, cases, radix_cache_on(extra))),
            "--decode-attention-backend", backend, *shlex.split(extra)]


# --------------------------------------------------------------------------------------------------
# Reading the servers' logs
# --------------------------------------------------------------------------------------------------
_DECODE_LINE = re.compile(r"Decode batch.*?#running-req:\s*(\d+),\s*#token:\s*(\d+),"
                          r".*?graph: (True|False), gen throughput \(token/s\):\s*([0-9.]+)")


@dataclass(frozen=True)
class DecodeLine:
    running: int      # requests in the decode batch
    tokens: int       # KV slots in use after the step (0: the batch released its KV)
    graph: bool       # the step replayed a CUDA graph
    tok_s: float      # tokens generated since the previous line / seconds since it


def parse_decode_lines(log_text: str) -> list[DecodeLine]:
    """Every ``Decode batch`` line SGLang's scheduler logged, in order (format:
    sglang/srt/observability/scheduler_metrics_mixin.py)."""
    return [DecodeLine(int(m[1]), int(m[2]), m[3] == "True", float(m[4]))
            for m in map(_DECODE_LINE.search, log_text.splitlines()) if m]


def steady_decode(log_text: str, batch: int) -> dict:
    """Median gen throughput over the lines logged while all ``batch`` requests ran. Left out: the first
    such line (its window began at the line before, so it holds the batch's prefill and whatever idle
    time preceded it) and lines with ``#token: 0`` (logged after the batch's last step released its KV;
    on the CPU they read 2x the others)."""
    lines = [x for x in parse_decode_lines(log_text) if x.running == batch and x.tokens > 0][1:]
    median = round(statistics.median(x.tok_s for x in lines), 1) if lines else None
    return {"server_log_tok_s_median": median, "server_log_lines": len(lines),
            "server_log_cuda_graph": all(x.graph for x in lines) if lines else None,
            "tpot_ms_server_log": round(1000 * batch / median, 3) if median else None}


def steady_sharing(log_text: str) -> tuple[float | None, float | None]:
    """(attended / unique KV tokens, mean host planning us per step) over the deft sharing lines in
    ``log_text`` but the first: the backend counts steps across batches, so the first line may hold
    the previous batch's last steps."""
    # imported here: on the GPU host sglang_deft imports once main() has put the overlay on the path
    from sglang_deft.sharing_metrics import parse_sharing_lines

    rows = parse_sharing_lines(log_text)[1:]
    unique = sum(r["unique_kv_tokens"] for r in rows)
    steps = sum(r["steps"] for r in rows)
    host_us = sum(r.get("plan_host_us", 0.0) * r["steps"] for r in rows)
    return ((round(sum(r["attended_kv_tokens"] for r in rows) / unique, 3) if unique else None),
            (round(host_us / steps, 1) if steps and all("plan_host_us" in r for r in rows) else None))


def settled_log(server, quiet_s: float = 0.3, max_wait_s: float = 3.0) -> str:
    """The server log once it stopped growing: the scheduler logs a step's lines after the step, and the
    client may have read the last tokens first."""
    deadline = time.monotonic() + max_wait_s
    text = server.log()
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        newer = server.log()
        if len(newer) == len(text):
            break
        text = newer
    return text


def abort_requests(server) -> None:
    """End whatever a failed run left on ``server`` (the client gave up on its requests, the server did not): the
    next runs on this GPU would share it with them, and read their late lines in the log as their own."""
    try:
        server.post("/abort_request", {"abort_all": True}, timeout_s=30)
    except Exception:  # noqa: BLE001 -- a server that died with the run has nothing left to abort
        return
    settled_log(server, max_wait_s=10)


def theoretical_sharing_ratio(case: Case, spec: ModelSpec | None = None) -> float | None:
    """KV tokens attended / unique KV tokens summed over the batch's decode steps. At decode step k
    (1..N-1; token 0 comes from the prefill) every request attends prefix + private + k tokens; the
    shared prefix is one node, each branch's own tokens are its own. On a model with sliding-window layers
    (``spec.window``) those layers attend each request's last ``window`` tokens, which start at the same place
    for every branch: the prefix's part of them is shared. Per attention layer, averaged over the model's layers,
    as deft's sharing lines count them (``sglang_deft.sharing_metrics``). ``spec``: the case's model by
    default (a model's name means the same model on every device)."""
    if case.is_lang:
        return None
    if spec is None:
        spec = next((models[case.model] for models in MODELS.values() if case.model in models), None)
    window = spec.window if spec is not None else None
    share = spec.window_share if window else 0.0
    attended = unique = 0.0
    for k in range(1, case.new_tokens):
        own = case.private + k
        length = case.prefix + own
        attended += (1 - share) * case.branches * length
        unique += (1 - share) * (case.prefix + case.branches * own)
        if window:
            start = max(0, length - window)
            attended += share * case.branches * min(length, window)
            unique += share * (max(0, case.prefix - start) + case.branches * min(own, window))
    return round(attended / unique, 3) if unique else None


def materialize_model(spec: ModelSpec) -> Path:
    """The model's directory, with ``spec.config`` written there first when it has one."""
    if spec.config is not None:
        spec.path.mkdir(parents=True, exist_ok=True)
        (spec.path / "config.json").write_text(json.dumps(spec.config, indent=1) + "\n")
    return spec.path


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------
def batch_prompts(case: Case, id_range: tuple[int, int], seed: str) -> tuple[list[int], list[list[int]]]:
    """(prefix, one prompt per branch). Branches' first own tokens are distinct, so the radix tree
    splits right after the prefix (and shares nothing at all when there is no prefix)."""
    rng = random.Random(seed)
    lo, hi = id_range
    prefix = [rng.randrange(lo, hi) for _ in range(case.prefix)]
    firsts = rng.sample(range(lo, hi), case.branches)
    return prefix, [prefix + [first] + [rng.randrange(lo, hi) for _ in range(case.private - 1)] for first in firsts]


def greedy(max_new_tokens: int, **extra) -> dict:
    return {"temperature": 0, "max_new_tokens": max_new_tokens, **extra}


@dataclass
class StreamTiming:
    """Monotonic times of one streamed batch, per request index."""
    sent: float
    first: dict[int, float] = field(default_factory=dict)  # its first chunk: the prefill's token
    last: dict[int, float] = field(default_factory=dict)   # its last chunk: finished
    tokens: dict[int, int] = field(default_factory=dict)   # completion tokens
    output_ids: dict[int, list[int]] = field(default_factory=dict)  # the generated ids (cumulative chunks)


def stream_generate(url: str, prompts: list[list[int]], new_tokens: int, timeout_s: float) -> StreamTiming:
    """One streamed ``/generate`` of all prompts. ``stream_interval`` > N makes SGLang send a request's
    first token and its end only (a chunk at every step would cost the server per-token JSON work)."""
    payload = {"input_ids": prompts, "stream": True,
               "sampling_params": greedy(new_tokens, ignore_eos=True, stream_interval=new_tokens + 1)}
    request = urllib.request.Request(f"{url}/generate", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    timing = StreamTiming(sent=time.monotonic())
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            now = time.monotonic()
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"server error: {chunk['error']}")
            index = chunk.get("index", 0)
            timing.first.setdefault(index, now)
            timing.last[index] = now
            timing.tokens[index] = chunk["meta_info"]["completion_tokens"]
            timing.output_ids[index] = chunk.get("output_ids", [])
    return timing


def output_digests(timing: StreamTiming, batch: int, new_tokens: int) -> str:
    """A short digest of each request's generated ids, in request order, space-separated (one JSON line
    per run): what the report compares between backends (greedy: the same requests should decode to the
    same tokens, up to near ties)."""
    got = [timing.output_ids.get(i, []) for i in range(batch)]
    if any(len(ids) != new_tokens for ids in got):
        raise RuntimeError(f"expected {new_tokens} output ids per request, got {sorted(len(ids) for ids in got)}")
    return " ".join(hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:12] for ids in got)


def decode_figures(timing: StreamTiming, batch: int, new_tokens: int) -> dict:
    """Client-side figures of a streamed batch (see the module docstring)."""
    if len(timing.tokens) != batch or any(n != new_tokens for n in timing.tokens.values()):
        raise RuntimeError(f"expected {batch} requests x {new_tokens} tokens, got {sorted(timing.tokens.values())}")
    all_prefilled, end = max(timing.first.values()), max(timing.last.values())
    window = end - all_prefilled
    if window <= 0:
        raise RuntimeError("no decode window (first and last chunks arrived together)")
    return {"wall_s": round(end - timing.sent, 3),
            "ttft_s": round(min(timing.first.values()) - timing.sent, 3),
            "prefill_done_s": round(all_prefilled - timing.sent, 3),
            "decode_window_s": round(window, 3),
            "client_tok_s": round(batch * (new_tokens - 1) / window, 1),
            "tpot_ms": round(1000 * window / (new_tokens - 1), 3)}


def make_tree_of_thought():
    import sglang as sgl

    @sgl.function
    def tree_of_thought(s, question, widths, max_tokens):
        """Question -> thoughts -> sub-thoughts -> answers, a fork per node; returns every generation's
        completion tokens (ignore_eos: each is max_tokens long, whatever the random model says)."""
        s += "Think step by step, in several directions.\nQuestion: " + question + "\n"
        frontier, generated = [s], []
        for level, width in enumerate(widths):
            var, following = f"level{level}", []
            for state in frontier:
                # fork() caches the prefix first only when the state's text is committed (see
                # examples/tree_of_thought.py); sync() waits for this state's own generation alone.
                state.sync()
                for i, branch in enumerate(state.fork(width)):
                    branch += f" Step {level + 1}, idea {i + 1}:"
                    branch += sgl.gen(var, max_tokens=max_tokens, temperature=0, ignore_eos=True)
                    following.append(branch)
                    generated.append((branch, var))
            frontier = following
        return [state.get_meta_info(var)["completion_tokens"] for state, var in generated]

    return tree_of_thought


QUESTION = ("A ferry crosses a river eleven times a day, carrying at most forty passengers and six carts. "
            "On market days twice as many people travel in the morning as in the evening. "
            "How many crossings are needed on a market day when three hundred people come?")


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------
def measure_batch(server, backend: str, case: Case, id_range: tuple[int, int], seed: str, timeout_s: float) -> dict:
    prefix, prompts = batch_prompts(case, id_range, seed)
    if prefix:
        server.generate({"input_ids": prefix, "sampling_params": greedy(1)}, timeout_s=timeout_s)
    before = settled_log(server)
    timing = stream_generate(server.url, prompts, case.new_tokens, timeout_s)
    figures = decode_figures(timing, case.branches, case.new_tokens)
    figures["output_digests"] = output_digests(timing, case.branches, case.new_tokens)
    after = settled_log(server)
    new_log = after[len(before):]
    most = max((x.running for x in parse_decode_lines(new_log)), default=0)
    if most < case.branches:
        # Admitted in waves (a KV pool too small for the batch): no step decoded the workload as described, and
        # the client's figure would time only the last wave's decode.
        raise RuntimeError(f"the batch of {case.branches} requests never decoded together (at most {most} at "
                           "once in the server's log)")
    figures.update(steady_decode(new_log, case.branches), **sharing(backend, case, new_log))
    if figures.get("plan_host_us") and figures.get("tpot_ms"):
        # The backend's per-step host work against the step: the issue's <= 3% budget.
        figures["plan_host_share"] = round(figures["plan_host_us"] / (1e3 * figures["tpot_ms"]), 4)
    median = figures["server_log_tok_s_median"]
    figures["tok_s"], figures["tok_s_source"] = ((median, "server_log_median") if median
                                                 else (figures["client_tok_s"], "client"))
    return figures


def lang_question(rep: int, document_chars: int = 0) -> str:
    """The tree of thought's question in repetition ``rep``: the same for every backend, another for every repetition
    (as the batch cases' prompts), so that no repetition finds its prompts in the server's radix cache; after a
    document of ``document_chars`` characters (the question's words in a random order) where asked for."""
    document = ""
    if document_chars:
        rng, words = random.Random(f"document {rep}"), QUESTION.split()
        while len(document) < document_chars:
            document += rng.choice(words) + " "
        document = "Document: " + document[:document_chars - len("Document: ") - 1] + "\n"
    return f"Puzzle {rep}. {document}{QUESTION}"


def measure_lang(server, backend: str, case: Case, program, rep: int) -> dict:
    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

    endpoint = RuntimeEndpoint(server.url)
    before = settled_log(server)
    start = time.monotonic()
    counts = program.run(question=lang_question(rep, case.prefix), widths=case.widths, max_tokens=case.new_tokens,
                         backend=endpoint).ret_value
    wall = time.monotonic() - start
    after = settled_log(server)
    tok_s = round(sum(counts) / wall, 1)
    return {"wall_s": round(wall, 3), "generations": len(counts), "completion_tokens": sum(counts),
            "client_tok_s": tok_s, "server_log_tok_s_median": None, "tpot_ms": None,
            **sharing(backend, case, after[len(before):]), "tok_s": tok_s, "tok_s_source": "client"}


def sharing(backend: str, case: Case, new_log: str) -> dict:
    if backend == "deft":
        ratio, host_us = steady_sharing(new_log)
        return {"sharing_ratio": ratio, "sharing_ratio_source": "deft log", "plan_host_us": host_us}
    ratio = theoretical_sharing_ratio(case)
    return {"sharing_ratio": ratio,
            "sharing_ratio_source": "theoretical (case shape)" if ratio else None}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def summarize_backend(runs: list[dict]) -> dict:
    """The best ok run's figures (highest tok/s), every run kept under ``runs``."""
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return {"ok": False, "error": runs[-1].get("error") if runs else "not run", "runs": runs}
    # SGLang's logged rate where a run has it (the client's figure runs 1-22% lower), then the highest.
    best = max(ok, key=lambda r: (r.get("tok_s_source") != "client", r["tok_s"]))
    keys = ("tok_s", "tok_s_source", "client_tok_s", "server_log_tok_s_median", "server_log_cuda_graph", "tpot_ms",
            "sharing_ratio", "sharing_ratio_source", "plan_host_us", "plan_host_share", "wall_s")
    return {"ok": True, **{k: best.get(k) for k in keys}, "runs": runs}


def summarize_case(entry: dict, backends: tuple[str, ...], baseline: str) -> None:
    """Fill the case's top-level fields from its per-backend runs (the verdict against the entry's target)."""
    for backend in backends:
        summary = summarize_backend(entry["runs"].get(backend, []))
        entry["backends"][backend] = summary
        entry[f"{backend}_tok_s"] = summary.get("tok_s")
    ratio = entry[f"deft_vs_{baseline}"] = deft_ratio(entry, baseline)
    target = entry.get("target")
    entry["meets_target"] = (ratio >= target) if ratio is not None and target is not None else None
    entry["same_outputs"] = same_outputs(entry["runs"], backends, baseline)
    entry["deft_outputs_ok"] = deft_outputs_ok(entry["same_outputs"])


def deft_outputs_ok(same: dict | None) -> bool | None:
    """Whether deft passes the output check (None where nothing was compared): a backend that decodes garbage or
    nothing agrees with no one, so deft fails with under half of the requests equal to the reference's while the
    other backends compared (if any) have at least half. On dummy weights a near-tie flips a few requests, not
    half; where every backend is that far off, the check says nothing of deft."""
    if not same or "deft" not in same["equal"]:
        return None
    half = same["requests"] / 2
    others = [n for b, n in same["equal"].items() if b != "deft"]
    return not (same["equal"]["deft"] < half and (not others or max(others) >= half))


def same_outputs(runs: dict[str, list[dict]], backends: tuple[str, ...], baseline: str) -> dict | None:
    """Each backend's generated tokens against the reference's (the baseline, else the first other
    backend than deft, as in the table), repetition by repetition (each repetition has prompts of its
    own): per backend, how many requests decoded to the same ids in its worst repetition, of how many;
    None when no two backends have digests of the same repetition (lang cases, failed runs)."""
    digests = {b: {r["rep"]: r["output_digests"].split() for r in runs.get(b, [])
                   if r.get("ok") and r.get("output_digests")} for b in backends}
    reference = baseline if digests.get(baseline) else next((b for b in backends if b != "deft" and digests.get(b)), None)
    if reference is None:
        return None
    ref = digests[reference]
    counts = {b: min(sum(x == y for x, y in zip(d, ref[rep])) for rep, d in ds.items() if rep in ref)
              for b, ds in digests.items() if b != reference and set(ds) & set(ref)}
    return {"reference": reference, "requests": len(next(iter(ref.values()))), "equal": counts} if counts else None


def compared_tok_s(entry: dict, backend: str, other: str) -> tuple[float | None, float | None, bool]:
    """(``backend``'s, ``other``'s decode tok/s, whether both are the client's) in a summarized case, by one
    measure: when one side has SGLang's logged rate and the other only the client's, the client's figures of both."""
    mine, base = entry.get(f"{backend}_tok_s"), entry.get(f"{other}_tok_s")
    m, b = (entry.get("backends", {}).get(x, {}) for x in (backend, other))
    client = m.get("tok_s_source") == "client"
    if m.get("tok_s_source") and b.get("tok_s_source") and m["tok_s_source"] != b["tok_s_source"]:
        mine, base, client = m.get("client_tok_s"), b.get("client_tok_s"), True
    return mine, base, client


def tok_s_ratio(entry: dict, backend: str, other: str) -> float | None:
    """``backend``'s decode tok/s over ``other``'s by one measure (``compared_tok_s``); None when either is
    missing."""
    mine, base, _ = compared_tok_s(entry, backend, other)
    return round(mine / base, 3) if mine and base else None


def deft_ratio(entry: dict, other: str) -> float | None:
    return tok_s_ratio(entry, "deft", other)


def _num(x, digits=0) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def markdown(report: dict) -> str:
    backends, baseline = report["backends"], report["baseline"]
    # A run without the baseline (e.g. `--backends deft,triton`: three 8B servers of head dim 256 do not
    # fit one H200's memory) shows deft against the first other backend, without the baseline's target.
    compared = baseline if baseline in backends else next((x for x in backends if x != "deft"), baseline)
    targets = compared == baseline and any(c.get("target") for c in report["cases"])
    cuda_graph = {b: report["cuda_graph"].get(b) for b in backends}
    lines = [f"# End-to-end decode throughput ({report.get('gpu') or report['device_mode']})", "",
             f"{report['date']}, commit {report.get('commit')}, sglang {report['versions'].get('sglang')}. "
             "Decode tok/s: SGLang's logged gen throughput while the whole batch ran (median), else client-side "
             "(`*`); per backend the run with the highest, whose client-side TPOT is shown (so a TPOT ratio need "
             "not equal the tok/s ratio). Tiny-model rows measure per-step overhead. Sharing ratio and host "
             "µs/step: over the deft sharing lines logged during the batch but its first (one per "
             "--decode-log-interval steps: 16 on the GPU), so not over the same steps as the shape, which covers "
             "all of them: either may be the higher. CUDA graphs: "
             + ", ".join(f"{b} {graphs_label(cuda_graph[b])}"
                         for b in backends) + "."
             + "".join(f" {b} launched with `{a}`." for b, a in report.get("backend_extra_args", {}).items()
                       if a and b in backends), "",
             "| case | " + " | ".join(f"{b} tok/s" for b in backends) + f" | deft / {compared}{' (target)' if targets else ''} | "
             + " | ".join(f"client TPOT {b} ms" for b in backends) + " | sharing ratio | deft host µs/step (share) "
             "| same tokens as the reference |",
             "|---|" + "---|" * (2 * len(backends) + 4)]
    for c in report["cases"]:
        cells = []
        for b in backends:
            s = c["backends"].get(b, {})
            mark = "*" if s.get("tok_s_source") == "client" else ""
            cells.append(_num(s.get("tok_s")) + mark if s.get("ok") else ("error" if s.get("runs") else "—"))
        ratio, target, verdict = deft_ratio(c, compared), "", ""
        if compared == baseline:  # the target is the baseline's
            target = f" (≥ {c['target']:g})" if c.get("target") else ""
            verdict = {True: " ✓", False: " ✗"}.get(c.get("meets_target"), "")
        tpots = [_num(c["backends"].get(b, {}).get("tpot_ms"), 2) for b in backends]
        deft_share = c["backends"].get("deft", {}).get("sharing_ratio")
        share = f"{_num(deft_share, 2)} (shape {_num(c.get('theoretical_sharing_ratio'), 2)})"
        deft = c["backends"].get("deft", {})
        host_share = deft.get("plan_host_share")
        host = _num(deft.get("plan_host_us"), 0) + (f" ({100 * host_share:.1f}%)" if host_share else "")
        lines.append(f"| {c['case']}{' (skipped: ' + c['skipped'][-1] + ')' if c.get('skipped') else ''} | "
                     + " | ".join(cells) + f" | {_num(ratio, 2)}{target}{verdict} | " + " | ".join(tpots)
                     + f" | {share} | {host} | {_same_outputs_cell(c.get('same_outputs'))}{' ✗ (deft fails the output check)' if c.get('deft_outputs_ok') is False else ''} |")
    if not radix_cache_on(report.get("backend_extra_args", {}).get("deft")):
        lines += ["", "deft's server ran without the radix cache: nothing is shared, so the cases' targets (set for "
                  "their shared prefixes) do not apply; the sharing ratio's shape is what the radix cache would share."]
    if not report.get("complete", True):
        failed = [name for name, s in report.get("servers", {}).items() if not s.get("ok")]
        lines += ["", "**Incomplete run**: not every case has a good run on every backend"
                  + (f"; servers that did not start: {', '.join(failed)}" if failed else "") + "."]
    return "\n".join(lines) + "\n"


def case_complete(case: dict, backends) -> bool:
    """Every backend measured, and deft not failing the output check (it made the run complete, exit 0, with deft's
    tokens equal to the reference's on none of the requests)."""
    return all(case["backends"].get(b, {}).get("ok") for b in backends) and case.get("deft_outputs_ok") is not False


def graphs_on(servers: list[bool | None]) -> bool | str | None:
    """A backend's CUDA graphs over its servers (one per model): True or False where all that came up agree, else
    "mixed" (a tiny server eager beside an 8B one with graphs read "on"). None in and out: no server came up, so
    nothing says whether graphs were on."""
    on = [x for x in servers if x is not None]
    return "mixed" if len(set(on)) > 1 else on[0] if on else None


def graphs_label(on: bool | str | None) -> str:
    return {True: "on", False: "off", None: "unknown (no server came up)"}.get(on, on)


def _same_outputs_cell(same: dict | None) -> str:
    if not same:
        return "—"
    return f"{same['reference']}: " + ", ".join(f"{b} {n}/{same['requests']}" for b, n in same["equal"].items())


class Report:
    """The JSON and markdown files, rewritten whole (write + rename) after every measurement."""

    def __init__(self, out: Path, tag: str, data: dict):
        self.json_path, self.md_path, self.data = out / f"e2e_{tag}.json", out / f"e2e_{tag}.md", data

    def save(self, clock) -> None:
        self.data["wall_s"] = round(clock.elapsed(), 1)
        for path, text in ((self.json_path, json.dumps(self.data, indent=2)), (self.md_path, markdown(self.data))):
            gpu_e2e.write_replacing(path, text)


def versions() -> dict:
    found = {}
    for name in ("sglang", "torch", "triton", "flashinfer-python"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float, reserve_s: float):
        self.deadline = time.monotonic() + (seconds if seconds > 0 else 10 ** 9)
        self.reserve_s = reserve_s  # stopping the servers and the last save

    def left(self) -> float:
        return self.deadline - time.monotonic() - self.reserve_s


class Bench:
    def __init__(self, args, cases: list[Case], report: Report, fleet, clock):
        self.args, self.cases, self.report, self.fleet, self.clock = args, cases, report, fleet, clock
        self.device = args.device
        self.backends = tuple(args.backends)
        self.models = sorted({c.model for c in cases})
        self.servers: dict[tuple[str, str], object] = {}  # (model, backend) -> ServerProcess, while its wave runs
        self.graphs: dict[tuple[str, str], bool | None] = {}  # (model, backend) -> CUDA graphs on, per server started
        self.budget = Budget(args.budget_s, reserve_s=30)
        self.program = make_tree_of_thought() if any(c.is_lang for c in cases) else None

    def save(self) -> None:
        self.report.save(self.clock)

    def request_timeout(self) -> float:
        """Seconds one request may take: the budget's rest, but never unbounded (a hung server)."""
        return max(30.0, min(600.0, self.budget.left()))

    def run(self) -> None:
        """Every case on every backend: the servers start in waves that fit the GPU (``server_waves``; one wave where
        all fit, as on the H200), each wave's cases run, then its servers stop before the next wave starts."""
        waves = self.plan_waves()
        for i, wave in enumerate(waves, 1):
            if len(waves) > 1:
                self.clock.note(f"wave {i} of {len(waves)}", extra=", ".join(f"{m}-{b}" for m, b in wave))
            if i > 1 and self.budget.left() < WAVE_MIN_S:
                self.skip_wave(wave)
                continue
            first = len(self.fleet.running)
            self.start_servers(wave)
            self.run_all(wave)
            if i < len(waves):  # (main stops the last wave's with everything else)
                start = time.monotonic()
                self.fleet.stop(self.fleet.running[first:])
                for key in wave:
                    self.servers.pop(key, None)
                self.clock.note(f"wave {i} stopped", time.monotonic() - start)

    def skip_wave(self, wave: list[tuple[str, str]]) -> None:
        """A wave not started (the budget's rest would not start and run it): each of its cases says so."""
        why = f"servers {', '.join(f'{m}-{b}' for m, b in wave)} not started: {self.budget.left():.0f}s of the budget left"
        self.clock.note("wave skipped", extra=why)
        for case in self.cases:
            if any(model == case.model for model, _ in wave):
                entry = self.case_entry(case)
                entry.setdefault("skipped", []).append(why)
                summarize_case(entry, self.backends, self.report.data["baseline"])
        self.save()

    def plan_waves(self) -> list[list[tuple[str, str]]]:
        """The servers in launch order (per model, per backend), grouped by ``server_waves`` on the card's memory
        (``--gpu-memory-gib``; the JSON's ``memory`` says what was estimated and how the servers were grouped)."""
        keys = [(model, backend) for model in self.models for backend in self.backends]
        usable = None
        if self.device == "cuda" and self.args.gpu_memory_gib:
            usable = USABLE_MEMORY_SHARE * self.args.gpu_memory_gib
        need = {(model, backend): server_memory_gib(MODELS[self.device][model], pool_tokens(
                    model, MODELS[self.device][model], self.cases,
                    radix_cache_on(self.args.backend_args.get(backend))))
                for model, backend in keys}
        waves = server_waves(keys, need, usable)
        self.report.data["memory"] = {
            "gpu_gib": self.args.gpu_memory_gib, "usable_gib": usable and round(usable, 1),
            "server_gib": {f"{m}-{b}": round(gib, 1) for (m, b), gib in need.items()},
            "waves": [[f"{m}-{b}" for m, b in wave] for wave in waves]}
        return waves

    def start_servers(self, wave: list[tuple[str, str]]) -> None:
        """The wave's servers at once; each is awaited, checked and warmed up in its own thread."""
        launched = {}
        for model, backend in wave:
            materialize_model(MODELS[self.device][model])
            cmd = server_args(self.device, model, backend, self.cases, self.args.backend_args)
            self.report.data["server_args"].setdefault(model, {})[backend] = cmd
            launched[(model, backend)] = self.fleet.launch(model, backend, backend, cmd)
        self.save()
        pool = ThreadPoolExecutor(max_workers=len(launched))
        try:
            results = dict(zip(launched, pool.map(self.ready_and_warm, launched, launched.values())))
        finally:
            # Not `with`: on SIGTERM its exit would wait for every server to come up. main() stops the
            # servers instead, and the waiting threads then end at once.
            pool.shutdown(wait=False, cancel_futures=True)
        for (model, backend), (result, server) in results.items():
            self.report.data["servers"][f"{model}-{backend}"] = result
            self.graphs[(model, backend)] = result.get("cuda_graph")
            if server is not None:
                self.servers[(model, backend)] = server
        self.report.data["cuda_graph"] = {b: graphs_on([on for (_, backend), on in self.graphs.items() if backend == b])
                                          for b in self.backends}
        self.save()

    def ready_and_warm(self, key: tuple[str, str], launched) -> tuple[dict, object]:
        """(the server's entry for the report, its ServerProcess or None if it did not come up)."""
        model, backend = key
        try:
            launched = self.wait_ready(key, launched)
            info = launched.server.server_info()
            start = time.monotonic()
            # the timed runs' own path (prefix cached, then the streamed batch), on a smaller fork
            measure_batch(launched.server, backend, WARMUP[self.device][model], MODELS[self.device][model].id_range,
                          "warmup", self.request_timeout())
            warm_s = time.monotonic() - start
            self.clock.note(f"{launched.server.name} warmed up", warm_s)
            return {"ok": True, "ready_s": round(launched.ready_s, 1), "warmup_s": round(warm_s, 1),
                    "max_total_num_tokens": info.get("max_total_num_tokens"),
                    "cuda_graph": self.device == "cuda" and not info.get("disable_cuda_graph", True)}, launched.server
        except Exception as e:  # noqa: BLE001 -- one server failing must not stop the others' cases
            self.clock.note(f"{launched.server.name} FAILED", extra=str(e)[-300:])
            abort_requests(launched.server)  # a warm-up cut off by its timeout would decode beside the others
            return {"ok": False, "error": f"{type(e).__name__}: {str(e)[-3000:]}"}, None

    def wait_ready(self, key: tuple[str, str], launched):
        """The launched server once ready; relaunched once if its port was taken between picking and
        binding it (servers starting together pick free ports at the same time), as gpu_e2e.py does."""
        try:
            self.fleet.wait(launched, min(self.args.startup_timeout, self.budget.left()))
            return launched
        except (RuntimeError, TimeoutError) as e:
            if not launched.server.port_taken():
                raise
            self.clock.note(f"{launched.server.name} port clash, relaunching", extra=str(e)[-200:])
            self.fleet.stop([launched])
            model, backend = key
            launched = self.fleet.launch(model, backend, backend, self.report.data["server_args"][model][backend])
            self.fleet.wait(launched, min(self.args.startup_timeout, self.budget.left()))
            return launched

    def case_entry(self, case: Case) -> dict:
        entries = self.report.data["cases"]
        for entry in entries:
            if entry["key"] == case.key:
                return entry
        # The targets are set for the cases' shared prefixes: a deft server without the radix cache shares
        # nothing, and is compared with the baseline without one.
        target = case.target if radix_cache_on(self.args.backend_args.get("deft")) else None
        entry = {"case": case.label, "key": case.key, "model": case.model, "shape": case.shape(),
                 "target": target,
                 "theoretical_sharing_ratio": theoretical_sharing_ratio(case),
                 "runs": {}, "backends": {}}
        entries.append(entry)
        return entry

    def run_all(self, wave: list[tuple[str, str]]) -> None:
        """The cases of the wave's servers: repetition 1 of every case before any repetition 2; within a case, one
        backend at a time."""
        spent: dict[str, float] = {}
        for rep in range(1, self.args.repeats + 1):
            for case in self.cases:
                backends = [backend for model, backend in wave if model == case.model]
                if not backends:
                    continue
                entry = self.case_entry(case)
                need = spent.get(case.key, case.est_s * len(backends) / len(self.backends))
                if self.budget.left() < need:
                    entry.setdefault("skipped", []).append(
                        f"repetition {rep} ({', '.join(backends)}): {self.budget.left():.0f}s of the budget left, "
                        f"about {need:.0f}s needed")
                    self.clock.note(f"{case.key} rep {rep} skipped", extra=entry["skipped"][-1])
                    summarize_case(entry, self.backends, self.report.data["baseline"])
                    self.save()
                    continue
                start = time.monotonic()
                for backend in backends:
                    self.run_one(case, backend, rep, entry)
                spent[case.key] = 1.1 * (time.monotonic() - start)

    def run_one(self, case: Case, backend: str, rep: int, entry: dict) -> None:
        runs = entry["runs"].setdefault(backend, [])
        server = self.servers.get((case.model, backend))
        name = f"{case.model}-{backend}"
        if server is None:
            runs.append({"rep": rep, "ok": False, "error": f"server {name} did not start (see servers.{name})"})
        elif (held := case.kv_tokens_held(radix_cache_on(self.args.backend_args.get(backend)))) > (
                self.report.data["servers"][name].get("max_total_num_tokens") or 0):
            runs.append({"rep": rep, "ok": False, "error": (
                f"KV pool of {self.report.data['servers'][name].get('max_total_num_tokens')} tokens < the "
                f"{held} the case holds (GPU memory shared with the other servers)")})
        else:
            start = time.monotonic()
            try:
                figures = (measure_lang(server, backend, case, self.program, rep) if case.is_lang else
                           measure_batch(server, backend, case, MODELS[self.device][case.model].id_range,
                                         f"{case.key}:{rep}", self.request_timeout()))
                runs.append({"rep": rep, "ok": True, **figures})
                self.clock.note(f"{case.key} {backend} rep {rep}", time.monotonic() - start,
                                f"{figures['tok_s']:.0f} tok/s ({figures['tok_s_source']}), "
                                f"client {figures['client_tok_s']:.0f}")
            except Exception as e:  # noqa: BLE001 -- recorded; the other backends and cases go on
                runs.append({"rep": rep, "ok": False, "error": f"{type(e).__name__}: {e}"[-3000:],
                             "traceback": traceback.format_exc()[-3000:]})
                self.clock.note(f"{case.key} {backend} rep {rep} FAILED", time.monotonic() - start, str(e)[-300:])
                abort_requests(server)
        summarize_case(entry, self.backends, self.report.data["baseline"])
        self.save()


def data_parallel_size(launcher_args: str | None) -> int:
    """The DP size that SGLang's launcher would take from ``launcher_args`` (its last --dp-size / --dp /
    --data-parallel-size, as ``--flag N`` or ``--flag=N``); 1 without one."""
    size, words = 1, shlex.split(launcher_args or "")
    for i, word in enumerate(words):
        flag, eq, value = word.partition("=")
        if flag in ("--dp-size", "--dp", "--data-parallel-size"):
            value = value if eq else (words[i + 1] if i + 1 < len(words) else "")
            try:
                size = int(value)
            except ValueError:
                raise SystemExit(f"{flag} needs a number, got {value!r} in {launcher_args!r}") from None
    return size


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="End-to-end decode throughput: deft vs SGLang's flashinfer and "
                                            "triton decode backends, same requests")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_e2e_out")))
    p.add_argument("--log-dir", type=Path, default=None, help="server logs (default OUT/logs)")
    p.add_argument("--tag", default=None, help="file names e2e_TAG.* (default: the GPU's, h200 or h100 ..., as "
                                               "nvidia-smi names it; cpu with --device cpu; then the --cases asked "
                                               "for, if any)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a dry run of the whole flow on SGLang's CPU engine (needs --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the tiny model only")
    p.add_argument("--cases", default=None, help="comma-separated case keys (default: all of the profile)")
    p.add_argument("--backends", default=None, help="comma-separated (default deft,flashinfer,triton on cuda)")
    p.add_argument("--repeats", type=int, default=2, help="runs per case and backend; the best is reported")
    p.add_argument("--budget-s", type=float, default=0, help="wall-clock budget; skip what would overrun (0: none)")
    p.add_argument("--startup-timeout", type=float, default=420)
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="the GPU memory the servers share, for starting them in waves that fit it (default: the first "
                        "GPU's total, from nvidia-smi; 0: every server at once)")
    p.add_argument("--commit", default=os.environ.get("DEFT_COMMIT"))
    for backend in KNOWN_BACKENDS:
        p.add_argument(f"--{backend.replace('_', '-')}-args", default=None, metavar="ARGS",
                       help=f"extra launcher arguments for the {backend} servers, one string; write "
                            f"--{backend.replace('_', '-')}-args='...' (an empty one: --{backend.replace('_', '-')}"
                            "-args=)")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.smoke:
        p.error("--device cpu runs the smoke shapes only: add --smoke")
    if args.tag is None:
        args.tag = card.card_tag() if args.device == "cuda" else "cpu"
        # A run of some cases, or of the smoke shapes on a GPU, replaced a whole run's e2e_<card>.* under the same name.
        if args.smoke and args.device == "cuda":
            args.tag += "_smoke"
        if args.cases:
            args.tag += "".join(f"_{k.strip()}" for k in args.cases.split(",") if k.strip())
    if args.gpu_memory_gib is None and args.device == "cuda":
        args.gpu_memory_gib = card.memory_gib()
    if args.repeats < 1:  # 0 started every server and wrote an empty report
        p.error("--repeats must be at least 1")
    if args.backends is None:
        args.backends = list(BACKENDS[args.device])
    else:  # checked before any server starts: a typo was a decode backend SGLang refused after the others' start-up
        args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        wrong = [b for b in args.backends if b not in KNOWN_BACKENDS]
        if wrong or not args.backends or len(set(args.backends)) < len(args.backends):
            p.error(f"--backends: {', '.join(wrong) + ' unknown; ' if wrong else ''}a comma-separated list of "
                    f"distinct backends out of {', '.join(KNOWN_BACKENDS)}")
    args.backend_args = dict(DEFAULT_BACKEND_ARGS[args.device])
    for backend in KNOWN_BACKENDS:
        given = getattr(args, f"{backend}_args")
        if given is not None:
            args.backend_args[backend] = given
        if data_parallel_size(given) > 1:
            # Each DP scheduler logs its own share of the batch: no decode line would show the case's batch.
            p.error(f"--{backend.replace('_', '-')}-args with data parallelism: each DP rank logs only its share of "
                    "the batch, which this benchmark's figures (SGLang's decode lines of the whole batch) cannot use")
    return args


def select_cases(args) -> list[Case]:
    profile = SMOKE_CASES if args.smoke else FULL_CASES
    if not args.cases:
        return list(profile)
    if not args.smoke:
        profile += HEAD_DIM_CASES + GEMMA3_CASES + LOW_CONCURRENCY_CASES + LANG_8B_CASES
    keys = [k.strip() for k in args.cases.split(",") if k.strip()]  # as --tag's and bench_kernels' --cases take them
    unknown = sorted(set(keys) - {c.key for c in profile})
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {[c.key for c in profile]}")
    return [c for c in profile if c.key in keys]


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, gpu_e2e._sigterm)  # private there; unwinds through our finally too
    cases = select_cases(args)
    clock = gpu_e2e.Clock()
    log_dir = args.log_dir or args.out / "logs"
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "server_pgids.txt").write_text("")
    env, cwd = gpu_e2e.importable_package_env()
    info = gpu_e2e.device_info(args.commit)
    report = Report(args.out, args.tag, {
        "gpu": info["gpu"], "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": info["commit"], "versions": versions(), "device_mode": args.device, "smoke": args.smoke,
        "backends": args.backends, "baseline": BASELINE[args.device], "backend_extra_args": args.backend_args,
        "repeats": args.repeats, "budget_s": args.budget_s,
        "method": ("tok_s: median of SGLang's 'gen throughput' log lines while all B requests ran (first one "
                   "left out), else client-side; client_tok_s: B x (N-1) / (last chunk - last first token), "
                   "streamed; tpot_ms: that window / (N-1); per backend the repetition with the highest tok_s, "
                   "all its figures from that run. sharing_ratio: deft's "
                   "logged attended/unique KV tokens, or the case shape's for the other backends. Tiny-model "
                   "cases measure per-step overhead."),
        "server_args": {}, "servers": {}, "cuda_graph": {}, "cases": [], "complete": False,
        "timings": clock.phases})
    fleet = gpu_e2e.Fleet(env, cwd, log_dir, clock)
    bench = Bench(args, cases, report, fleet, clock)
    try:
        bench.run()
    except BaseException as e:  # SIGTERM (SystemExit) or Ctrl-C: keep what was measured, say why it stopped
        report.data["interrupted"] = f"{type(e).__name__}: {e}"
        report.save(clock)  # before the servers' stop, which may outlast the caller's grace
        raise
    finally:
        start = time.monotonic()
        fleet.stop_all()
        clock.note("servers stopped", time.monotonic() - start)
        report.save(clock)
    done = [c for c in report.data["cases"] if case_complete(c, args.backends)]
    report.data["complete"] = len(done) == len(cases)
    report.save(clock)
    print(markdown(report.data))
    clock.note(f"done: complete={report.data['complete']} -> {report.json_path}")
    return 0 if report.data["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
