"""The backend's eager decode on a GPU for the batches SGLang builds besides a plain step. Skipped without CUDA.

``test_backend.py`` checks both on the CPU; here they run the GPU kernels, at the tiny model's heads (the Triton
stage-1 kernel) and at 32 q / 8 kv heads of 128 (the Hopper kernel on the H200):

1. A padded eager batch. SGLang pads an eager decode batch to a multiple of the attention-TP size when its
   MLP gathers across ranks (``ForwardBatch._pad_inputs_to_size``): ``seq_lens``/``seq_lens_cpu`` get rows of
   the backend's fill value, ``req_pool_indices`` and ``out_cache_loc`` rows of zeros, q/k/v rows past the
   requests. Its requests must decode bitwise as the same batch unpadded (a second backend, as a second
   server), through a full plan and the steady steps after it (the padded plan updated on the device), with
   the padding rows zero.
2. SGLang's warm-up decode batch (``ModelRunner._dummy_run`` for FlashInfer's autotune, on its forward
   stream, ``req_to_token_pool.size`` rows, no requests): its rows attend nothing, and the next real step
   decodes as per-request attention.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the GPU kernels need a GPU (test_backend.py runs these paths on the CPU)", allow_module_level=True)

import sglang_deft.backend as backend_module  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from sglang_deft.backend import DeftAttnBackend  # noqa: E402
from sglang_deft.kernels.tree_decode import stage2_shape  # noqa: E402
from test_backend import padded, per_request_reference, record_steady  # noqa: E402
from test_cuda_graph_gpu import CudaDecodeSetup  # noqa: E402

HEADS = pytest.mark.parametrize("heads", [None, (32, 8, 128)], ids=["tiny", "h128"])
ATOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_matches_reference(setup, q, outs, reqs, seq_lens_cpu, atol, what):
    B = len(reqs)
    for layer, out in zip(setup.layers, outs):
        expected = per_request_reference(q.view(-1, setup.hq, setup.d)[:B], setup.kv_pool.get_key_buffer(layer.layer_id),
                                         setup.kv_pool.get_value_buffer(layer.layer_id), setup.sim, reqs,
                                         seq_lens_cpu[:B], layer)
        torch.testing.assert_close(out[:B].view(B, setup.hq, setup.d).float(), expected, rtol=0, atol=atol,
                                   msg=lambda m: f"{what}: {m}")


# 5 requests padded to 8 rows: at either head count both sizes take the same stage-2 shape (asserted), so the
# outputs can be compared bitwise. 8 rows fit the graph buffers (CudaDecodeSetup captures up to 8), so the step
# planner serves both backends (full plans, then steady steps).
@HEADS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_padded_eager_batch_decodes_bitwise_as_unpadded(dtype, heads, monkeypatch):
    setup = CudaDecodeSetup(dtype, monkeypatch, heads)
    sim, padded_backend = setup.sim, setup.backend
    plain = DeftAttnBackend(setup.runner)
    logs = record_steady(padded_backend), record_steady(plain)
    fill = padded_backend.get_cuda_graph_seq_len_fill_value()
    prompt = sim.fresh(300)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.tokens(3 + i)) for i in range(5)])
    B, pad, L = len(reqs), 3, len(setup.layers)
    g = torch.Generator(device="cuda").manual_seed(3)
    for step in range(5):
        fb = setup.decode_batch(reqs)
        fb_padded = padded(fb, pad, fill)
        q = torch.randn(B + pad, setup.hq * setup.d, generator=g, device="cuda").to(dtype) * 3
        k = torch.randn(L, B + pad, setup.hkv, setup.d, generator=g, device="cuda").to(dtype)
        v = torch.randn(L, B + pad, setup.hkv, setup.d, generator=g, device="cuda").to(dtype)
        padded_backend.init_forward_metadata(fb_padded)
        outs = [padded_backend.forward_decode(q, k[i], v[i], layer, fb_padded) for i, layer in enumerate(setup.layers)]
        plain.init_forward_metadata(fb)
        plain_outs = [plain.forward_decode(q[:B], k[i, :B], v[i, :B], layer, fb) for i, layer in enumerate(setup.layers)]
        torch.cuda.synchronize()
        assert stage2_shape(padded_backend.forward_metadata.plan) == stage2_shape(plain.forward_metadata.plan)
        for out, out_plain in zip(outs, plain_outs):
            assert out.shape == (B + pad, setup.hq * setup.d)
            assert torch.equal(out[:B], out_plain), f"step {step}: the padded batch's requests decode differently"
            assert torch.equal(out[B:], torch.zeros_like(out[B:])), f"step {step}: padding rows attend something"
        assert_matches_reference(setup, q, outs, reqs, fb.seq_lens_cpu, ATOL[dtype], f"step {step}")
        sim.finish_decode(reqs)
    # A full plan, the step after it (room laid out), then steady steps: in both backends alike.
    assert logs[0] == logs[1] == [False, False, True, True, True]


@HEADS
def test_sglangs_warmup_decode_batch_attends_nothing_then_a_step_decodes(heads, monkeypatch):
    dtype = torch.bfloat16
    setup = CudaDecodeSetup(dtype, monkeypatch, heads)
    sim, backend, layer = setup.sim, setup.backend, setup.layers[0]
    rows = sim.req_to_token_pool.size  # _dummy_run's batch: past the graph buffers' 8 queries
    assert rows > backend.graph_plan.qperm.numel()
    warmup = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=rows,
                             seq_lens_cpu=torch.ones(rows, dtype=torch.int64),
                             seq_lens=torch.ones(rows, dtype=torch.int64, device="cuda"),
                             out_cache_loc=torch.zeros(rows, dtype=torch.int64, device="cuda"),
                             token_to_kv_pool=setup.kv_pool)
    with pytest.raises(RuntimeError, match="carries no requests"):
        backend.init_forward_metadata(warmup)
    g = torch.Generator(device="cuda").manual_seed(4)
    q = torch.randn(rows, setup.hq * setup.d, generator=g, device="cuda").to(dtype)
    k = torch.randn(rows, setup.hkv, setup.d, generator=g, device="cuda").to(dtype)
    v = torch.randn(rows, setup.hkv, setup.d, generator=g, device="cuda").to(dtype)
    with monkeypatch.context() as m:
        m.setattr(backend_module, "in_warmup_dummy_run", lambda: True)
        stream = torch.cuda.Stream()  # SGLang's forward stream, as _flashinfer_autotune runs it
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            backend.init_forward_metadata(warmup)
            out = backend.forward_decode(q, k, v, layer, warmup)
        torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert out.shape == (rows, setup.hq * setup.d) and torch.equal(out, torch.zeros_like(out))

    prompt = sim.fresh(200)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.tokens(2 + i)) for i in range(3)])
    for step in range(3):
        fb = setup.decode_batch(reqs)
        B = len(reqs)
        q = torch.randn(B, setup.hq * setup.d, generator=g, device="cuda").to(dtype) * 3
        k = torch.randn(B, setup.hkv, setup.d, generator=g, device="cuda").to(dtype)
        v = torch.randn(B, setup.hkv, setup.d, generator=g, device="cuda").to(dtype)
        backend.init_forward_metadata(fb)
        outs = [backend.forward_decode(q, k, v, lay, fb) for lay in setup.layers]
        torch.cuda.synchronize()
        assert_matches_reference(setup, q, outs, reqs, fb.seq_lens_cpu, ATOL[dtype], f"step {step} after the warm-up")
        sim.finish_decode(reqs)
