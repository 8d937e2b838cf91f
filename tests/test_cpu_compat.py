"""sglang_deft.cpu_compat: SGLang imports on CPU, native ops fail by name, torchvision stays hidden."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from sglang_deft import cpu_compat
from sglang_deft.cpu_compat import NativeOpUnavailable

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is for machines without CUDA")


def test_native_op_reached_through_sgl_kernel_names_the_op():
    import sgl_kernel  # the real Python files, with the stand-in for the native library

    with pytest.raises(NativeOpUnavailable, match=r"torch\.ops\.sgl_kernel\.silu_and_mul.*native \(CUDA\) library"):
        sgl_kernel.silu_and_mul(torch.ones(2, 8))
    # SGLang's feature probes (hasattr) still answer "absent".
    assert not hasattr(torch.ops.sgl_kernel, "convert_weight_packed")


def test_torchvision_stand_in_reaches_sglang_but_not_transformers():
    import sglang.srt.utils.common as common
    from transformers.utils.import_utils import is_torchvision_available

    assert importlib.util.find_spec("torchvision") is None
    assert not is_torchvision_available()
    with pytest.raises(RuntimeError, match="decode_jpeg was called, but torchvision is not installed"):
        common.decode_jpeg(torch.zeros(4, dtype=torch.uint8))


def test_install_is_idempotent_and_marks_child_processes():
    finders = len(sys.meta_path)
    cpu_compat.install()
    assert len(sys.meta_path) == finders
    assert os.environ[cpu_compat.ENV_FLAG] == "1"


def test_install_refuses_a_process_that_sees_cuda(monkeypatch):
    """SGLANG_DEFT_CPU_COMPAT=1 left exported on a GPU host: the stand-in common_ops would hide a missing or broken
    native sgl_kernel until its first operator. install() refuses, before it changes anything."""
    monkeypatch.setattr(cpu_compat, "is_installed", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv(cpu_compat.ENV_FLAG, raising=False)
    finders = list(sys.meta_path)
    with pytest.raises(RuntimeError, match=r"torch sees 1 CUDA device\(s\) here.*Unset SGLANG_DEFT_CPU_COMPAT"):
        cpu_compat.install()
    assert sys.meta_path == finders and cpu_compat.ENV_FLAG not in os.environ


@pytest.mark.parametrize("distribution, installed, message", [
    ("sglang", "0.5.9", "but SGLang 0.5.9 is installed"),
    ("sglang-kernel", "0.4.0", "sglang-kernel 0.4.0 is installed"),
])
def test_install_refuses_releases_it_was_not_written_for(monkeypatch, distribution, installed, message):
    """Its torchvision importers are SGLang 0.5.10.post1's modules and its stand-in answers sgl_kernel 0.4.1's loader:
    with other releases the failure came later, as a stray torchvision ImportError or a missing op. Refused up front,
    before it changes anything."""
    import importlib.metadata
    from sglang_deft.patches import sglang_version

    real = importlib.metadata.version
    fake = lambda name: installed if name == distribution else real(name)  # noqa: E731
    monkeypatch.setattr(importlib.metadata, "version", fake)
    monkeypatch.setattr(sglang_version, "version", fake)
    monkeypatch.setattr(cpu_compat, "is_installed", lambda: False)
    monkeypatch.delenv(cpu_compat.ENV_FLAG, raising=False)
    finders = list(sys.meta_path)
    with pytest.raises(Exception, match=message):
        cpu_compat.install()
    assert sys.meta_path == finders and cpu_compat.ENV_FLAG not in os.environ


IMPORT_RADIX_CACHE = "import sglang_deft.subprocess_entry; from sglang.srt.mem_cache.radix_cache import RadixCache"


@pytest.mark.parametrize("flag, works", [("1", True), ("0", False)], ids=["inherited", "absent"])
def test_spawned_entry_module_reinstalls_the_layer(flag, works):
    """What a spawned scheduler does: import sglang_deft.subprocess_entry, then SGLang."""
    env = {**os.environ, cpu_compat.ENV_FLAG: flag}
    result = subprocess.run([sys.executable, "-c", IMPORT_RADIX_CACHE], env=env, capture_output=True, text=True,
                            timeout=120)
    assert (result.returncode == 0) == works, result.stderr[-2000:]
    if not works:  # without the layer, the import fails where DESIGN.md says it does
        assert "common_ops" in result.stderr or "torchvision" in result.stderr
