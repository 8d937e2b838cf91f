"""sglang_deft.registration and the ForwardBatch patch: what the scheduler process relies on."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import sglang_deft.backend as backend_module
from sglang_deft import registration
from sglang_deft.patches import cuda_graph_replay, forward_batch_reqs, warmup_dummy_run


@pytest.fixture
def stand_ins(monkeypatch):
    """Tests that put a stand-in in place of the SGLang function a patch wraps: the patch takes it without checking
    its source against SGLang's (that check has its own test, test_cuda_graph_plan's
    test_patch_refuses_a_modified_sglang_of_the_same_release)."""
    for patch in (cuda_graph_replay, forward_batch_reqs, warmup_dummy_run):
        monkeypatch.setattr(patch, "require_source", lambda *args: None)


@pytest.mark.usefixtures("stand_ins")
def test_register_adds_the_backend_the_cli_choice_and_the_forward_batch_patch(monkeypatch):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

    def unpatched(cls, batch, model_runner):
        return SimpleNamespace()

    import sglang.srt.server_args as server_args_module

    monkeypatch.setattr(ForwardBatch, "init_new", classmethod(unpatched))
    monkeypatch.setattr(registration, "_registered", False)
    monkeypatch.delitem(ATTENTION_BACKENDS, "deft", raising=False)
    # Another test of this worker may have registered deft already: the choice must come from this register().
    without = [c for c in ATTENTION_BACKEND_CHOICES if c != "deft"]
    monkeypatch.setattr(server_args_module, "ATTENTION_BACKEND_CHOICES", without)
    registration.register()
    registration.register()  # idempotent
    assert ATTENTION_BACKENDS["deft"] is registration._create_deft_backend
    assert server_args_module.ATTENTION_BACKEND_CHOICES.count("deft") == 1
    patched = ForwardBatch.init_new.__func__
    assert getattr(patched, "_sglang_deft_patched", False)
    assert patched.__wrapped__ is unpatched  # one layer: wrapped once


@pytest.mark.usefixtures("stand_ins")
def test_creating_the_backend_patches_cuda_graph_replays(monkeypatch):
    from sglang.srt.model_executor.cuda_graph_runner import CudaGraphRunner

    monkeypatch.setattr(CudaGraphRunner, "can_run", lambda self, forward_batch: True)
    monkeypatch.setattr(backend_module, "DeftAttnBackend", lambda runner: ("deft", runner))
    assert registration._create_deft_backend("runner") == ("deft", "runner")
    assert getattr(CudaGraphRunner.can_run, "_sglang_deft_patched", False)


@pytest.mark.usefixtures("stand_ins")
def test_creating_the_backend_marks_sglangs_warmup_dummy_run(monkeypatch):
    """ModelRunner._dummy_run (FlashInfer's autotune at startup) runs with in_warmup_dummy_run() true, and only
    it: the decode backend tells its request-less batch from a real one by that."""
    from sglang.srt.model_executor.model_runner import ModelRunner

    seen = []
    monkeypatch.setattr(ModelRunner, "_dummy_run",
                        lambda self, batch_size, run_ctx=None: seen.append(warmup_dummy_run.in_warmup_dummy_run()))
    monkeypatch.setattr(backend_module, "DeftAttnBackend", lambda runner: ("deft", runner))
    original = ModelRunner._dummy_run
    registration._create_deft_backend("runner")
    registration._create_deft_backend("runner")  # idempotent: wrapped once
    assert ModelRunner._dummy_run.__wrapped__ is original
    ModelRunner._dummy_run(object(), 8)
    assert seen == [True] and not warmup_dummy_run.in_warmup_dummy_run()


@pytest.mark.usefixtures("stand_ins")
def test_forward_batch_carries_the_batch_requests(monkeypatch):
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    def init_new(cls, batch, model_runner):  # SGLang's, minus the tensors
        return SimpleNamespace(cls=cls, model_runner=model_runner)

    monkeypatch.setattr(ForwardBatch, "init_new", classmethod(init_new))
    forward_batch_reqs.apply()
    forward_batch_reqs.apply()  # idempotent
    assert ForwardBatch.init_new.__func__.__wrapped__ is init_new  # one layer
    reqs = [object(), object()]
    fb = ForwardBatch.init_new(SimpleNamespace(reqs=reqs), "runner")
    assert fb.deft_reqs is reqs  # the live requests, not a copy
    assert (fb.cls, fb.model_runner) == (ForwardBatch, "runner")
    assert ForwardBatch.init_new(SimpleNamespace(reqs=None), "runner").deft_reqs is None


def test_register_refuses_another_sglang_release_before_importing_it(monkeypatch):
    """register() imported SGLang's registry before any version check: called directly under another release it
    failed as a bare ImportError or AttributeError instead of naming the release it needs."""
    import builtins

    from sglang_deft.patches import sglang_version

    monkeypatch.setattr(registration, "_registered", False)
    monkeypatch.setattr(sglang_version, "version", lambda name: "0.5.11")
    real_import = builtins.__import__

    def no_sglang(name, *args, **kwargs):
        if name.startswith("sglang.srt"):
            raise ImportError(f"no module named {name}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sglang)
    with pytest.raises(sglang_version.UnsupportedSGLangVersion, match="SGLang 0.5.11 is installed"):
        registration.register()
