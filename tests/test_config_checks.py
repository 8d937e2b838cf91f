"""Startup refusals: each unsupported configuration is refused with its flag (or model) and reason."""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.utils import common as sglang_common

from sglang_deft.config_checks import (
    UnsupportedConfiguration,
    check_model_config,
    check_server_args,
    model_config_problems,
    server_args_problems,
)
from sglang_deft import cpu_compat
from sglang_deft import launch_server
from sglang_deft.launch_server import ConfigFileError, _device_arg, config_flag_spelled_out, parse_server_args
from sglang_deft.server_setup import check_startup, prepare_process, split_deft_backend
from tiny_models import with_config

MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-llama-deft"
BASE_ARGV = ["--model-path", str(MODEL), "--device", "cpu", "--grammar-backend", "none"]


@pytest.fixture(scope="module")
def deft_args():
    """Real ServerArgs through the launcher's parser: torch_native prefill, deft decode, on CPU."""
    return parse_server_args(BASE_ARGV + ["--attention-backend", "deft"], device="cpu")


def with_(server_args, **changes):
    args = copy.copy(server_args)
    for name, value in changes.items():
        setattr(args, name, value)
    return args


def test_attention_backend_deft_becomes_deft_decode_plus_sglang_extend(deft_args):
    assert (deft_args.attention_backend, deft_args.decode_attention_backend) == ("torch_native", "deft")
    assert deft_args.get_attention_backends() == ("torch_native", "deft")
    on_gpu = {"attention_backend": "deft", "decode_attention_backend": None, "prefill_attention_backend": None}
    split_deft_backend(on_gpu, "cuda")
    assert (on_gpu["attention_backend"], on_gpu["decode_attention_backend"]) == ("triton", "deft")


@pytest.mark.parametrize(
    "given, expected",
    [
        ((None, "deft"), ("triton", "deft")),  # not SGLang's hardware default (fa3 on Hopper)
        (("flashinfer", "deft"), ("flashinfer", "deft")),  # an explicit prefill choice stays
        (("deft", "triton"), ("deft", "triton")),  # deft would only prefill: left for the checks to refuse
        (("triton", None), ("triton", None)),  # no deft at all
        (("deft", "deft"), ("triton", "deft")),  # deft named twice: still decode only
    ],
)
def test_split_on_gpu(given, expected):
    args = {"attention_backend": given[0], "decode_attention_backend": given[1]}
    split_deft_backend(args, "cuda")
    assert (args["attention_backend"], args["decode_attention_backend"]) == expected


def test_split_refuses_other_devices_by_name(deft_args):
    """Left unsplit, --attention-backend deft on an xpu was refused first for running prefill on deft (by
    --prefill-attention-backend deft, which the user never gave); the device came second."""
    for given in ({"attention_backend": "deft", "decode_attention_backend": None},
                  {"attention_backend": None, "decode_attention_backend": "deft"}):
        with pytest.raises(UnsupportedConfiguration) as refused:
            split_deft_backend(dict(given), "xpu")
        assert refused.value.problems == ["--device xpu: the deft backend supports cuda and cpu"]
    args = {"attention_backend": "triton", "decode_attention_backend": None}  # no deft: not ours to refuse
    split_deft_backend(args, "xpu")
    assert args == {"attention_backend": "triton", "decode_attention_backend": None}
    with pytest.raises(UnsupportedConfiguration, match="--device xpu: the deft backend supports cuda and cpu"):
        check_server_args(with_(deft_args, device="xpu"))


@pytest.mark.parametrize(
    "device, has_cuda, expected, cpu_engine, compat, env",
    [
        (None, True, "cuda", False, False, None),
        # set before the import (the advice of sglang_deft.Engine's device='cpu' error): honoured on a CUDA host,
        # the GPUs hidden as for --device cpu
        (None, True, "cpu", True, True, "1"),
        (None, False, "cpu", True, True, None),
        # SGLang's CPU engine on a CUDA host: the GPUs hidden, so that SGLang's layers take their CPU code
        ("cpu", True, "cpu", True, True, None),
        ("cuda", True, "cuda", False, False, None),
    ],
)
def test_prepare_process(monkeypatch, device, has_cuda, expected, cpu_engine, compat, env):
    installed = []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # restored after the call, which may hide the GPUs
    # torch in a fresh process: it reads CUDA_VISIBLE_DEVICES when it first looks for a GPU
    monkeypatch.setattr("torch.cuda.is_available", lambda: has_cuda and os.environ["CUDA_VISIBLE_DEVICES"] != "")
    monkeypatch.setattr(cpu_compat, "install", lambda: installed.append(True))
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "")  # so that teardown restores it, set or not, after the call
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE")
    if env is not None:
        monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", env)
    assert prepare_process(device) == expected
    assert ("SGLANG_USE_CPU_ENGINE" in os.environ) == cpu_engine
    assert bool(installed) == compat
    assert (os.environ["CUDA_VISIBLE_DEVICES"] == "") == (expected == "cpu")


@pytest.mark.parametrize("device, env, visible, named", [
    ("cpu", "", "0", "--device cpu"),
    # sglang_deft.Engine imported with the variable set, after a notebook cell used CUDA: no --device was given
    (None, "1", None, "SGLANG_USE_CPU_ENGINE=1"),
])
def test_prepare_process_refuses_the_cpu_where_cuda_is_already_in_use(monkeypatch, device, env, visible, named):
    """A process that has looked at its GPU keeps seeing it whatever CUDA_VISIBLE_DEVICES says later; SGLang's
    layers would then pick CUDA kernels for CPU tensors. The refusal names what asked for the CPU, and leaves
    CUDA_VISIBLE_DEVICES as it was (hidden, the caller's later processes had no GPU)."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", env)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(cpu_compat, "install", lambda: pytest.fail("set up for the CPU"))
    with pytest.raises(ValueError, match=f"^{re.escape(named)} in a process that has already initialised CUDA"):
        prepare_process(device)
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == visible


def test_prepare_process_leaves_the_environment_as_it_was_when_the_cpu_layer_cannot_install(monkeypatch, caplog):
    """cpu_compat.install() refused (SGLang's torchvision importers imported first, say): CUDA_VISIBLE_DEVICES stayed
    empty (the caller's later processes lost their GPUs) and SGLANG_USE_CPU_ENGINE=1 set, and the launcher, which
    reports ValueErrors, printed a traceback."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "")
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE")
    monkeypatch.setattr("torch.cuda.is_available", lambda: os.environ["CUDA_VISIBLE_DEVICES"] != "")

    def refused():
        raise RuntimeError("sglang_deft.cpu_compat.install() must run before X is imported")

    monkeypatch.setattr(cpu_compat, "install", refused)
    with caplog.at_level("INFO"), pytest.raises(ValueError, match="^--device cpu: sglang_deft.cpu_compat.install"):
        prepare_process("cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0" and "SGLANG_USE_CPU_ENGINE" not in os.environ
    assert "--device cpu: CUDA_VISIBLE_DEVICES= set" in caplog.text


@pytest.mark.parametrize("device", ["xpu", "npu"])
def test_prepare_process_installs_the_cpu_layer_for_the_cpu_only(monkeypatch, device):
    """Any device without CUDA got the CPU layer, whose stand-in for sgl_kernel's native library hides a missing one."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(cpu_compat, "install", lambda: pytest.fail("the CPU layer for " + device))
    assert prepare_process(device) == device


def test_prepare_process_names_why_it_hides_the_gpus(monkeypatch, caplog):
    """The log said '--device cpu' when no --device was given (a machine without CUDA defaults to the CPU)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "")
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(cpu_compat, "install", lambda: None)
    with caplog.at_level("INFO"):
        assert prepare_process(None) == "cpu"
    assert "no --device and no CUDA device: CUDA_VISIBLE_DEVICES= set" in caplog.text and "--device cpu" not in caplog.text


@pytest.mark.parametrize("has_cuda, env, message", [
    (False, None, r"--device cuda: torch finds no CUDA device here"),
    # left over in the shell: SGLang's import-time constants would pick CPU kernels under a GPU setup
    (True, "1", r"--device cuda with SGLANG_USE_CPU_ENGINE=1 set"),
])
def test_prepare_process_refuses_cuda_it_cannot_set_up(monkeypatch, has_cuda, env, message):
    monkeypatch.setattr("torch.cuda.is_available", lambda: has_cuda)
    monkeypatch.setattr(cpu_compat, "install", lambda: pytest.fail("set up for the CPU"))
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", env or "")
    if env is None:
        monkeypatch.delenv("SGLANG_USE_CPU_ENGINE")
    with pytest.raises(ValueError, match=message):
        prepare_process("cuda")


@pytest.mark.parametrize("argv, device", [(["--model-path", "m", "--device", "cpu", "--port", "1"], "cpu"),
                                          (["--device=cuda", "--model-path", "m"], "cuda"),
                                          (["--model-path", "m"], None)])
def test_launcher_reads_the_device_before_sglang_loads(argv, device):
    assert _device_arg(argv) == device


@pytest.mark.parametrize("flag", ["--config FILE", "--config=FILE", "--conf FILE", "--confi=FILE"])
def test_launcher_reads_the_device_of_a_config_file(tmp_path, flag):
    """Read from the command line alone, a config file's `device: cpu` went unseen on a CUDA host: the process
    was set up for CUDA, --attention-backend deft split for triton prefill, and the checks then refused triton
    with --device cpu, a flag the user never gave."""
    config = tmp_path / "server.yaml"
    config.write_text("device: cpu\nattention-backend: deft\n")
    argv = ["--model-path", "m", *flag.replace("FILE", str(config)).split(" ")]
    assert _device_arg(argv) == "cpu"
    assert _device_arg(argv + ["--device", "cuda"]) == "cuda"  # the command line overrides the file
    config.write_text("attention-backend: deft\n")
    assert _device_arg(argv) is None
    assert _device_arg(["--config", str(tmp_path / "missing.yaml")]) is None  # SGLang's merger reports it


@pytest.mark.parametrize("config, argv, device", [
    ("dev: cpu\n", [], "cpu"),  # the merger writes --dev cpu, which SGLang's parser takes as --device
    ("device: cpu\n", ["--dev", "cuda"], "cuda"),  # an abbreviated flag on the command line still wins
    ("model-path: m\ndevice: cpu\nenable-metrics: true\nfoo: [1, 2]\n", [], "cpu"),
    ("device: [cpu\n", [], None),  # not YAML: SGLang's merger reports it
    ("- device\n", [], None),  # not a mapping: the same
    ("device: cpu\n", ["--device"], None),  # no value: SGLang's parser says so, with its usage
])
def test_launcher_reads_the_device_as_sglang_will(tmp_path, config, argv, device):
    path = tmp_path / "server.yaml"
    path.write_text(config)
    assert _device_arg(["--config", str(path), *argv]) == device


def test_launcher_reads_the_device_without_loading_torch(tmp_path):
    """prepare_process hides the GPUs for --device cpu; that must happen before torch first looks for them."""
    path = tmp_path / "server.yaml"
    path.write_text("device: cpu\n")
    code = ("import sys; from sglang_deft.launch_server import _device_arg; "
            f"print(_device_arg(['--config', {str(path)!r}]), 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["cpu", "False"]


def test_launcher_leaves_a_config_file_sglang_refuses_to_its_merger(tmp_path):
    path = tmp_path / "server.json"  # SGLang's merger takes .yaml and .yml files only
    path.write_text("device: cpu\n")
    assert _device_arg(["--config", str(path)]) is None


@pytest.mark.parametrize("flag, content, message", [
    (["--config"], None, "No config file specified after --config flag!"),
    # Spelled out as --config for the merger, a bare abbreviation reached it as one too.
    (["--conf"], None, "No config file specified after --config flag!"),
    (["--config", "server.json"], "device: cpu\n", "Config file must be YAML format, got: .json"),
    (["--config", "missing.yaml"], None, "Config file not found"),
    (["--config=server.yaml"], "- device\n", "Config file must contain a dictionary at root level"),
    (["--config", "server.yaml"], "device: [cpu\n", "while parsing"),
    # keys YAML does not read as strings: SGLang's merger raised AttributeError on key.replace (a traceback, exit 1)
    (["--config", "server.yaml"], "on: 1\n", "a key of the config file is no option name"),
    (["--config", "server.yaml"], "1: cpu\n", "a key of the config file is no option name"),
    # an empty path: the merger takes it for no --config, and the server started without the file
    (["--config="], None, "No config file specified (an empty path)"),
    (["--config", ""], None, "No config file specified (an empty path)"),
])
def test_a_config_file_sglangs_merger_refuses_is_a_usage_error(tmp_path, flag, content, message, monkeypatch, capsys,
                                                                caplog):
    """SGLang's merger raises ValueError for these (a YAML error for a file it cannot parse), which reached the
    user as a traceback with exit code 1; the launcher reports it as the other argument errors: one line, exit 2.
    The merger's own log line for a YAML error, which said it twice before that line, stays out."""
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / flag[-1].rpartition("=")[2]).write_text(content)
    with pytest.raises(ConfigFileError, match=re.escape(message)):
        parse_server_args(BASE_ARGV + flag, device="cpu")
    monkeypatch.setattr(sglang_common, "suppress_noisy_warnings", lambda: None)  # process-wide filters, not ours
    with pytest.raises(SystemExit) as exited:
        launch_server.main(BASE_ARGV + flag)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"sglang_deft.launch_server: --config: {message}" in err
    assert "Traceback" not in err
    assert [r.getMessage() for r in caplog.records if r.name == "sglang.srt.server_args_config_parser"] == []


def test_launcher_leaves_an_sglang_without_the_merger_to_the_version_check(monkeypatch):
    """Imported before prepare_process checks SGLang's version: a release without the module must not end the
    launcher with a bare ModuleNotFoundError instead of the version deft was written against."""
    monkeypatch.setitem(sys.modules, "sglang.srt.server_args_config_parser", None)  # import raises ImportError
    assert _device_arg(["--device", "cpu"]) is None


def test_launcher_leaves_a_malformed_command_line_to_sglangs_parser():
    assert _device_arg(["--model-path", "m", "--config"]) is None  # not "usage: launch_server.py [--device ..."


def test_decode_attention_backend_deft_is_a_cli_choice():
    args = parse_server_args(BASE_ARGV + ["--attention-backend", "torch_native", "--decode-attention-backend", "deft"],
                             device="cpu")
    assert args.get_attention_backends() == ("torch_native", "deft")
    assert server_args_problems(args) == []


# argparse takes "--conf" for "--config" (an abbreviation); SGLang's merger read only the exact "--config FILE",
# so the file was dropped without a word while the launcher's device came from it.
@pytest.mark.parametrize("form", ["--config FILE", "--config=FILE", "--conf FILE", "--confi=FILE"])
def test_config_file_is_read_in_either_form(tmp_path, form):
    config = tmp_path / "server.yaml"
    config.write_text("attention-backend: deft\nenable-torch-compile: true\nmax-running-requests: 3\n")
    flag = form.replace("FILE", str(config)).split(" ")
    args = parse_server_args(BASE_ARGV + flag + ["--max-running-requests", "5"], device="cpu")
    assert args.get_attention_backends() == ("torch_native", "deft")  # split as if given on the command line
    assert args.max_running_requests == 5  # the command line overrides the file
    assert any("--enable-torch-compile" in p for p in server_args_problems(args))


def test_fa3_prefill_on_an_e5m2_cache_is_refused(deft_args):
    """SGLang moves fa3 to triton under fp8_e5m2 only for --attention-backend fa3, which deft's split has made
    triton: an fa3 prefill override ran on a cache it does not read."""
    fa3 = with_(deft_args, device="cuda", attention_backend="triton", decode_attention_backend="deft",
                prefill_attention_backend="fa3")
    assert server_args_problems(with_(fa3, kv_cache_dtype="fp8_e5m2")) == [
        "--prefill-attention-backend fa3 with --kv-cache-dtype fp8_e5m2: SGLang's fa3 reads fp8_e4m3 caches only; "
        "prefill on triton, or use fp8_e4m3"]
    assert server_args_problems(with_(fa3, kv_cache_dtype="fp8_e4m3")) == []


def test_supported_configuration_passes(deft_args):
    assert server_args_problems(deft_args) == []
    assert server_args_problems(with_(deft_args, device="cuda", disable_cuda_graph=False)) == []  # CUDA graphs
    assert server_args_problems(with_(deft_args, device="cuda", disable_cuda_graph=True)) == []
    for kv_cache_dtype in ("fp8_e4m3", "fp8_e5m2", "bfloat16"):  # fp8: read as stored, with the layers' scales
        assert server_args_problems(with_(deft_args, kv_cache_dtype=kv_cache_dtype)) == []


@pytest.mark.parametrize(
    "changes",
    [
        dict(attention_backend="triton"),  # the launcher's split on GPU
        dict(attention_backend="flashinfer"),
        dict(attention_backend="triton", prefill_attention_backend="fa3"),
        dict(dp_size=2),  # SGLang's DP controller spawns the schedulers through sglang_deft.subprocess_entry
        dict(tokenizer_worker_num=2),
    ],
    ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()),
)
def test_gpu_prefill_backends_and_dp_are_served_on_cuda(deft_args, changes):
    """Refused with --device cpu only (the GPU backends died there at the first prefill; the DP controller
    misses the CPU compatibility layer)."""
    assert server_args_problems(with_(deft_args, device="cuda", **changes)) == []


def test_paged_kv_and_the_hierarchical_cache_are_served(deft_args, monkeypatch):
    """Paged KV: the radix tree shares whole pages and the tree builder reads the rows' token slots. HiCache: a
    running request's path is locked on the device, and load-back fills nodes before their prefill. On a CPU,
    SGLang's paged allocator is Triton (TRITON_INTERPRET=1 runs it) and its host pool needs CUDA: named there."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    on_gpu = with_(deft_args, device="cuda")
    for page_size in (2, 16, 64):
        assert server_args_problems(with_(on_gpu, page_size=page_size)) == []
        assert server_args_problems(with_(deft_args, page_size=page_size)) == [
            f"--page-size {page_size} with --device cpu: SGLang's paged KV allocator (alloc_extend, alloc_decode) "
            "runs Triton kernels, which on a CPU run only under TRITON_INTERPRET=1; set it, or use --page-size 1"]
    assert server_args_problems(with_(on_gpu, enable_hierarchical_cache=True, page_size=16)) == []
    assert any("--enable-hierarchical-cache with --device cpu" in p
               for p in server_args_problems(with_(deft_args, enable_hierarchical_cache=True)))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert server_args_problems(with_(deft_args, page_size=16)) == []


def test_reference_decode_path_is_refused_with_cuda_graphs(deft_args, monkeypatch):
    monkeypatch.setenv("SGLANG_DEFT_DECODE_IMPL", "reference")
    with pytest.raises(UnsupportedConfiguration, match="SGLANG_DEFT_DECODE_IMPL=reference with CUDA graphs"):
        check_server_args(with_(deft_args, device="cuda", disable_cuda_graph=False))
    assert server_args_problems(with_(deft_args, device="cuda", disable_cuda_graph=True)) == []
    assert server_args_problems(deft_args) == []  # CPU: SGLang's CPU engine captures no CUDA graphs


@pytest.mark.parametrize("backend", ["xgrammar", "outlines", "llguidance"])
def test_a_grammar_backend_whose_package_is_missing_is_refused_by_name(deft_args, backend, monkeypatch):
    """The CPU package set has no grammar package: SGLang's default, xgrammar, made the scheduler die at
    start with a bare ModuleNotFoundError (the launch command the examples printed did exactly that)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == backend else find_spec(name, *a))
    with pytest.raises(UnsupportedConfiguration, match=f"--grammar-backend {backend}.* needs the {backend} package"):
        check_server_args(with_(deft_args, grammar_backend=backend))
    check_server_args(deft_args)  # none
    # --skip-tokenizer-init: SGLang's scheduler makes no grammar backend, so the package is not needed
    check_server_args(with_(deft_args, grammar_backend=backend, skip_tokenizer_init=True))


@pytest.mark.parametrize(
    "changes, expected",
    [
        # SGLang rewrites NEXTN to EAGLE before deft sees it: the message names both.
        (dict(speculative_algorithm="EAGLE"), "--speculative-algorithm EAGLE (or NEXTN, which SGLang runs as EAGLE)"),
        (dict(speculative_algorithm="NGRAM"), "--speculative-algorithm NGRAM: verify and draft steps"),
        # Reached deft's CUDA-graph setup, which named the graphs' token count, not the flag.
        (dict(dllm_algorithm="LowConfidence"), "--dllm-algorithm LowConfidence: diffusion LLM decoding"),
        (dict(kv_cache_dtype="fp4_e2m1"), "--kv-cache-dtype fp4_e2m1: deft reads KV caches in the model's dtype or in fp8"),
        (dict(kv_cache_dtype="fp8_e4m3", quantization_param_path="scales.json"),
         "--quantization-param-path with --kv-cache-dtype fp8_e4m3: SGLang sets the layers' KV scales"),
        (dict(speculative_draft_attention_backend="deft"), "--speculative-draft-attention-backend deft"),
        (dict(enable_deterministic_inference=True), "--enable-deterministic-inference: deft splits"),
        # SGLang turns deterministic inference on for this flag itself: the user is told the flag they gave.
        (dict(enable_deterministic_inference=True, rl_on_policy_target="fsdp"),
         "--rl-on-policy-target fsdp (which turns on --enable-deterministic-inference): deft splits"),
        # Its KV pool's set_kv_buffer takes no scales: the first decode step raised in the scheduler.
        (dict(enable_double_sparsity=True), "--enable-double-sparsity: double-sparsity attention reads"),
        (dict(enable_two_batch_overlap=True), "--enable-two-batch-overlap"),
        (dict(enable_pdmux=True), "--enable-pdmux"),
        (dict(enable_dp_attention=True), "--enable-dp-attention"),
        (dict(attn_cp_size=2), "--attn-cp-size 2"),
        (dict(pp_size=2), "--pp-size 2"),
        (dict(disaggregation_mode="decode"), "--disaggregation-mode decode"),
        (dict(enable_torch_compile=True), "--enable-torch-compile"),
        (dict(grpc_mode=True), "--grpc-mode"),
        (dict(use_ray=True), "--use-ray"),
        (dict(encoder_only=True), "--encoder-only"),
        (dict(dp_size=2), "--dp-size 2 with --device cpu"),
        # uvicorn spawns the workers, which import SGLang without the CPU compatibility layer.
        (dict(tokenizer_worker_num=2), "--tokenizer-worker-num 2 with --device cpu"),
        (dict(device="xpu"), "--device xpu"),
        (dict(attention_backend="torch_native", decode_attention_backend="torch_native",
              prefill_attention_backend="deft"),
         "with decode on torch_native): deft is a decode backend; drop --prefill-attention-backend deft and pass "
         "--decode-attention-backend deft"),
        # The advice was to pass --attention-backend deft, which this user had.
        (dict(attention_backend="deft", decode_attention_backend="triton"),
         "with decode on triton): deft is a decode backend; drop --decode-attention-backend triton (or make it deft)"),
        # deft for prefill too: SGLang would send prefill to deft's forward_extend (on CPU the server died
        # at its first request).
        (dict(prefill_attention_backend="deft"), "prefill/extend as well as decode"),
        # A ServerArgs the caller made (Engine(server_args=...)) is not split like the launcher's flags.
        (dict(attention_backend="deft", decode_attention_backend=None), "Engine(server_args=...)"),
        # GPU-only prefill backends on CPU: the server died at its first prefill.
        (dict(attention_backend="triton"), "--attention-backend triton with --device cpu"),
        (dict(prefill_attention_backend="flashinfer"), "--prefill-attention-backend flashinfer with --device cpu"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_unsupported_flag_is_refused_by_name(deft_args, changes, expected, monkeypatch):
    # As in a process set up for --device cpu (launcher, Engine), on a GPU host too, where this test process
    # has no CPU layer: the --tokenizer-worker-num refusal is about that layer's absence in uvicorn's workers.
    monkeypatch.setattr(cpu_compat, "is_installed", lambda: True)
    with pytest.raises(UnsupportedConfiguration) as err:
        check_server_args(with_(deft_args, **changes))
    assert expected in str(err.value)
    assert len(err.value.problems) == 1


@pytest.mark.parametrize("flags", [["--prefill-attention-backend", "deft", "--decode-attention-backend", "deft"],
                                   ["--attention-backend", "deft", "--prefill-attention-backend", "deft"]])
def test_prefill_on_deft_from_the_command_line_is_refused(flags):
    """Through the launcher's parser: SGLang makes equal prefill and decode backends the attention backend."""
    args = parse_server_args(BASE_ARGV + flags, device="cpu")
    with pytest.raises(UnsupportedConfiguration, match="prefill/extend as well as decode"):
        check_server_args(args)


@pytest.mark.parametrize("flags, expected", [
    (["--enable-deterministic-inference"], "--enable-deterministic-inference: deft splits"),
    (["--rl-on-policy-target", "fsdp"], "--rl-on-policy-target fsdp (which turns on --enable-deterministic-inference)"),
])
@pytest.mark.parametrize("backend_flags", [["--attention-backend", "deft"], ["--decode-attention-backend", "deft"]])
def test_deterministic_inference_is_refused_for_deft_before_sglang_blames_torch_native(flags, expected, backend_flags):
    """Through the launcher's parser on CPU: SGLang's own check (in ServerArgs) raised first, saying the user had
    specified torch_native, the extend backend deft's split chose."""
    with pytest.raises(UnsupportedConfiguration, match=re.escape(expected)):
        parse_server_args(BASE_ARGV + backend_flags + flags, device="cpu")


@pytest.mark.parametrize("overrides, expected", [
    (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", dual_chunk_attention_config={
        "chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 32768}),
     "(Qwen2ForCausalLM): dual-chunk attention"),
    (dict(architectures=["GptOssForCausalLM"], model_type="gpt_oss", sliding_window=64,
          layer_types=["sliding_attention", "full_attention", "sliding_attention"], num_local_experts=4,
          num_experts_per_tok=2), "(GptOssForCausalLM): attention sinks"),
    (dict(architectures=["Exaone4ForCausalLM"], model_type="exaone4", sliding_window=64),
     "(Exaone4ForCausalLM): sliding windows (64) with prefill on torch_native"),
], ids=["dual_chunk", "gpt_oss", "exaone4"])
@pytest.mark.parametrize("backend_flags", [["--attention-backend", "deft"], ["--decode-attention-backend", "deft"]])
def test_models_sglang_refuses_first_are_refused_for_deft_by_name(tmp_path, overrides, expected, backend_flags):
    """Through the launcher's parser on CPU: SGLang's own checks (in ServerArgs) raised first, telling the user to
    set dual_chunk_flash_attn instead of the torch_native deft's split chose (which deft then refuses too), or
    that gpt-oss needs another backend, without saying why deft cannot serve it."""
    path = model_dir(tmp_path, **overrides)
    with pytest.raises(UnsupportedConfiguration, match=re.escape(expected)):
        parse_server_args(["--model-path", path, *BASE_ARGV[2:], *backend_flags], device="cpu")
    if "dual" in expected:  # the override SGLang applies to the config turns it off: served
        parse_server_args(["--model-path", path, *BASE_ARGV[2:], *backend_flags, "--json-model-override-args",
                           json.dumps({"dual_chunk_attention_config": None})], device="cpu")
    # not a deft server: SGLang's own rules, as before
    with pytest.raises(ValueError, match="dual_chunk_flash_attn") if "dual" in expected else pytest.raises(
            AssertionError, match="GptOssForCausalLM requires|required for Exaone4ForCausalLM"):
        parse_server_args(["--model-path", path, *BASE_ARGV[2:], "--attention-backend", "torch_native"], device="cpu")


def test_a_model_sglang_fetches_and_refuses_first_is_refused_in_deft_terms(tmp_path, monkeypatch):
    """A hub model not in the cache yet (every first launch): deft's early check found no config.json, and SGLang's
    ServerArgs, which fetches it, refused it naming the prefill backend deft chose ("required for Exaone4ForCausalLM"
    under torch_native), a flag the user never gave. The config is there once SGLang fails: deft reads it then."""
    from sglang_deft import config_checks

    path = model_dir(tmp_path, architectures=["Exaone4ForCausalLM"], model_type="exaone4", sliding_window=64)
    real, calls = config_checks._config_file, []

    def fetched_by_sglang(model_path, revision):
        calls.append(model_path)
        if len(calls) == 1:  # the split's early read: not downloaded yet
            raise FileNotFoundError(model_path)
        return real(model_path, revision)

    monkeypatch.setattr(config_checks, "_config_file", fetched_by_sglang)
    with pytest.raises(UnsupportedConfiguration, match=re.escape("(Exaone4ForCausalLM): sliding windows (64) with "
                                                                 "prefill on torch_native")):
        parse_server_args(["--model-path", path, *BASE_ARGV[2:], "--attention-backend", "deft"], device="cpu")
    assert len(calls) == 2


def test_model_file_problems_skip_what_is_not_a_local_model(tmp_path):
    from sglang_deft.config_checks import model_file_problems

    assert model_file_problems(None) == model_file_problems("org/model-on-a-hub") == []
    (tmp_path / "config.json").write_text("not json")
    assert model_file_problems(str(tmp_path)) == []
    assert model_file_problems(str(MODEL)) == []
    (tmp_path / "config.json").write_text('{"architectures": [null], "dual_chunk_attention_config": {}}')
    assert len(model_file_problems(str(tmp_path))) == 1  # SGLang tests "is not None"
    # --json-model-override-args applies first, as SGLang reads the config
    assert model_file_problems(str(tmp_path), '{"dual_chunk_attention_config": null}') == []
    assert model_file_problems(str(MODEL), '{"architectures": ["GptOssForCausalLM"]}') != []
    # SGLang asserts that these hybrid Mamba models are not on triton, deft's prefill on a GPU
    for arch in ("NemotronHForCausalLM", "Lfm2ForCausalLM"):
        [problem] = model_file_problems(str(MODEL), json.dumps({"architectures": [arch]}), extend_backend="triton")
        assert problem.endswith(f"({arch}): hybrid linear-attention / Mamba models are not supported by the deft "
                                "backend")
    # Exaone-4's windows: SGLang takes them on triton (deft's GPU prefill), not on torch_native (its CPU one)
    exaone = json.dumps({"architectures": ["Exaone4ForCausalLM"]})
    assert model_file_problems(str(MODEL), exaone, extend_backend="triton") == []
    assert "sliding windows (4096) with prefill on torch_native" in model_file_problems(
        str(MODEL), exaone, extend_backend="torch_native")[0]
    no_windows = json.dumps({"architectures": ["Exaone4ForCausalLM"], "sliding_window_pattern": None})
    assert model_file_problems(str(MODEL), no_windows, extend_backend="torch_native") == []


def cached_hub_model(tmp_path, monkeypatch) -> str:
    """A hub model in a Hugging Face cache under ``tmp_path``: its main revision (abc123) has dual-chunk attention,
    and no other revision is cached."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--long-context"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text('{"dual_chunk_attention_config": {}}')
    return "org/long-context"


def test_model_file_problems_read_a_hub_model_in_the_cache(tmp_path, monkeypatch):
    """A hub model already downloaded is checked from its cached config.json, at the revision asked for; one not in
    the cache is left to SGLang (no download here)."""
    from sglang_deft.config_checks import model_file_problems

    cached_hub_model(tmp_path, monkeypatch)
    assert "dual-chunk attention" in model_file_problems("org/long-context")[0]
    assert model_file_problems("org/long-context", revision="abc123") != []
    assert model_file_problems("org/long-context", revision="v2") == []  # that revision is not cached
    assert model_file_problems("org/not-downloaded") == []


def test_the_split_checks_the_model_at_the_revision_asked_for(tmp_path, monkeypatch):
    """--revision names the config.json the early check reads: another revision's would refuse a model it serves."""
    model = cached_hub_model(tmp_path, monkeypatch)

    def args(revision):
        return {"model_path": model, "revision": revision, "attention_backend": "deft", "decode_attention_backend": None}

    split_deft_backend(args("v2"), "cpu")  # not cached: left to SGLang
    with pytest.raises(UnsupportedConfiguration, match="dual-chunk attention"):
        split_deft_backend(args("abc123"), "cpu")


def test_the_default_device_is_cuda_unless_sglangs_cpu_engine_is_asked_for(monkeypatch):
    """SGLANG_USE_CPU_ENGINE asks for the CPU only as "1" (as SGLang reads it): a 0 left in the shell keeps the GPU."""
    import torch

    from sglang_deft.server_setup import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for value, device in (("1", "cpu"), ("0", "cuda"), ("", "cuda")):
        monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", value)
        assert default_device() == device, value
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE")
    assert default_device() == "cuda"


def test_decode_impl_the_scheduler_cannot_use_is_refused_at_launch(deft_args, monkeypatch):
    """The scheduler read it only when it made the backend: a typo failed there, and the Triton kernels on a CPU
    without Triton's interpreter died with Triton's '0 active drivers', naming neither the variable nor the fix."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("SGLANG_DEFT_DECODE_IMPL", "Reference")
    assert server_args_problems(deft_args) == ["SGLANG_DEFT_DECODE_IMPL='Reference': expected auto, reference or triton"]
    monkeypatch.setenv("SGLANG_DEFT_DECODE_IMPL", "triton")
    with pytest.raises(UnsupportedConfiguration, match="SGLANG_DEFT_DECODE_IMPL=triton with --device cpu"):
        check_server_args(deft_args)
    assert server_args_problems(with_(deft_args, device="cuda", disable_cuda_graph=True)) == []
    for value in ("1", "true", "On"):  # as Triton reads it
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert server_args_problems(deft_args) == []
    for impl in ("auto", "reference"):
        monkeypatch.setenv("SGLANG_DEFT_DECODE_IMPL", impl)
        assert server_args_problems(deft_args) == []
    plain = with_(deft_args, attention_backend="torch_native", decode_attention_backend=None)
    monkeypatch.setenv("SGLANG_DEFT_DECODE_IMPL", "bogus")
    assert server_args_problems(plain) == []  # not a deft server: not its variable


def test_triton_kernels_on_a_cpu_refuse_a_bf16_model(deft_args, monkeypatch):
    """Triton's interpreter computes a bf16 tl.dot wrongly: the first decode step would fail (tree_decode refuses
    it) where it used to return garbage."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SGLANG_DEFT_DECODE_IMPL", "triton")
    bf16, fp32 = ModelConfig(str(MODEL), dtype="bfloat16"), ModelConfig(str(MODEL), dtype="float32")
    assert model_config_problems(bf16, deft_args) == [
        "SGLANG_DEFT_DECODE_IMPL=triton with --device cpu and a bfloat16 model: Triton's interpreter computes a bf16 "
        "tl.dot wrongly; use float16 or float32 on a CPU (--dtype)"]
    assert model_config_problems(fp32, deft_args) == []
    monkeypatch.setenv("SGLANG_DEFT_DECODE_IMPL", "auto")  # the PyTorch reference path on a CPU
    assert model_config_problems(bf16, deft_args) == []
    # On a GPU the kernels run under auto too, and TRITON_INTERPRET=1 puts them in the interpreter there as well
    # (the first decode step or graph capture raised in the scheduler)
    on_gpu = with_(deft_args, device="cuda")
    for impl in ("auto", "triton"):
        monkeypatch.setenv("SGLANG_DEFT_DECODE_IMPL", impl)
        assert model_config_problems(bf16, on_gpu) == [
            "TRITON_INTERPRET=1 with --device cuda and a bfloat16 model: Triton's interpreter runs deft's kernels (on "
            "host copies) and computes a bf16 tl.dot wrongly; unset TRITON_INTERPRET, or --dtype float16"]
        assert model_config_problems(fp32, on_gpu) == []
    monkeypatch.setenv("SGLANG_DEFT_DECODE_IMPL", "reference")
    assert model_config_problems(bf16, on_gpu) == []
    monkeypatch.setenv("SGLANG_DEFT_DECODE_IMPL", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert model_config_problems(bf16, on_gpu) == []


def test_what_the_scheduler_would_fail_on_after_the_model_loaded_is_refused_at_launch(deft_args, monkeypatch):
    """An intel_amx prefill beside deft reached SGLang's intel_amx backend, whose native ops this CPU install lacks
    (SGLang falls back to torch_native only for --attention-backend intel_amx, which deft's split had replaced); a
    malformed SGLANG_DEFT_VERIFY_EVERY failed only when the scheduler made the backend."""
    from sglang_deft import cpu_compat

    monkeypatch.setattr(cpu_compat, "is_installed", lambda: True)
    amx = with_(deft_args, prefill_attention_backend="intel_amx")
    assert server_args_problems(amx) == [
        "--prefill-attention-backend intel_amx with --device cpu: SGLang's intel_amx backend calls sgl_kernel's native "
        "CPU ops, which this install lacks (deft's CPU compatibility layer stands in for sgl_kernel); use torch_native "
        "for prefill"]
    [gpu_prefill] = server_args_problems(with_(deft_args, prefill_attention_backend="flashinfer"))
    # not intel_amx, which cannot run either; not "--attention-backend deft", which was given
    assert gpu_prefill.endswith("on CPU use torch_native for prefill, or drop --prefill-attention-backend")
    # Beside a GPU-only --attention-backend, dropping the override alone made that the prefill backend: refused again
    [gpu_prefill] = server_args_problems(with_(deft_args, attention_backend="triton",
                                               prefill_attention_backend="flashinfer"))
    assert gpu_prefill.endswith("on CPU use torch_native for prefill, or drop --prefill-attention-backend and pass "
                                "--attention-backend deft")
    [gpu_prefill] = server_args_problems(with_(deft_args, attention_backend="flashinfer"))
    assert gpu_prefill.startswith("--attention-backend flashinfer with --device cpu")
    assert gpu_prefill.endswith("on CPU use torch_native for prefill, or --attention-backend deft, which picks "
                                "torch_native")
    monkeypatch.setenv("SGLANG_DEFT_VERIFY_EVERY", "often")
    monkeypatch.setenv("SGLANG_DEFT_TRACE_PLANS", "true")  # the backend traces on "1" only: nothing was traced
    monkeypatch.setenv("SGLANG_DEFT_SHARING_IDLE_S", "soon")
    monkeypatch.setenv("SGLANG_DEFT_STEADY_STEPS", "-1")
    assert server_args_problems(deft_args) == [
        "SGLANG_DEFT_VERIFY_EVERY='often': expected a number of decode steps >= 0 (0 turns the check off)",
        "SGLANG_DEFT_SHARING_IDLE_S='soon': expected seconds from 0 to 86400 without a decode step after which the "
        "sharing line logs the steps not yet logged (0 turns it off)",
        "SGLANG_DEFT_STEADY_STEPS='-1': expected a number of decode steps from 0 to 1024 that a full plan leaves room "
        "for (default 64; 0 plans every step in full)",
        "SGLANG_DEFT_TRACE_PLANS='true': expected 1 (log a fingerprint of every decode step's plans) or 0"]
    plain = with_(deft_args, attention_backend="torch_native", decode_attention_backend=None)
    assert server_args_problems(plain) == []  # not a deft server: not its variable


def test_a_bf16_kv_cache_under_another_dtype_is_refused_before_the_model_loads(deft_args):
    """It was refused only by the scheduler, after the weights loaded; the model config already tells."""
    bf16_cache = with_(deft_args, kv_cache_dtype="bf16")
    assert model_config_problems(ModelConfig(str(MODEL), dtype="float32"), bf16_cache) == [
        "--kv-cache-dtype bf16: a torch.bfloat16 KV cache under a torch.float32 model; deft reads a KV cache in the "
        "model's dtype or in fp8"]
    assert model_config_problems(ModelConfig(str(MODEL), dtype="bfloat16"), bf16_cache) == []


def test_cpp_radix_tree_is_refused(deft_args, monkeypatch):
    """Its nodes are opaque to Python: the first decode step would have raised in the scheduler."""
    monkeypatch.setenv("SGLANG_EXPERIMENTAL_CPP_RADIX_TREE", "1")
    assert any("SGLANG_EXPERIMENTAL_CPP_RADIX_TREE" in p for p in server_args_problems(deft_args))
    # --disable-radix-cache: SGLang's scheduler builds its ChunkCache instead, whatever the variable says
    assert server_args_problems(with_(deft_args, disable_radix_cache=True)) == []
    monkeypatch.setenv("SGLANG_EXPERIMENTAL_CPP_RADIX_TREE", "0")
    assert server_args_problems(deft_args) == []


def test_checks_ignore_servers_without_deft(deft_args):
    plain = with_(deft_args, attention_backend="torch_native", decode_attention_backend=None, page_size=16,
                  enable_torch_compile=True)
    assert server_args_problems(plain) == []


def test_disabled_radix_cache_is_allowed_with_a_warning(deft_args, caplog):
    with caplog.at_level(logging.WARNING, logger="sglang_deft.config_checks"):
        check_server_args(with_(deft_args, disable_radix_cache=True))
    assert "--disable-radix-cache" in caplog.text


def test_mixed_chunk_is_allowed_with_a_warning_that_says_where_mixed_steps_attend(deft_args, caplog):
    """HybridAttnBackend sends a MIXED step (decodes merged into a prefill chunk) to the prefill backend."""
    with caplog.at_level(logging.WARNING, logger="sglang_deft.config_checks"):
        check_server_args(deft_args)
        assert "--enable-mixed-chunk" not in caplog.text
        check_server_args(with_(deft_args, enable_mixed_chunk=True))
    assert "--enable-mixed-chunk: a step that mixes running decodes into a prefill chunk" in caplog.text
    assert "on the prefill backend (torch_native)" in caplog.text


@pytest.mark.parametrize("prefill, logged", [(None, "runs on SGLang's triton backend (--attention-backend triton"),
                                             ("flashinfer", "runs on SGLang's flashinfer backend "
                                                            "(--prefill-attention-backend flashinfer"),
                                             ("deft", None)])
def test_the_split_logs_the_backend_that_prefills(prefill, logged, caplog):
    """SGLang prefills on --prefill-attention-backend when it is given; deft there is refused by the checks, so
    the split says nothing of it."""
    args = {"attention_backend": None, "decode_attention_backend": "deft", "prefill_attention_backend": prefill}
    with caplog.at_level(logging.WARNING, logger="sglang_deft.server_setup"):
        split_deft_backend(args, "cuda")
    assert args["attention_backend"] == "triton"
    if logged is None:
        assert "prefill/extend runs on" not in caplog.text
    else:
        assert logged in caplog.text


def model_dir(tmp_path: Path, **overrides) -> str:
    return str(with_config(tmp_path, MODEL, **overrides))


def test_repo_model_passes(deft_args):
    check_model_config(ModelConfig(str(MODEL)), deft_args)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", kv_lora_rank=64, q_lora_rank=None,
              qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8,
              first_k_dense_replace=3),  # every layer dense; the experts count must be an int (transformers 5.x)
         "MLA attention"),
        # Qwen2.5-*-Instruct-1M: five query variants per token (chunk-relative RoPE) reach the decode backend
        (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", dual_chunk_attention_config={
            "chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 32768}),
         "dual-chunk attention"),
        # refused before its weights load, no longer only when the scheduler makes the backend
        (dict(architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next"),
         "hybrid linear-attention / Mamba models are not supported"),
    ],
    ids=["mla", "dual_chunk", "linear_attention"],
)
def test_unsupported_model_is_refused_by_name(deft_args, tmp_path, overrides, expected):
    path = model_dir(tmp_path, **overrides)
    problems = model_config_problems(ModelConfig(path), deft_args)
    assert len(problems) == 1 and expected in problems[0]
    assert ",".join(overrides.get("architectures", ["LlamaForCausalLM"])) in problems[0]


@pytest.mark.parametrize(
    "changes, expected",
    [
        (dict(is_multimodal=True), "multimodal models are not supported"),
        (dict(is_encoder_decoder=True), "encoder-decoder models (cross-attention) are not supported"),
        (dict(attention_chunk_size=8192), "chunked local attention is not supported"),
        (dict(is_hybrid_swa=True), "hybrid sliding-window memory (SGLang keeps the sliding-window layers' KV in a "
                                   "pool of their own, with slot ids of their own) is not supported"),
        # Baichuan-13B: no RoPE, and its slopes reach no CUDA backend; it was accepted, positions ignored
        (dict(use_alibi=True), "ALiBi position biases are not supported"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_unsupported_model_property_is_refused_by_name(deft_args, changes, expected):
    """Properties SGLang's ModelConfig derives (from the architecture, the config's fields), set directly."""
    config = copy.copy(ModelConfig(str(MODEL)))
    for name, value in changes.items():
        setattr(config, name, value)
    problems = model_config_problems(config, deft_args)
    assert len(problems) == 1 and expected in problems[0] and "(LlamaForCausalLM)" in problems[0]


def test_model_checks_ignore_servers_without_deft(deft_args, tmp_path):
    plain = with_(deft_args, attention_backend="torch_native", decode_attention_backend=None)
    dual_chunk = model_dir(tmp_path, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                           dual_chunk_attention_config={"chunk_size": 8192, "local_size": 1024,
                                                        "original_max_position_embeddings": 32768})
    assert len(model_config_problems(ModelConfig(dual_chunk), deft_args)) == 1
    assert model_config_problems(ModelConfig(dual_chunk), plain) == []


@pytest.mark.parametrize("flags, refused", [(["--attention-backend", "deft"], True),
                                            (["--attention-backend", "torch_native"], False)], ids=["deft", "no_deft"])
def test_startup_checks_the_model_of_a_deft_server(tmp_path, flags, refused):
    linear = model_dir(tmp_path, architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next")
    args = parse_server_args(["--model-path", linear, *BASE_ARGV[2:], *flags], device="cpu")
    if refused:
        with pytest.raises(UnsupportedConfiguration, match="hybrid linear-attention / Mamba models"):
            check_startup(args)
    else:
        check_startup(args)


@pytest.mark.parametrize("overrides", [
    dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64),
    dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=64),
], ids=["mistral", "layer_types"])
def test_sliding_window_models_are_served(deft_args, tmp_path, overrides):
    """Whether a window applies is the model class's business (SGLang's Llama, which serves Mistral and Phi-3,
    applies none; Gemma-2's layers do): deft follows each loaded layer's sliding_window_size
    (test_backend's test_sliding_window_layers_attend_each_querys_window), so the config alone refuses nothing."""
    check_model_config(ModelConfig(model_dir(tmp_path, **overrides)), deft_args)


def test_config_flag_spelled_out_leaves_other_flags_alone():
    assert config_flag_spelled_out(["--con", "x", "--context-length", "8", "--config-x", "--conf=a=b.yaml"]) == [
        "--con", "x", "--context-length", "8", "--config-x", "--config", "a=b.yaml"]


# --encoder-only too, which SGLang's own checks refuse for the tiny Llama (Qwen models only).
@pytest.mark.parametrize("flag", ["--grpc-mode", "--use-ray"])
def test_servers_other_than_http_start_as_sglang_starts_them(flag, monkeypatch):
    """Without deft, the launcher hands these modes to sglang.launch_server.run_server (it started the HTTP
    server whatever they said); with deft they are refused (test_unsupported_flag_is_refused_by_name)."""
    import sglang.launch_server
    import sglang.srt.entrypoints.http_server
    import sglang.srt.utils

    from sglang_deft import launch_server, server_setup

    started = []
    monkeypatch.setattr(server_setup, "prepare_process", lambda device: "cpu")  # the test process is set up
    monkeypatch.setattr(sglang.launch_server, "run_server", lambda args: started.append(("sglang", args)))
    monkeypatch.setattr(sglang.srt.entrypoints.http_server, "launch_server",
                        lambda args, **kw: started.append(("http", args)))
    monkeypatch.setattr(sglang.srt.utils, "kill_process_tree", lambda *a, **kw: None)  # pytest's workers
    # nor the worker's state: its parent-watch variable, warning filters, and SGLang's default port 30000, which
    # a server of the user's may hold
    from sglang.srt.utils import common as sglang_common

    from sglang_deft import server_process

    monkeypatch.setattr(server_process, "end_with_parent_process", lambda: None)
    monkeypatch.setattr(sglang_common, "suppress_noisy_warnings", lambda: None)
    monkeypatch.setattr(server_process, "port_free", lambda port, host: True)
    launch_server.main(BASE_ARGV + ["--attention-backend", "torch_native", flag])
    (how, args), = started
    assert how == "sglang" and getattr(args, flag[2:].replace("-", "_"))
    started.clear()
    launch_server.main(BASE_ARGV + ["--attention-backend", "torch_native"])
    assert [how for how, _ in started] == ["http"]


def test_a_source_tree_imported_before_the_installed_release_is_refused(monkeypatch, tmp_path):
    """PYTHONPATH=~/src/sglang/python with 0.5.10.post1 installed: the metadata names the installed release, the
    code that loads is another's."""
    import importlib.util
    from types import SimpleNamespace

    from sglang_deft.patches import sglang_version

    sglang_version.require_supported_sglang("p")  # the installed release, as installed
    elsewhere = str(tmp_path / "src" / "sglang" / "__init__.py")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: SimpleNamespace(origin=elsewhere))
    with pytest.raises(sglang_version.UnsupportedSGLangVersion, match=f"`p` .* but `import sglang` loads {elsewhere}"):
        sglang_version.require_supported_sglang("p")


def test_no_installed_sglang_is_refused_by_name(monkeypatch):
    from importlib.metadata import PackageNotFoundError

    from sglang_deft.patches import sglang_version

    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(sglang_version, "version", missing)
    with pytest.raises(sglang_version.UnsupportedSGLangVersion, match=r"`p` .* but no SGLang is installed here"):
        sglang_version.require_supported_sglang("p")


def test_prepare_process_refuses_another_sglang_release_first(monkeypatch):
    """The launcher and Engine set the process up before SGLang's modules load, the CPU layer by their
    0.5.10.post1 names: another release is refused there, by name, before anything else changes."""
    from sglang_deft.patches import sglang_version

    monkeypatch.setattr(sglang_version, "version", lambda name: "0.5.9")
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    with pytest.raises(sglang_version.UnsupportedSGLangVersion,
                       match=r"launcher, Engine.*0\.5\.10\.post1 internals, but SGLang 0\.5\.9 is installed"):
        prepare_process("cpu")
    assert "SGLANG_USE_CPU_ENGINE" not in os.environ


@pytest.mark.parametrize("rename_fails", [False, True])
def test_a_refusal_in_the_scheduler_is_written_whole_for_the_engine_and_raised(monkeypatch, tmp_path, rename_fails):
    """Each TP rank writes the refusal through a file of its own and a rename; a rename that fails leaves neither
    that file behind nor the refusal unraised."""
    import json
    from pathlib import Path

    from sglang_deft import config_checks

    path = tmp_path / "refusal"
    monkeypatch.setenv(config_checks.REFUSAL_FILE_ENV, str(path))
    monkeypatch.setattr(config_checks, "model_runner_problems", lambda runner: ["head dim 512 is not supported"])
    if rename_fails:
        def replace(self, target):
            raise OSError("read-only file system")

        monkeypatch.setattr(Path, "replace", replace)
    with pytest.raises(config_checks.UnsupportedConfiguration, match="head dim 512"):
        config_checks.check_model_runner(object())
    assert [p.name for p in tmp_path.iterdir()] == ([] if rename_fails else ["refusal"])
    if not rename_fails:
        assert json.loads(path.read_text()) == ["head dim 512 is not supported"]


@pytest.mark.parametrize("error", ["version", "device"])
def test_the_launcher_reports_a_process_it_cannot_set_up_as_an_argument_error(monkeypatch, capsys, error):
    """Another SGLang release, or --device against this machine: the reason and exit 2, as the launcher's other
    refusals, not a traceback."""
    from sglang_deft import launch_server, server_process, server_setup
    from sglang_deft.patches.sglang_version import UnsupportedSGLangVersion

    def prepare(device):
        raise (UnsupportedSGLangVersion("sglang 0.5.11 is installed; sglang_deft supports 0.5.10.post1") if
               error == "version" else ValueError("--device cuda: torch finds no CUDA device here"))

    monkeypatch.setattr(server_setup, "prepare_process", prepare)
    monkeypatch.setattr(server_process, "end_with_parent_process", lambda: None)
    with pytest.raises(SystemExit) as exit_:
        launch_server.main(BASE_ARGV)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("sglang_deft.launch_server: " + ("sglang 0.5.11" if error == "version"
                                                                             else "--device cuda"))
