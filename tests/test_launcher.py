"""The launcher and sglang_deft.Engine as a user runs them: in their own processes, on CPU (on the GPU host,
``scripts/gpu_session.sh engine``, on the GPU)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import with_config

from repo_modules import PACKAGE_ROOT, REPO, child_result

MODEL = REPO / "models" / "tiny-llama-deft"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(args: list[str], timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_help_lists_deft_for_both_backend_flags():
    result = run(["-m", "sglang_deft.launch_server", "--help"])
    assert result.returncode == 0, result.stderr
    flat = " ".join(result.stdout.split())
    for flag in ("--attention-backend", "--decode-attention-backend"):
        choices = flat.split(flag + " {", 1)[1].split("}", 1)[0]
        assert "deft" in choices.split(","), f"{flag} choices: {choices}"


def test_unsupported_flag_stops_the_launcher_before_any_server_starts():
    result = run(["-m", "sglang_deft.launch_server", "--model-path", str(MODEL), "--device", DEVICE,
                  "--attention-backend", "deft", "--enable-torch-compile", "--grammar-backend", "none"])
    assert result.returncode == 2 and "Traceback" not in result.stderr  # the reasons, as an argument error
    assert "sglang_deft.launch_server: the `deft` attention backend cannot serve this configuration" in result.stderr
    assert "--enable-torch-compile" in result.stderr
    assert "Load weight" not in result.stdout + result.stderr  # refused before the scheduler started


def test_a_port_in_use_stops_the_launcher_before_any_server_starts():
    """SGLang binds its HTTP port only after loading the model, and then its launcher polled the port it could not
    bind for minutes (120 tries of 5 s) before exiting, its scheduler alive meanwhile."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(["-m", "sglang_deft.launch_server", "--model-path", str(MODEL), "--device", DEVICE,
                      "--attention-backend", "deft", "--grammar-backend", "none", "--port", str(port)], timeout=120)
    assert result.returncode == 1
    assert f"127.0.0.1:{port} is in use (another server?); pass --port with a free port" in result.stderr
    assert "Load weight" not in result.stdout + result.stderr


def test_a_port_out_of_range_is_an_argument_error():
    result = run(["-m", "sglang_deft.launch_server", "--model-path", str(MODEL), "--device", DEVICE,
                  "--attention-backend", "deft", "--grammar-backend", "none", "--port", "70000"], timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "sglang_deft.launch_server: --port 70000 is not a TCP port (0-65535)" in result.stderr


def test_a_changed_sglang_function_stops_the_launcher_as_an_argument_error():
    """A patched SGLang function whose source is not the release's (a locally edited install) is refused with the
    patch's reason in one line, as a wrong release is, not a traceback."""
    code = ("import sglang_deft.patches.forward_batch_reqs as p; p.SOURCE_SHA256 = '0' * 64\n"
            "from sglang_deft.launch_server import main\n"
            f"main(['--model-path', {str(MODEL)!r}, '--device', {DEVICE!r}, '--attention-backend', 'deft', "
            "'--grammar-backend', 'none'])")
    result = run(["-c", code], timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert ("sglang_deft.launch_server: `sglang_deft.patches.forward_batch_reqs` relies on SGLang 0.5.10.post1's "
            "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new") in result.stderr


def test_unsupported_model_stops_the_launcher(tmp_path):
    with_config(tmp_path, MODEL, architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next")
    result = run(["-m", "sglang_deft.launch_server", "--model-path", str(tmp_path), "--device", DEVICE,
                  "--decode-attention-backend", "deft", "--grammar-backend", "none"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("Qwen3NextForCausalLM" in result.stderr
            and "hybrid linear-attention / Mamba models are not supported" in result.stderr)


def test_a_device_this_process_cannot_set_up_stops_the_launcher_as_an_argument_error():
    """--device cuda without a GPU, or with SGLANG_USE_CPU_ENGINE=1 left in the shell, ended in a traceback and exit
    1, where the launcher's other refusals print the reason and exit 2."""
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1")
    result = run(["-m", "sglang_deft.launch_server", "--model-path", str(MODEL), "--device", "cuda",
                  "--attention-backend", "deft", "--grammar-backend", "none"], env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "sglang_deft.launch_server: --device cuda" in result.stderr


ENGINE_SCRIPT = textwrap.dedent("""
    import json, sys
    from sglang_deft import Engine
    from sglang_deft.config_checks import UnsupportedConfiguration

    device = sys.argv[2]
    try:
        Engine(model_path=sys.argv[1], device=device, attention_backend="deft", enable_torch_compile=True)
    except UnsupportedConfiguration as e:
        refused = str(e)
    from sglang.srt.server_args import ServerArgs
    try:  # a ServerArgs of the caller's own is not split: SGLang would prefill on deft
        Engine(server_args=ServerArgs(model_path=sys.argv[1], device=device, attention_backend="deft",
                                      grammar_backend="none"))
    except UnsupportedConfiguration as e:
        unsplit = str(e)
    engine = Engine(model_path=sys.argv[1], device=device, dtype="float32" if device == "cpu" else "auto",
                    attention_backend="deft",
                    grammar_backend="none", max_total_tokens=4096, decode_log_interval=1, log_level="info")
    try:
        outs = engine.generate("The lighthouse keeper wrote", {"temperature": 0, "max_new_tokens": 6, "n": 3})
    finally:
        engine.shutdown()
    print("RESULT " + json.dumps({"refused": refused, "unsplit": unsplit, "outputs": [o["output_ids"] for o in outs]}))
""")


def test_engine_registers_deft_in_its_scheduler_and_refuses_unsupported_flags():
    payload, result = child_result(["-c", ENGINE_SCRIPT, str(MODEL), DEVICE])
    assert "--enable-torch-compile" in payload["refused"]
    assert "prefill/extend as well as decode" in payload["unsplit"]
    outputs = payload["outputs"]
    assert len(outputs) == 3 and all(len(o) == 6 for o in outputs)
    log = result.stdout + result.stderr
    assert "decode_backend=deft" in log  # the scheduler process built the deft backend
    assert "DeFT decode sharing:" in log


def test_forked_children_are_for_the_cpu_only(monkeypatch):
    """SGLANG_DEFT_FORK_CHILDREN=1 (the tests' servers): SGLang's later ``set_start_method("spawn")`` picks fork;
    refused on CUDA, whose state a forked child cannot use."""
    import multiprocessing

    from sglang_deft.launch_server import fork_sglang_children

    chosen = []
    monkeypatch.setattr(multiprocessing, "set_start_method", lambda method, force=False: chosen.append(method))
    with pytest.raises(ValueError, match="children must be spawned"):
        fork_sglang_children("cuda")
    multiprocessing.set_start_method("spawn", force=True)
    fork_sglang_children("cpu")
    multiprocessing.set_start_method("spawn", force=True)
    multiprocessing.set_start_method("forkserver", force=True)
    assert chosen == ["spawn", "fork", "forkserver"]
