"""What the launcher and ``sglang_deft.Engine`` do before SGLang starts: device, backends, checks.

Order matters: :func:`prepare_process` runs before the first ``sglang.srt`` import (SGLang reads
``SGLANG_USE_CPU_ENGINE`` into module-level constants, and the CPU compatibility layer must be in
place before ``sglang.srt.utils.common`` loads); the rest works on parsed arguments.
"""
from __future__ import annotations

import logging
import os
from typing import MutableMapping

import torch

from sglang_deft import cpu_compat
from sglang_deft.config_checks import (BACKEND_NAME, UnsupportedConfiguration, deterministic_inference_problem,
                                       device_problem, model_file_problems)
from sglang_deft.patches.sglang_version import require_supported_sglang

logger = logging.getLogger(__name__)

# SGLang's backends that run prefill/extend when deft runs decode.
EXTEND_BACKEND = {"cuda": "triton", "cpu": "torch_native"}


def default_device() -> str:
    """The device without ``--device``: CUDA when there is one and ``SGLANG_USE_CPU_ENGINE=1`` (SGLang's switch
    to its CPU engine) is not already set, else CPU."""
    cpu_engine_asked = os.environ.get("SGLANG_USE_CPU_ENGINE") == "1"  # as SGLang's is_cpu() reads it
    # In this order: asked for the CPU, CUDA is not looked at, so prepare_process can still hide it
    return "cuda" if not cpu_engine_asked and torch.cuda.is_available() else "cpu"


def prepare_process(device: str | None) -> str:
    """Set up this process (and the processes it spawns) for ``device`` (None: :func:`default_device`);
    returns the device. On the CPU, SGLang runs its CPU engine and imports through ``sglang_deft.cpu_compat``,
    with the GPUs hidden from this process and those it spawns. ValueError where it cannot; the environment is then
    as it was.
    """
    # Before anything imports SGLang's modules by their 0.5.10.post1 names (the CPU layer among them): another
    # release fails here, by name, not on a moved module.
    require_supported_sglang("sglang_deft (its launcher, Engine, CPU layer and patches)")
    asked = "--device cpu" if device == "cpu" else "SGLANG_USE_CPU_ENGINE=1"  # what a CPU refusal names
    if device is None and os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        asked = "no --device and no CUDA device"  # (only a default to the CPU reaches the log line below)
    device = device or default_device()
    engine_before = os.environ.get("SGLANG_USE_CPU_ENGINE")
    # SGLang's CPU engine on a host with a GPU picks CUDA kernels all the same: its layers choose their code at
    # import by is_cuda() (torch.cuda.is_available()), whatever SGLANG_USE_CPU_ENGINE says, and e.g. RMSNorm's
    # CUDA kernel then gets CPU tensors. So the CPU hides the GPUs (inherited by the scheduler) before CUDA is
    # first looked at; a process that already uses CUDA cannot unsee it (refused below).
    visible_before = os.environ.get("CUDA_VISIBLE_DEVICES")
    hiding = device == "cpu" and visible_before != ""
    if hiding:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    has_cuda = torch.cuda.is_available()
    if device == "cpu" and has_cuda:
        if hiding:  # as it was: the caller's later processes (its own, not SGLang's) keep their GPUs
            restore_env("CUDA_VISIBLE_DEVICES", visible_before)
        raise ValueError(
            f"{asked} in a process that has already initialised CUDA: SGLang would run its CUDA kernels on CPU "
            "tensors (it picks them wherever torch sees a GPU). Start it in a fresh process, before anything uses "
            "CUDA, or with CUDA_VISIBLE_DEVICES= set")
    if hiding:
        logger.info("%s: CUDA_VISIBLE_DEVICES= set, so that SGLang's CPU engine and the processes it starts see no GPU",
                    asked)
    if device == "cuda" and not has_cuda:
        raise ValueError("--device cuda: torch finds no CUDA device here (torch.cuda.is_available() is False); "
                         "leave --device out for SGLang's CPU engine")
    if device == "cuda" and os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
        raise ValueError("--device cuda with SGLANG_USE_CPU_ENGINE=1 set: SGLang reads that variable when it loads "
                         "and would pick its CPU kernels; unset it for the GPU")
    if device == "cpu":
        os.environ["SGLANG_USE_CPU_ENGINE"] = "1"  # inherited by the spawned scheduler
        # Only for the CPU: for another device without CUDA (xpu, npu) the stand-in for sgl_kernel's native library
        # would hide a missing one (cpu_compat.install says why).
        try:
            cpu_compat.install()
        except RuntimeError as e:  # (the launcher reports ValueErrors in one line)
            restore_env("CUDA_VISIBLE_DEVICES", visible_before)
            restore_env("SGLANG_USE_CPU_ENGINE", engine_before)
            raise ValueError(f"{asked}: {e}") from e
    return device


def restore_env(name: str, value: str | None) -> None:
    """``name`` back to ``value``, as ``os.environ.get`` read it before (None: unset)."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def make_server_args(make, args: dict, device: str):
    """``make()`` (a ServerArgs built from ``args``, split by ``split_deft_backend``), with SGLang's own refusal of a
    model deft cannot serve either told in deft's terms: for a hub model not in the cache yet, ServerArgs fetches its
    config.json and refuses it first, naming the prefill backend deft chose (NemotronH "does not support triton"),
    a flag the user never gave. The config is cached by then: ``model_file_problems`` reads it."""
    try:
        return make()
    except (AssertionError, ValueError):
        if args.get("decode_attention_backend") == BACKEND_NAME and device in EXTEND_BACKEND and (
                problems := model_file_problems(args.get("model_path"), args.get("json_model_override_args"),
                                                args.get("revision"), EXTEND_BACKEND[device])):
            raise UnsupportedConfiguration(problems) from None
        raise


def split_deft_backend(args: MutableMapping, device: str) -> None:
    """Give deft decode SGLang's triton (GPU) or torch_native (CPU) backend for prefill/extend.

    deft computes decode attention only. ``--attention-backend deft`` therefore becomes
    ``--attention-backend triton|torch_native --decode-attention-backend deft``, so SGLang's
    HybridAttnBackend sends prefill/extend there, and SGLang code that keys on ``attention_backend``
    (e.g. whether its Triton helper kernels may run) sees a backend it knows. With
    ``--decode-attention-backend deft`` and no ``--attention-backend``, the same backend is chosen
    instead of SGLang's hardware default (fa3 on Hopper, which the devkit's GPU host lacks).
    ``args`` holds ServerArgs field names (an argparse namespace's ``vars()`` or Engine kwargs).
    """
    attention, decode = args.get("attention_backend"), args.get("decode_attention_backend")
    if device not in EXTEND_BACKEND:
        # Refused by name here: left unsplit, --attention-backend deft would be blamed first for running prefill
        # on deft, a flag the user never gave.
        if BACKEND_NAME in (attention, decode):
            raise UnsupportedConfiguration([device_problem(device)])
        return
    if attention == BACKEND_NAME and decode in (None, BACKEND_NAME):
        args["decode_attention_backend"] = BACKEND_NAME
    elif not (attention is None and decode == BACKEND_NAME):
        return  # deft is not the decode backend (or only prefills: the config checks refuse that)
    # Refused here, before ServerArgs: its own checks of deterministic inference, dual-chunk attention and
    # gpt-oss's backends would blame the extend backend chosen below (torch_native on CPU), which the user never
    # named, or send them to a backend deft then refuses.
    problems = model_file_problems(args.get("model_path"), args.get("json_model_override_args"),
                                   args.get("revision"), EXTEND_BACKEND[device])
    if problem := deterministic_inference_problem(args.get("enable_deterministic_inference"),
                                                  args.get("rl_on_policy_target")):
        problems.append(problem)
    if problems:
        raise UnsupportedConfiguration(problems)
    args["attention_backend"] = EXTEND_BACKEND[device]
    prefill = args.get("prefill_attention_backend")
    if prefill is None:
        logger.warning(
            "deft runs decode attention; prefill/extend runs on SGLang's %s backend "
            "(--attention-backend %s --decode-attention-backend %s)",
            EXTEND_BACKEND[device], EXTEND_BACKEND[device], BACKEND_NAME,
        )
    elif prefill != BACKEND_NAME:  # deft for prefill too: the config checks refuse it
        logger.warning(
            "deft runs decode attention; prefill/extend runs on SGLang's %s backend (--prefill-attention-backend "
            "%s; --attention-backend %s for SGLang's code that reads it)", prefill, prefill, EXTEND_BACKEND[device],
        )


def check_startup(server_args) -> None:
    """Refuse unsupported configurations (flags and model) before any subprocess starts."""
    from sglang_deft.config_checks import check_model_config, check_server_args, deft_roles

    check_server_args(server_args)
    if any(deft_roles(server_args)):
        check_model_config(server_args.get_model_config(), server_args)
