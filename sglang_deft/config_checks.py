"""Configurations the deft decode path cannot serve correctly, refused at startup with the reason.

Three checks, each where its facts are first known:
- :func:`check_server_args`: flags, in the launching process before any subprocess starts;
- :func:`check_model_config`: the Hugging Face config (architecture, hybrid SWA memory, MLA, ...), in
  the launching process too;
- :func:`check_model_runner`: the loaded model's attention layers, in the scheduler process when
  SGLang creates the backend (the launcher-independent last line, e.g. for ``sglang_deft.Engine``).

Each raises :class:`UnsupportedConfiguration` listing every problem found, each naming the flag or
the model property and why. None of them does anything when deft is not selected.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from pathlib import Path

from sglang_deft import cpu_compat

logger = logging.getLogger(__name__)

BACKEND_NAME = "deft"

# SGLang's attention backends that run prefill on a CPU (intel_amx falls back to torch_native
# without AMX).
_CPU_PREFILL_BACKENDS = ("torch_native", "intel_amx")
# SGLang 0.5.10's prefill backends that apply a layer's sliding window in every extend step. Not torch_native and
# intel_amx (no window at all), nor flashinfer: its ragged prefill (every extend outside a piecewise CUDA graph:
# --disable-piecewise-cuda-graph, LoRA, input logprobs, ...) is planned and run without window_left.
_WINDOW_PREFILL_BACKENDS = ("triton", "fa3")
# --kv-cache-dtype values deft reads (SGLang's choices less fp4_e2m1): the model's dtype, or fp8 (read as
# stored, computed in the model's dtype, with the layers' K/V scales as SGLang's triton decode applies them).
# bf16 is the model's dtype only for a bf16 model: model_runner_problems checks the pool against the model.
_SERVED_KV_DTYPES = ("auto", "bfloat16", "bf16", "fp8_e4m3", "fp8_e5m2")


class UnsupportedConfiguration(ValueError):
    """The deft attention backend was selected for a configuration it cannot serve correctly."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"the `{BACKEND_NAME}` attention backend cannot serve this configuration:\n{lines}")


def backend_names(server_args) -> tuple[str | None, str | None]:
    """(the decode backend, the prefill/extend backend): ``--attention-backend`` where no override names one."""
    return (server_args.decode_attention_backend or server_args.attention_backend,
            server_args.prefill_attention_backend or server_args.attention_backend)


def deft_roles(server_args) -> tuple[bool, bool]:
    """(deft runs decode, deft runs prefill/extend), from ``--attention-backend`` and its overrides."""
    decode, prefill = backend_names(server_args)
    return decode == BACKEND_NAME, prefill == BACKEND_NAME


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise UnsupportedConfiguration(problems)


def deterministic_inference_problem(enabled: bool, rl_on_policy_target: str | None) -> str | None:
    """Why deft decode cannot serve deterministic inference, naming the flag the user gave (SGLang turns it on
    itself for --rl-on-policy-target, ServerArgs._handle_deterministic_inference); None when it is off."""
    if not (enabled or rl_on_policy_target is not None):
        return None
    flag = ("--enable-deterministic-inference" if rl_on_policy_target is None else
            f"--rl-on-policy-target {rl_on_policy_target} (which turns on --enable-deterministic-inference)")
    return (f"{flag}: deft splits each decode step's attention by that batch's KV tree "
            "(shared prefixes, chunks cut for the batch), so a request's output bits depend on what it is batched "
            "with; deterministic inference needs batch-invariant decode attention (SGLang's flashinfer, fa3 or "
            "triton decode)")


HYBRID_LINEAR_ATTENTION = "hybrid linear-attention / Mamba models are not supported by the deft backend"
# Hybrid Mamba models whose ServerArgs assert that the attention backend is not triton, deft's prefill on a GPU.
_NO_TRITON_HYBRIDS = ("NemotronHForCausalLM", "Lfm2ForCausalLM")
# Models whose ServerArgs assert, when they have sliding-window layers, an attention backend of these.
_WINDOW_ASSERTING = {"Exaone4ForCausalLM": ("fa3", "triton", "trtllm_mha"),
                     "ExaoneMoEForCausalLM": ("fa3", "triton", "trtllm_mha")}


def model_file_problems(model_path: str | None, override_args: str | None = None,
                        revision: str | None = None, extend_backend: str | None = None) -> list[str]:
    """Problems of a model's ``config.json`` that SGLang's ServerArgs would otherwise report first, in terms of the
    prefill backend deft chose for the user (``extend_backend``): it refuses dual-chunk attention unless the
    attention backend is dual_chunk_flash_attn, gpt-oss unless the decode backend is one of its own, NemotronH and
    Lfm2 on triton, and Exaone-4's sliding windows on torch_native. Read from the file (before
    ServerArgs exists) with ``--json-model-override-args`` over it, as SGLang reads it: a local model directory's,
    or a hub model's already in the Hugging Face cache (at ``--revision``). A model not downloaded yet is read again
    if SGLang's ServerArgs, which fetches it, refuses it (``server_setup.make_server_args``), and otherwise checked
    with the rest of the model."""
    if not model_path:
        return []
    try:
        config = json.loads(_config_file(model_path, revision).read_text())
        overrides = json.loads(override_args or "{}")
    except (OSError, ValueError):
        return []  # not a model here (or not readable yet): SGLang's loader and parser say what is wrong
    if not isinstance(config, dict) or not isinstance(overrides, dict):
        return []
    config.update(overrides)
    architectures = config.get("architectures")
    architectures = [str(a) for a in architectures] if isinstance(architectures, list) else []
    model = f"model {model_path} ({','.join(architectures or ['?'])})"
    problems = []
    if config.get("dual_chunk_attention_config") is not None:  # SGLang's own test
        problems.append(_dual_chunk_problem(model))
    if "GptOssForCausalLM" in architectures:
        problems.append(f"{model}: attention sinks (gpt-oss passes them to every attention call) are not "
                        "supported: deft's softmax has no sink term")
    if any(a in _NO_TRITON_HYBRIDS for a in architectures):
        problems.append(f"{model}: {HYBRID_LINEAR_ATTENTION}")
    for arch in architectures:
        backends = _WINDOW_ASSERTING.get(arch)
        # SGLang's test; the configuration classes' defaults are a pattern of 4 and a window of 4096
        if backends and extend_backend not in (None, *backends) and config.get("sliding_window_pattern", 4) is not None:
            problems.append(f"{model}: sliding windows ({config.get('sliding_window', 4096)}) with prefill on "
                            f"{extend_backend}: SGLang serves {arch}'s windows only on {', '.join(backends)}, and "
                            f"deft's prefill on this device is {extend_backend}")
    return problems


def _config_file(model_path: str, revision: str | None) -> Path:
    """``config.json`` of a local model directory, else of a hub model in the Hugging Face cache (no download:
    this runs before SGLang's own fetch, which may be offline or use ModelScope); FileNotFoundError otherwise."""
    local = Path(model_path)
    if local.is_dir():
        return local / "config.json"
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model_path, "config.json", revision=revision)
    except ValueError:  # not a repo id either (e.g. a path that does not exist)
        cached = None
    if not isinstance(cached, str):  # None (not cached) or the marker of a file the repo lacks
        raise FileNotFoundError(model_path)
    return Path(cached)


def _dual_chunk_problem(model: str) -> str:
    return (f"{model}: dual-chunk attention (a query per chunk position, with chunk-relative RoPE) is not supported; "
            "deft attends one query per head over the whole path")


def _triton_interprets() -> bool:
    """TRITON_INTERPRET as Triton reads it (1, true, on, yes, any case), in the processes SGLang spawns too."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def decode_impl() -> str:
    """``SGLANG_DEFT_DECODE_IMPL``: auto (the default), reference or triton (``tree_attention.use_triton_kernels``);
    ValueError for anything else."""
    impl = os.environ.get("SGLANG_DEFT_DECODE_IMPL", "auto")
    if impl not in ("auto", "reference", "triton"):
        raise ValueError(f"SGLANG_DEFT_DECODE_IMPL={impl!r}: expected auto, reference or triton")
    return impl


def decode_impl_problem(device: str, decode: bool) -> str | None:
    """``SGLANG_DEFT_DECODE_IMPL`` the scheduler could not use (it reads it when it makes the backend): an unknown
    value, or the Triton kernels on a CPU server without Triton's interpreter, which has no driver there."""
    if not decode:
        return None
    try:
        impl = decode_impl()
    except ValueError as e:
        return str(e)
    if impl == "triton" and device == "cpu" and not _triton_interprets():
        return ("SGLANG_DEFT_DECODE_IMPL=triton with --device cpu: the Triton kernels run on a CPU only in Triton's "
                "interpreter; set TRITON_INTERPRET=1 too (slow: for tests), or unset it for the PyTorch reference path")
    return None


def device_problem(device: str) -> str | None:
    return None if device in ("cuda", "cpu") else f"--device {device}: the deft backend supports cuda and cpu"


def server_args_problems(server_args) -> list[str]:
    """Problems of the flags alone (no model config needed); empty when deft is not selected."""
    decode, prefill = deft_roles(server_args)
    problems = []
    if prefill and not decode:
        decode_name = backend_names(server_args)[0]
        fix = (f"drop --prefill-attention-backend {BACKEND_NAME} and pass --decode-attention-backend {BACKEND_NAME}"
               if server_args.prefill_attention_backend == BACKEND_NAME else
               f"drop --decode-attention-backend {decode_name} (or make it {BACKEND_NAME})")
        problems.append(
            f"deft selected for prefill/extend only (by --attention-backend or --prefill-attention-backend, "
            f"with decode on {decode_name}): deft is a decode backend; {fix}"
        )
    elif prefill:
        # SGLang would run prefill on deft too, whose forward_extend cannot compute it (on CPU the
        # server died at its first request). The launcher and Engine(**kwargs) split
        # --attention-backend deft; --prefill-attention-backend deft, or a ServerArgs of the caller's
        # own, reach here unsplit.
        problems.append(
            f"deft selected for prefill/extend as well as decode (--prefill-attention-backend {BACKEND_NAME}, or "
            f"attention_backend='{BACKEND_NAME}' in a ServerArgs passed as Engine(server_args=...)): deft computes "
            f"decode attention only; leave prefill to an SGLang backend (--attention-backend triton on GPU, "
            f"torch_native on CPU, with --decode-attention-backend {BACKEND_NAME})"
        )
    if server_args.speculative_draft_attention_backend == BACKEND_NAME:
        problems.append(f"--speculative-draft-attention-backend {BACKEND_NAME}: speculative decoding is not supported")
    if not (decode or prefill):
        return problems
    a = server_args
    if a.speculative_algorithm is not None:
        # SGLang's ServerArgs has already rewritten NEXTN to EAGLE: name both, so a NEXTN user sees theirs.
        algorithm = ("EAGLE (or NEXTN, which SGLang runs as EAGLE)" if a.speculative_algorithm == "EAGLE"
                     else a.speculative_algorithm)
        problems.append(
            f"--speculative-algorithm {algorithm}: verify and draft steps attend several "
            "tokens per request with a tree mask; the deft path computes one query token per request"
        )
    if getattr(a, "dllm_algorithm", None) is not None:
        problems.append(
            f"--dllm-algorithm {a.dllm_algorithm}: diffusion LLM decoding attends a block of tokens per request; "
            "the deft path computes one query token per request"
        )
    if a.kv_cache_dtype not in _SERVED_KV_DTYPES:
        problems.append(
            f"--kv-cache-dtype {a.kv_cache_dtype}: deft reads KV caches in the model's dtype or in fp8 "
            "(fp8_e4m3, fp8_e5m2), not this format"
        )
    if decode and (problem := deterministic_inference_problem(a.enable_deterministic_inference,
                                                              a.rl_on_policy_target)):
        # SGLang checks only --attention-backend here (triton passes), not the decode backend.
        problems.append(problem)
    if decode and backend_names(a)[1] == "fa3" and a.kv_cache_dtype == "fp8_e5m2":
        # SGLang moves fa3 to triton under fp8_e5m2 only for --attention-backend fa3, which deft's split has made
        # triton: the fa3 prefill would run on an e5m2 cache it does not read
        problems.append("--prefill-attention-backend fa3 with --kv-cache-dtype fp8_e5m2: SGLang's fa3 reads fp8_e4m3 "
                        "caches only; prefill on triton, or use fp8_e4m3")
    if a.enable_double_sparsity:
        # SGLang then allocates a DoubleSparseTokenToKVPool, whose set_kv_buffer takes a label buffer and no
        # KV scales: the first decode step raised in the scheduler.
        problems.append(
            "--enable-double-sparsity: double-sparsity attention reads a per-token label cache and attends a "
            "selection of tokens; deft computes dense decode attention over an MHA KV pool"
        )
    if a.enable_two_batch_overlap:
        problems.append("--enable-two-batch-overlap: split micro-batches do not carry the requests the KV tree is built from")
    if a.enable_pdmux:
        problems.append("--enable-pdmux: not supported by the deft backend")
    if a.enable_dp_attention:
        problems.append("--enable-dp-attention: padded DP-attention batches are not supported by the deft backend")
    if getattr(a, "attn_cp_size", 1) > 1:
        problems.append(f"--attn-cp-size {a.attn_cp_size}: context-parallel attention is not supported by the deft backend")
    if a.pp_size > 1:
        problems.append(f"--pp-size {a.pp_size}: pipeline parallelism is not supported by the deft backend")
    if a.disaggregation_mode != "null":
        problems.append(f"--disaggregation-mode {a.disaggregation_mode}: not supported by the deft backend")
    if a.enable_torch_compile:
        problems.append(
            "--enable-torch-compile: untested with the deft decode path (torch.compile would trace deft's "
            "forward_decode, its Triton launches over a per-step plan, inside SGLang's captured graphs)"
        )
    if a.grpc_mode or a.use_ray or a.encoder_only:
        flag = "--grpc-mode" if a.grpc_mode else "--use-ray" if a.use_ray else "--encoder-only"
        problems.append(f"{flag}: the deft registration reaches only the HTTP server's and Engine's processes")
    if problem := device_problem(a.device):
        problems.append(problem)
    on_cpu = a.device == "cpu"
    cpu_prefill = backend_names(a)[1]
    flag = "--prefill-attention-backend" if a.prefill_attention_backend else "--attention-backend"
    # (asked only where a prefill backend other than torch_native is named: it imports SGLang's CPU probe)
    amx_problem = (_intel_amx_problem() if on_cpu and decode and cpu_prefill not in (None, BACKEND_NAME, "torch_native")
                   else None)
    if on_cpu and decode and cpu_prefill not in (None, BACKEND_NAME, *_CPU_PREFILL_BACKENDS):
        usable = [b for b in _CPU_PREFILL_BACKENDS if b != "intel_amx" or amx_problem is None]
        if not a.prefill_attention_backend:
            fix = f"--attention-backend {BACKEND_NAME}, which picks torch_native"
        elif a.attention_backend in (None, BACKEND_NAME, *_CPU_PREFILL_BACKENDS):
            fix = "drop --prefill-attention-backend"  # what is left prefills on CPU (deft picks torch_native)
        else:  # dropping it alone made the GPU-only --attention-backend the prefill backend: refused again
            fix = f"drop --prefill-attention-backend and pass --attention-backend {BACKEND_NAME}"
        problems.append(
            f"{flag} {cpu_prefill} with --device cpu: SGLang's {cpu_prefill} backend needs a GPU (the server "
            f"died at its first prefill); on CPU use {' or '.join(usable)} for prefill, or {fix}"
        )
    if cpu_prefill == "intel_amx" and amx_problem is not None:
        # SGLang falls back to torch_native without AMX only for --attention-backend intel_amx, which deft's split
        # has made torch_native: a prefill override of intel_amx reached its backend and killed the scheduler.
        problems.append(f"{flag} intel_amx with --device cpu: {amx_problem}; use torch_native for prefill")
    if on_cpu and a.dp_size > 1:
        problems.append(
            f"--dp-size {a.dp_size} with --device cpu: the CPU compatibility layer does not reach "
            "SGLang's data-parallel controller process"
        )
    if on_cpu and a.tokenizer_worker_num > 1 and cpu_compat.is_installed():
        # uvicorn spawns its workers, which import SGLang's HTTP server without the layer (installed by
        # server_setup.prepare_process where torch has no CUDA): no torchvision there.
        problems.append(
            f"--tokenizer-worker-num {a.tokenizer_worker_num} with --device cpu: the CPU compatibility layer does "
            "not reach the tokenizer worker processes"
        )
    if on_cpu and (a.page_size or 1) > 1 and not _triton_interprets():
        # SGLang's own limitation (its torch_native decode hits it too), named here instead of at the first prefill.
        problems.append(
            f"--page-size {a.page_size} with --device cpu: SGLang's paged KV allocator (alloc_extend, alloc_decode) "
            "runs Triton kernels, which on a CPU run only under TRITON_INTERPRET=1; set it, or use --page-size 1"
        )
    if on_cpu and a.enable_hierarchical_cache:
        problems.append(
            "--enable-hierarchical-cache with --device cpu: SGLang's host KV pool is pinned memory filled by CUDA "
            "copy streams; the hierarchical cache needs a GPU"
        )
    # (With --disable-radix-cache SGLang's scheduler builds a ChunkCache instead, whatever the variable says: only a
    # multimodal model under --model-impl transformers would still get the C++ tree, and multimodal is refused.)
    if decode and _cpp_radix_tree() and not a.disable_radix_cache:
        problems.append(
            "SGLANG_EXPERIMENTAL_CPP_RADIX_TREE: the C++ radix tree's nodes are opaque to Python, and the deft "
            "path reads each request's shared prefix from its radix nodes"
        )
    if problem := decode_impl_problem(a.device, decode):
        problems.append(problem)
    if decode:  # read by the scheduler when it makes the backend, after the model loaded
        from .kernel_check import verify_every
        from .sharing_metrics import sharing_idle_s
        from .step_planner import steady_steps

        for read in (verify_every, sharing_idle_s, steady_steps):
            try:
                read()
            except ValueError as e:
                problems.append(str(e))
        if (trace := os.environ.get("SGLANG_DEFT_TRACE_PLANS", "0")) not in ("0", "1"):  # else silently no trace
            problems.append(f"SGLANG_DEFT_TRACE_PLANS={trace!r}: expected 1 (log a fingerprint of every decode step's "
                            "plans) or 0")
    cuda_graphs = not on_cpu and not a.disable_cuda_graph
    if decode and cuda_graphs and os.environ.get("SGLANG_DEFT_DECODE_IMPL") == "reference":
        problems.append(
            "SGLANG_DEFT_DECODE_IMPL=reference with CUDA graphs: the PyTorch reference path sizes its "
            "launches from each step's tree on the host, which a captured graph cannot replay; pass "
            "--disable-cuda-graph or use the Triton kernels (the default on CUDA)"
        )
    return problems


def _intel_amx_problem() -> str | None:
    """Why SGLang's intel_amx backend cannot run here (None if it can): it calls sgl_kernel's native CPU ops."""
    if cpu_compat.is_installed():
        return ("SGLang's intel_amx backend calls sgl_kernel's native CPU ops, which this install lacks (deft's CPU "
                "compatibility layer stands in for sgl_kernel)")
    from sglang.srt.utils.common import cpu_has_amx_support

    return None if cpu_has_amx_support() else "SGLang's intel_amx backend needs a CPU with Intel AMX, which this lacks"


def _cpp_radix_tree() -> bool:
    from sglang.srt.environ import envs  # SGLang's own parsing of the variable

    return bool(envs.SGLANG_EXPERIMENTAL_CPP_RADIX_TREE.get())


# SGLang's built-in grammar backends and the package each imports when the scheduler starts.
_GRAMMAR_PACKAGES = {"xgrammar": "xgrammar", "outlines": "outlines", "llguidance": "llguidance"}


def user_flag_problems(server_args) -> list[str]:
    """Problems of flags as the user gave them, which SGLang may rewrite before the model runner starts (so
    ``model_runner_problems`` does not read them again: it checks what they would have caused instead)."""
    if not deft_roles(server_args)[0]:
        return []
    problems = []
    if server_args.quantization_param_path is not None and server_args.kv_cache_dtype == "fp8_e4m3":
        # ModelRunner hands the file to the model's load_kv_cache_scales, which sets each layer's k_scale and
        # v_scale but not the k_scale_float / v_scale_float that SGLang's triton prefill (the one deft runs
        # beside on a GPU) and deft's decode read: the prefill fails on its first request (None * float).
        # SGLang reads the file only for a flag of fp8_e4m3: under "auto", which it rewrites to fp8_e4m3 for an
        # FP8 checkpoint after loading, the checkpoint's own scales stand.
        problems.append(
            "--quantization-param-path with --kv-cache-dtype fp8_e4m3: SGLang sets the layers' KV scales from "
            "it without the float copies its triton prefill and deft's decode read; serve a checkpoint whose "
            "quantization config carries the KV scales, or leave the flag out (scales 1.0)"
        )
    grammar = server_args.grammar_backend
    # (--skip-tokenizer-init: the scheduler makes no grammar backend, so it imports no package for one)
    if (grammar in _GRAMMAR_PACKAGES and not server_args.skip_tokenizer_init
            and importlib.util.find_spec(_GRAMMAR_PACKAGES[grammar]) is None):
        from sglang.srt.constrained.base_grammar_backend import GRAMMAR_BACKEND_REGISTRY

        if grammar not in GRAMMAR_BACKEND_REGISTRY:  # a registered backend of that name brings its own
            # The scheduler imports it as it starts and dies with a bare ModuleNotFoundError.
            default = " (SGLang's default)" if grammar == "xgrammar" else ""
            problems.append(
                f"--grammar-backend {grammar}{default} needs the {_GRAMMAR_PACKAGES[grammar]} package, which is not "
                "installed (the CPU package set leaves it out): pass --grammar-backend none (no constrained "
                "decoding) or install it"
            )
    return problems


def check_server_args(server_args) -> None:
    _raise_if(server_args_problems(server_args) + user_flag_problems(server_args))
    decode, _ = deft_roles(server_args)
    if decode and server_args.disable_radix_cache:
        logger.warning(
            "deft with --disable-radix-cache: requests share no KV prefix, so every KV tree is one "
            "private node per request (correct, but nothing is read once for several requests)"
        )
    if decode and server_args.enable_mixed_chunk:
        # HybridAttnBackend sends every forward mode but DECODE/IDLE to the prefill backend.
        logger.warning(
            "deft with --enable-mixed-chunk: a step that mixes running decodes into a prefill chunk runs all its "
            "attention, the decodes' too, on the prefill backend (%s), which reads shared prefixes once per "
            "request; steps of decodes alone run on deft",
            backend_names(server_args)[1],
        )


def model_config_problems(model_config, server_args) -> list[str]:
    """Problems of the model (SGLang's ``ModelConfig``); empty when deft is not selected."""
    if not any(deft_roles(server_args)):
        return []
    import torch
    from sglang.srt.configs.model_config import AttentionArch

    arch = ",".join(model_config.hf_config.architectures or ["?"])
    model = f"model {server_args.model_path} ({arch})"
    problems = []
    if model_config.attention_arch == AttentionArch.MLA:
        problems.append(f"{model}: MLA attention (compressed latent KV) is not supported; deft needs per-head K/V")
    if model_config.is_encoder_decoder:
        problems.append(f"{model}: encoder-decoder models (cross-attention) are not supported")
    if model_config.is_multimodal:
        problems.append(f"{model}: multimodal models are not supported (untested with the deft path)")
    # Sliding windows are served (the backend plans their layers' trees cut to each query's window), as
    # SGLang's layers apply them: whether a config's ``sliding_window`` is applied depends on the model
    # class (Gemma-2's does; Llama's, which serves Mistral and Phi-3, ignores it), so the loaded layers
    # decide (``model_runner_problems``). Not SGLang's hybrid SWA memory, where those layers' KV is elsewhere.
    if getattr(model_config, "is_hybrid_swa", False):
        problems.append(f"{model}: hybrid sliding-window memory (SGLang keeps the sliding-window layers' KV in a pool "
                        "of their own, with slot ids of their own) is not supported; deft reads one KV pool")
    if model_config.attention_chunk_size is not None:
        problems.append(f"{model}: chunked local attention is not supported; deft attends every token of the path")
    if getattr(model_config, "use_alibi", False):  # Baichuan-13B's: no RoPE, and the slopes reach no CUDA backend
        problems.append(f"{model}: ALiBi position biases are not supported; deft's attention adds no bias to a score")
    if getattr(model_config.hf_config, "dual_chunk_attention_config", None):
        problems.append(_dual_chunk_problem(model))
    if _linear_attention_config(model_config) is not None:
        problems.append(f"{model}: {HYBRID_LINEAR_ATTENTION}")
    if problem := _interpreter_dtype_problem(model_config.dtype, server_args.device, deft_roles(server_args)[0]):
        problems.append(problem)
    # Known here, before the weights load (model_runner_problems says it again in the scheduler): the flag's one
    # dtype that is neither fp8 nor necessarily the model's.
    if deft_roles(server_args)[0] and server_args.kv_cache_dtype in ("bf16", "bfloat16") and (
            problem := _kv_dtype_problem(f"--kv-cache-dtype {server_args.kv_cache_dtype}", torch.bfloat16,
                                         model_config.dtype)):
        problems.append(problem)
    return problems


def _kv_dtype_problem(source: str, kv_dtype, model_dtype) -> str | None:
    """A KV cache in ``kv_dtype`` (from ``source``: a flag or the checkpoint) that deft cannot read under a model in
    ``model_dtype``; None when it can."""
    from .kernels.tree_decode import reads_kv_dtype

    if reads_kv_dtype(kv_dtype, model_dtype):
        return None
    return (f"{source}: a {kv_dtype} KV cache under a {model_dtype} model; deft reads a KV cache in the model's dtype "
            "or in fp8")


def _interpreter_dtype_problem(dtype, device: str, decode: bool) -> str | None:
    """The Triton kernels in Triton's interpreter (on a CPU with SGLANG_DEFT_DECODE_IMPL=triton; on a GPU under
    TRITON_INTERPRET=1, which runs them on host copies) in a dtype the interpreter computes wrongly: the first decode
    step or CUDA-graph capture would fail in the scheduler (``tree_decode`` refuses it)."""
    import torch

    try:
        impl = decode_impl()
    except ValueError:
        return None  # server_args_problems reports the value
    if not decode or dtype != torch.bfloat16:
        return None
    from .kernels.tree_decode import INTERPRETER_BF16

    if device == "cpu":
        if impl == "triton":
            return (f"SGLANG_DEFT_DECODE_IMPL=triton with --device cpu and a bfloat16 model: {INTERPRETER_BF16} "
                    "(--dtype)")
    elif impl != "reference" and _triton_interprets():
        return (f"TRITON_INTERPRET=1 with --device {device} and a bfloat16 model: Triton's interpreter runs deft's "
                "kernels (on host copies) and computes a bf16 tl.dot wrongly; unset TRITON_INTERPRET, or --dtype "
                "float16")
    return None


# SGLang's ModelRunner decides which models run linear-attention or Mamba layers by these properties, which read
# only the model config: asked here, such a model is refused before its weights load, not by the scheduler.
_LINEAR_ATTENTION_PROPERTIES = ("mamba2_config", "hybrid_gdn_config", "kimi_linear_config", "hybrid_lightning_config")


def _linear_attention_config(model_config):
    from types import SimpleNamespace

    from sglang.srt.model_executor.model_runner import ModelRunner

    runner = SimpleNamespace(model_config=model_config, is_draft_worker=False)
    return next((c for name in _LINEAR_ATTENTION_PROPERTIES
                 if (c := getattr(ModelRunner, name).fget(runner)) is not None), None)


def check_model_config(model_config, server_args) -> None:
    _raise_if(model_config_problems(model_config, server_args))


def model_runner_problems(model_runner) -> list[str]:
    """Problems of the loaded model's attention layers and runner state."""
    import torch

    from .kernels.tree_decode import FP8_KV_DTYPES, kv_dtype_unsupported_on

    problems = server_args_problems(model_runner.server_args)
    problems += model_config_problems(model_runner.model_config, model_runner.server_args)
    if model_runner.use_mla_backend:
        problems.append("the model runner uses an MLA backend; deft needs per-head K/V")
    # model_config_problems above asks SGLang's rules of a main worker; this catches only what they did not.
    if model_runner.mambaish_config is not None and _linear_attention_config(model_runner.model_config) is None:
        problems.append(HYBRID_LINEAR_ATTENTION)
    kv_dtype, model_dtype = model_runner.kv_cache_dtype, model_runner.model_config.dtype
    kv_flag = _kv_cache_dtype_source(model_runner)
    if kv_dtype is not None and (problem := _kv_dtype_problem(kv_flag, kv_dtype, model_dtype)):
        problems.append(problem)
    elif kv_dtype is not None and (reason := kv_dtype_unsupported_on(kv_dtype, torch.device(model_runner.device))):
        problems.append(f"{kv_flag}: deft cannot read {reason}")
    a = model_runner.server_args
    fp8_prefill = backend_names(a)[1] if kv_dtype in FP8_KV_DTYPES else None
    layers = attention_layers(model_runner.model)
    if not layers:  # its layers' windows, caps and heads would go unchecked, and no window plan be made
        problems.append(f"{type(model_runner.model).__name__} holds no SGLang attention layer (RadixAttention) that "
                        "deft can find: its per-layer settings cannot be checked")
    layers_with: dict[str, list[int]] = {}  # problem -> layer ids, so 32 identical layers make one line
    for layer in layers:
        for p in _layer_problems(layer) + (_fp8_scale_problems(layer, fp8_prefill) if fp8_prefill else []):
            layers_with.setdefault(p, []).append(layer.layer_id)
    problems += [f"attention layers {ids}: {p}" for p, ids in layers_with.items()]
    if not layers_with:  # (a layer refused for its own heads already says what differs)
        problems += _head_shape_problems(layers)
    # (gpt-oss names them sinks, MiMo-V2 attention_sink_bias)
    sinks = [f"{name}.{attr}" for name, module in model_runner.model.named_modules()
             for attr in ("sinks", "attention_sink_bias") if isinstance(getattr(module, attr, None), torch.Tensor)]
    if sinks:
        # gpt-oss and MiMo-V2-Flash pass them to every attention call (with --disable-hybrid-swa-memory nothing
        # else refuses them); forward_decode would raise at the first decode or graph capture
        problems.append(f"attention sinks ({sinks[0]}{f' and {len(sinks) - 1} more' if len(sinks) > 1 else ''}) "
                        "are not supported: deft's softmax has no sink term")
    problems += _sliding_window_problems(windows_of(layers), backend_names(a)[1], model_runner.sliding_window_size,
                                         on_cpu=a.device == "cpu")
    return list(dict.fromkeys(problems))  # a problem found twice is reported once


def _kv_cache_dtype_source(model_runner) -> str:
    """Where the KV cache's dtype came from, for a refusal to name: the flag, or, under ``auto``, which SGLang's
    ``configure_kv_cache_dtype`` rewrites to fp8_e4m3 for a checkpoint that quantizes its KV cache, the checkpoint."""
    flag = model_runner.server_args.kv_cache_dtype
    algo = getattr(getattr(model_runner.model, "quant_config", None), "kv_cache_quant_algo", None)
    if flag == "fp8_e4m3" and isinstance(algo, str) and algo.upper() == "FP8":
        return ("the checkpoint's FP8 KV cache (its quantization config's kv_cache_quant_algo, which SGLang "
                "applies under --kv-cache-dtype auto or fp8_e4m3)")
    return f"--kv-cache-dtype {flag}"


def _layer_problems(layer) -> list[str]:
    from sglang.srt.layers.radix_attention import AttentionType

    from .kernels.plan import LARGE_ROWS, MAX_HEAD_DIM

    problems = []
    # DECODER_BIDIRECTIONAL (every Gemma-3 layer) changes extend only: SGLang's triton prefill drops the causal
    # mask under --disable-cuda-graph and --chunked-prefill-size -1 (_warn_of_bidirectional_prefill). A decode
    # token attends every earlier token of its request in either type, as SGLang's own decode backends read it,
    # so deft serves both.
    if layer.is_cross_attention or layer.attn_type not in (AttentionType.DECODER, AttentionType.DECODER_BIDIRECTIONAL):
        kind = "cross-attention" if layer.is_cross_attention else f"{layer.attn_type.value} attention"
        problems.append(f"{kind} is not supported (causal decoder self-attention only)")
    if layer.qk_head_dim != layer.v_head_dim:
        problems.append(f"Q/K head dim {layer.qk_head_dim} != V head dim {layer.v_head_dim} is not supported")
    elif layer.qk_head_dim > MAX_HEAD_DIM:
        problems.append(f"head dim {layer.qk_head_dim} is not supported (deft's kernels serve up to {MAX_HEAD_DIM})")
    group = layer.tp_q_head_num // max(layer.tp_k_head_num, 1)
    if group > LARGE_ROWS:  # the planner refused it when the backend was made, naming neither model nor flag
        problems.append(f"{group} query heads per KV head on each rank ({layer.tp_q_head_num} / "
                        f"{layer.tp_k_head_num}): deft computes a KV head's query heads as rows of one {LARGE_ROWS}-row "
                        "tile (with one KV head replicated on every rank, a larger --tp-size gives each rank fewer)")
    if layer.logit_cap > 0 and layer.logit_capping_method != "tanh":
        problems.append(f"logit capping method {layer.logit_capping_method!r} is not supported (tanh only)")
    if layer.use_irope:
        problems.append("iRoPE chunked attention is not supported")
    if getattr(layer, "xai_temperature_len", -1) > 0:
        problems.append("xai temperature scaling is not supported")
    return problems


def attention_layers(model) -> list:
    """The model's attention layers (SGLang's ``RadixAttention`` modules), by layer id. Also those a module holds
    in a plain dict or list: SGLang's Transformers backend (``--model-impl transformers``, and its fallback for an
    architecture SGLang has no class for) keeps them in ``attention_instances``, a dict that ``modules()`` does not
    walk; without them every per-layer check passed unseen and a windowed model got no window plan."""
    from sglang.srt.layers.radix_attention import RadixAttention

    found: dict[int, RadixAttention] = {}
    for module in model.modules():
        for value in (module, *vars(module).values()):
            held = (value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple))
                    else (value,))
            for item in held:
                if isinstance(item, RadixAttention):
                    found.setdefault(id(item), item)
    return sorted(found.values(), key=lambda layer: layer.layer_id)


def windows_of(layers) -> dict[int, list[int]]:
    """The sliding windows of these attention layers, as SGLang's layers set them (``sliding_window_size``: a query
    attends its last ``sliding_window_size + 1`` tokens, FlashInfer's ``window_left``), each with its layer ids;
    empty when every layer attends the whole sequence (-1, or None)."""
    windows: dict[int, list[int]] = {}
    for layer in layers:
        if (window := layer_window(layer)) is not None:
            windows.setdefault(window, []).append(layer.layer_id)
    return windows


def layer_window(layer) -> int | None:
    """The layer's ``sliding_window_size`` (SGLang: -1 or None for none)."""
    window = layer.sliding_window_size
    return window if window is not None and window > -1 else None


def _head_shape_problems(layers) -> list[str]:
    """deft plans a step once for every layer: they must share their heads (some models' sliding-window layers
    have others, e.g. Step-3.5's, served by SGLang with --disable-hybrid-swa-memory)."""
    shapes: dict[tuple[int, int, int], list[int]] = {}
    for layer in layers:
        shape = (layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim)
        shapes.setdefault(shape, []).append(layer.layer_id)
    if len(shapes) < 2:
        return []
    kinds = "; ".join(f"{q} q / {kv} kv heads of {d} in layers {ids}" for (q, kv, d), ids in shapes.items())
    return [f"attention layers of {len(shapes)} head shapes ({kinds}): deft plans each decode step once for "
            "layers of one shape"]


def _sliding_window_problems(windows: dict[int, list[int]], prefill_backend: str | None,
                             runner_window: int | None, on_cpu: bool = False) -> list[str]:
    """``runner_window``: the model runner's ``sliding_window_size``, which SGLang's triton prefill cuts each windowed
    layer's KV by (its layers' own window only masks). ``on_cpu``: a --device cpu server, where neither prefill that
    applies windows runs."""
    if not windows:
        return []
    problems = []
    if len(windows) > 1:
        sizes = ", ".join(f"{w} in layers {ids}" for w, ids in sorted(windows.items()))
        problems.append(f"sliding windows of {len(windows)} sizes ({sizes}): deft plans one window per decode step")
    elif runner_window is not None and runner_window != next(iter(windows)):
        # Gemma-3n's class gives sliding_window - 1, its layers sliding_window: which one the model means, deft
        # (following the layers) and SGLang's triton prefill (cutting by the runner's) would disagree by a token
        problems.append(f"sliding windows: the model's layers set {next(iter(windows))} and its class "
                        f"{runner_window} (get_attention_sliding_window_size); deft reads the layers' window, SGLang's "
                        "triton prefill cuts by the class's, and the two would attend different tokens")
    elif prefill_backend == "triton" and runner_window is None:
        # Set from the model class's get_attention_sliding_window_size (Gemma's); Cohere2's, ExaoneMoE's and
        # --model-impl transformers' windowed layers have none, and the triton prefill then reads window KV
        # indices it never built (None) at the first prompt
        problems.append(f"sliding windows ({next(iter(windows))}) with prefill on triton, which takes the window from "
                        "the model class's get_attention_sliding_window_size, which this one has not: SGLang's triton "
                        "prefill would fail at the first prompt; prefill on fa3 (--prefill-attention-backend fa3), "
                        "which reads each layer's window")
    if prefill_backend not in _WINDOW_PREFILL_BACKENDS:
        problems.append(f"sliding windows ({', '.join(map(str, sorted(windows)))}) with prefill on {prefill_backend}: "
                        f"SGLang's {prefill_backend} backend does not apply them (it attends every prompt token), so "
                        "prompts longer than the window would be prefilled wrong; "
                        + (f"the prefills that apply them ({', '.join(_WINDOW_PREFILL_BACKENDS)}) need a GPU, so "
                           "this model is not served on the CPU" if on_cpu else
                           f"prefill on {' or '.join(_WINDOW_PREFILL_BACKENDS)}"))
    return problems


def _fp8_scale_problems(layer, prefill_backend: str) -> list[str]:
    """An fp8 pool's per-layer K/V scales, which deft applies as SGLang's triton backend does: divided out as
    a token is stored, multiplied back as it is read."""
    if layer.k_scale is None:
        return []  # uncalibrated: values cast as they are, read as they are
    if layer.k_scale_float is None or layer.v_scale_float is None:
        # --quantization-param-path sets k_scale / v_scale without these (under a flag of fp8_e4m3, which
        # check_server_args refuses; this is the same hazard reached another way)
        return ["KV scales without their float copies (k_scale_float), which SGLang's triton prefill and deft's "
                "decode read (e.g. set from --quantization-param-path)"]
    if (layer.k_scale_float, layer.v_scale_float) != (1.0, 1.0) and prefill_backend in _CPU_PREFILL_BACKENDS:
        return [f"calibrated fp8 KV scales (K {layer.k_scale_float:g}, V {layer.v_scale_float:g}) with prefill on "
                f"{prefill_backend}: SGLang's {prefill_backend} backend stores and reads the cache without the scales, "
                f"deft's decode divides them out and multiplies them back (as SGLang's triton backend), so every "
                f"prompt token would be read scaled; prefill on triton (GPU), or an fp8 cache without scales"]
    return []


# Set by sglang_deft.Engine for the processes SGLang spawns: a scheduler writes its refusal there as JSON. SGLang's
# scheduler only logs an exception and signals its parent, which then knows that a child died, not why.
REFUSAL_FILE_ENV = "SGLANG_DEFT_REFUSAL_FILE"


def check_model_runner(model_runner) -> None:
    try:
        _raise_if(model_runner_problems(model_runner))
    except UnsupportedConfiguration as e:
        if path := os.environ.get(REFUSAL_FILE_ENV):
            # Through a file of this process's and a rename: every TP rank writes it, and the Engine must never read
            # one half-written. (The refusal is logged and raised either way.)
            tmp = Path(f"{path}.{os.getpid()}")
            try:
                tmp.write_text(json.dumps(e.problems))
                tmp.replace(path)
            except OSError:  # (the refusal is raised below all the same)
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
        raise
    _warn_of_bidirectional_prefill(model_runner)
    _warn_of_uncapped_prefill(model_runner)


# SGLang 0.5.10's prefill backends that apply a layer's tanh logit soft cap (Gemma-2's 50, Grok's 30). Not
# torch_native (no cap at all), nor flashinfer: it passes the cap to its wrappers' deprecated forward() only, while
# FlashInfer picks the capped kernel at plan(), which SGLang calls without it (sgl-project/sglang#33915).
_CAPPED_PREFILL_BACKENDS = ("triton", "fa3")


def _warn_of_uncapped_prefill(model_runner) -> None:
    """deft's decode applies each layer's logit soft cap, as the model defines it and as SGLang's triton decode
    does. A prefill backend that does not (above) computes the prompt without it, and the KV it writes follows
    from that; deft decodes over that KV, as SGLang's own decode would. The user is told, since SGLang's own
    decode on that backend would leave the cap out too, so outputs differ from that server's."""
    args = model_runner.server_args
    prefill = backend_names(args)[1]
    if prefill in _CAPPED_PREFILL_BACKENDS or model_runner.tp_rank != 0:
        return
    caps = sorted({layer.logit_cap for layer in attention_layers(model_runner.model) if layer.logit_cap > 0})
    if caps:
        logger.warning(
            "deft: the model's attention layers cap their scores (tanh soft cap %s), which SGLang's %s prefill "
            "does not apply (for flashinfer: sgl-project/sglang#33915), so prompts are prefilled without it; deft's "
            "decode applies it, as the model and SGLang's triton decode do. Prefill on %s for the model's own "
            "attention", ", ".join(f"{c:g}" for c in caps), prefill, " or ".join(_CAPPED_PREFILL_BACKENDS))


def _warn_of_bidirectional_prefill(model_runner) -> None:
    """SGLang 0.5.10's triton prefill runs layers of the DECODER_BIDIRECTIONAL type (every Gemma-3 layer) without a
    causal mask under --disable-cuda-graph --chunked-prefill-size -1, for image tokens (Gemma-3's multimodal model
    then passes a mask of its own) and, with no mask, for text too: every prompt token attends the whole prompt.
    deft's decode reads the KV that prefill wrote, as SGLang's own decode does, so the output is SGLang's; the
    user is told, as it is not what a causal language model computes."""
    from sglang.srt.layers.radix_attention import AttentionType

    args = model_runner.server_args
    if not (backend_names(args)[1] == "triton" and args.disable_cuda_graph and args.chunked_prefill_size == -1
            and model_runner.tp_rank == 0):
        return
    layers = [layer.layer_id for layer in attention_layers(model_runner.model)
              if layer.attn_type == AttentionType.DECODER_BIDIRECTIONAL]
    if layers:
        logger.warning(
            "deft: attention layers %s are of SGLang's decoder_bidirectional type (Gemma-3's), which SGLang's triton "
            "prefill runs without a causal mask under --disable-cuda-graph --chunked-prefill-size -1: a text "
            "prompt's tokens then attend the whole prompt, later tokens too. deft decodes over the KV that prefill "
            "wrote, as SGLang's own decode would; leave --chunked-prefill-size at its default for causal prefill",
            layers)
