"""DeftAttnBackend's decode step against plain per-request fp32 attention, on CPU.

Real SGLang objects where the backend touches them (radix cache, request pools, KV pool,
RadixAttention layers, ServerArgs, ModelConfig of the repo's tiny model); only the ModelRunner and
the ForwardBatch are stand-ins carrying the fields the backend reads.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.radix_attention import AttentionType, RadixAttention
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.server_args import ServerArgs

import sglang_deft.backend as backend_module
import sglang_deft.tree_attention as tree_attention
from cpu_only import cpu_only
from kernel_trees import make_tree
from radix_sim import RadixSim
from sglang_deft.backend import DeftAttnBackend
from sglang_deft.config_checks import UnsupportedConfiguration, layer_window, model_runner_problems, windows_of
from sglang_deft.kernels import KVTree, attention_reference
from sglang_deft.kv_tree_builder import DecodeKVTreeBuilder, build_decode_kv_tree

MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-llama-deft"
pytestmark = pytest.mark.usefixtures("single_rank")  # conftest.py


def cpu_server_args(**overrides) -> ServerArgs:
    """The tiny model on SGLang's CPU engine, prefill torch_native and decode deft: what the backend's
    unit tests build it under."""
    return ServerArgs(model_path=str(MODEL), device="cpu", attention_backend="torch_native",
                      decode_attention_backend="deft", grammar_backend="none", **{"dtype": "float32", **overrides})


@pytest.fixture(scope="module")
def server_args():
    return cpu_server_args(decode_log_interval=1)




def kv_pool_for(layers, size: int, dtype: torch.dtype = torch.float32) -> MHATokenToKVPool:
    """A CPU KV pool shaped for ``layers`` (float32 unless ``dtype`` says otherwise: an fp8 cache)."""
    return MHATokenToKVPool(size=size, page_size=1, dtype=dtype, head_num=layers[0].tp_k_head_num,
                            head_dim=layers[0].head_dim, layer_num=len(layers), device="cpu",
                            enable_memory_saver=False)


def model_runner(server_args, model_config, layers, sim=None, kv_pool=None, **overrides):
    """The ModelRunner fields the backend and its checks read."""
    windows = list(windows_of(layers))  # as Gemma's get_attention_sliding_window_size sets it
    fields = dict(server_args=server_args, model_config=model_config, model=torch.nn.ModuleList(layers),
                  device="cpu", kv_cache_dtype=kv_pool.dtype if kv_pool else None,
                  req_to_token_pool=sim.req_to_token_pool if sim else None, token_to_kv_pool=kv_pool,
                  use_mla_backend=False, sliding_window_size=windows[0] if len(windows) == 1 else None,
                  mambaish_config=None, tp_rank=0)
    return SimpleNamespace(**{**fields, **overrides})


def make_backend(sim, server_args, model_config, layers, kv_pool):
    return DeftAttnBackend(model_runner(server_args, model_config, layers, sim, kv_pool))


def random_kv_setup(server_args, model_config, layers, kv_slots: int, kv_dtype: torch.dtype = torch.float32):
    """A radix simulator, a KV pool for ``layers`` filled with seeded random K/V (cast to ``kv_dtype``), and a
    backend over them."""
    torch.manual_seed(0)
    sim = RadixSim(kv_slots=kv_slots)
    kv_pool = kv_pool_for(layers, kv_slots, kv_dtype)
    for i in range(len(layers)):
        for buf in (kv_pool.get_key_buffer(i), kv_pool.get_value_buffer(i)):
            buf.copy_(torch.randn(buf.shape))
    return sim, kv_pool, make_backend(sim, server_args, model_config, layers, kv_pool)


def attention_layers(model_config, logit_cap=0.0):
    hq, hkv, d = model_config.num_attention_heads, model_config.get_num_kv_heads(1), model_config.head_dim
    return [RadixAttention(hq, d, d ** -0.5, hkv, layer_id=i, logit_cap=logit_cap)
            for i in range(model_config.num_hidden_layers)]


def forked_batch(sim: RadixSim):
    """Two prompts: one cached and forked 3 ways (nested: two of them share more), one unrelated."""
    prompt = sim.fresh(40)
    sim.run_to_cache(prompt)
    inner = sim.tokens(9)
    reqs = sim.prefill([sim.new_req(prompt + inner + sim.tokens(3)), sim.new_req(prompt + inner + sim.tokens(5)),
                        sim.new_req(prompt + sim.tokens(7)), sim.new_req(sim.fresh(13))])
    for _ in range(3):  # a few decode steps, so private tails hold decoded tokens too
        sim.prepare_decode(reqs)
        sim.finish_decode(reqs)
    return reqs


class ForwardBatchStub(SimpleNamespace):
    """SGLang's ForwardBatch as far as the backend reads it; a class of its own, as SGLang's dataclass is, so that the
    backend can hold a weak reference to the batch it last counted."""


def decode_forward_batch(sim, reqs, kv_pool):
    """The memory side of one decode step, as the scheduler prepares it."""
    before = [sim.seq_len[r.rid] for r in reqs]
    seq_lens = sim.prepare_decode(reqs)
    rows = sim.req_pool_indices(reqs)
    out_cache_loc = sim.req_to_token[rows, torch.tensor(before)].long()
    return ForwardBatchStub(forward_mode=ForwardMode.DECODE, deft_reqs=reqs, req_pool_indices=rows,
                           seq_lens_cpu=seq_lens, seq_lens=seq_lens, out_cache_loc=out_cache_loc,
                           token_to_kv_pool=kv_pool)


def padded(fb, pad: int, fill: int) -> ForwardBatchStub:
    """``fb`` as ``ForwardBatch._pad_inputs_to_size`` leaves it, ``pad`` rows longer."""
    def cat(t, value):
        return torch.cat([t, torch.full((pad,), value, dtype=t.dtype, device=t.device)])
    return ForwardBatchStub(**{**vars(fb), "seq_lens_cpu": cat(fb.seq_lens_cpu, fill), "seq_lens": cat(fb.seq_lens, fill),
                              "req_pool_indices": cat(fb.req_pool_indices, 0), "out_cache_loc": cat(fb.out_cache_loc, 0)})


def record_steady(backend, planner: str = "step_planner") -> list:
    """Wraps the backend's step planner (or its window_step_planner): the list gets each step's steady flag (None:
    no fit)."""
    step_planner = getattr(backend, planner)
    log, plan = [], step_planner.plan

    def recorded(*args):
        step = plan(*args)
        log.append(None if step is None else step.steady)
        return step

    step_planner.plan = recorded
    return log


def calibrate(layers, scales: tuple[float, float]) -> None:
    """Give ``layers`` a calibrated fp8 checkpoint's per-tensor (K, V) scales, as SGLang's kv-cache
    quantization method leaves them."""
    for layer in layers:
        layer.k_scale, layer.v_scale = torch.tensor(scales[0]), torch.tensor(scales[1])
        layer.k_scale_float, layer.v_scale_float = scales


def triton_prefill(server_args):
    """``server_args`` as a GPU server's: prefill on SGLang's triton backend, which stores and reads an fp8 cache
    with the layers' scales as deft does (the backend itself still runs on the CPU)."""
    args = copy.copy(server_args)
    args.device, args.attention_backend = "cuda", "triton"
    return args


def per_request_reference(q, k_buffer, v_buffer, sim, reqs, seq_lens, layer, k_scale=1.0, v_scale=1.0):
    """Each request alone over its own req_to_token row (a sliding-window layer: the row's last
    ``sliding_window_size + 1`` slots, as FlashInfer's ``window_left``): a one-node tree per request."""
    window = layer_window(layer)
    first = [0 if window is None else max(n - window - 1, 0) for n in seq_lens.tolist()]
    rows = [sim.req_to_token[r.req_pool_idx, f:n] for r, f, n in zip(reqs, first, seq_lens.tolist())]
    indptr = torch.tensor([0] + [len(x) for x in rows], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    tree = KVTree(torch.cat(rows).to(torch.int32), indptr, torch.full((len(rows),), -1, dtype=torch.int32),
                  torch.arange(len(rows), dtype=torch.int32))
    return attention_reference(q, k_buffer, v_buffer, tree, layer.scaling, layer.logit_cap, k_scale, v_scale)


def step_inputs(B, layers):
    """Random q, k, v of one decode step of ``B`` requests for each layer."""
    hq, hkv, d = layers[0].tp_q_head_num, layers[0].tp_k_head_num, layers[0].head_dim
    return [(torch.randn(B, hq * d) * 3, torch.randn(B, hkv, d), torch.randn(B, hkv, d)) for _ in layers]


def eager_step(sim, reqs, layers, kv_pool, backend, fb, inputs):
    """The step of ``fb`` run eagerly (planned, then every layer) on ``inputs``; each layer's output, checked
    against the per-request reference."""
    backend.init_forward_metadata(fb)
    B, hq, d = len(reqs), layers[0].tp_q_head_num, layers[0].head_dim
    outs = []
    for layer, (q, k, v) in zip(layers, inputs):
        k_expected = kv_pool.get_key_buffer(layer.layer_id).clone()
        v_expected = kv_pool.get_value_buffer(layer.layer_id).clone()
        k_expected[fb.out_cache_loc], v_expected[fb.out_cache_loc] = k, v
        outs.append(backend.forward(q, k, v, layer, fb).view(B, hq, d))
        expected = per_request_reference(q.view(B, hq, d), k_expected, v_expected, sim, reqs, fb.seq_lens_cpu, layer)
        torch.testing.assert_close(outs[-1], expected, rtol=1e-5, atol=1e-5)
    return outs


@pytest.mark.parametrize("impl, device, triton", [(None, "cpu", False), (None, "cuda", True), ("auto", "cpu", False),
                                                 ("reference", "cuda", False), ("triton", "cpu", True)])
def test_decode_implementation_switch(monkeypatch, impl, device, triton):
    if impl is None:
        monkeypatch.delenv("SGLANG_DEFT_DECODE_IMPL", raising=False)
    else:
        monkeypatch.setenv("SGLANG_DEFT_DECODE_IMPL", impl)
    assert tree_attention.use_triton_kernels(torch.device(device)) is triton


def test_unknown_decode_implementation_is_refused(monkeypatch):
    monkeypatch.setenv("SGLANG_DEFT_DECODE_IMPL", "kernels")
    with pytest.raises(ValueError, match="SGLANG_DEFT_DECODE_IMPL='kernels': expected auto, reference or triton"):
        tree_attention.use_triton_kernels(torch.device("cpu"))


@pytest.fixture(params=["reference", "triton"])
def implementation(request, monkeypatch):
    """The decode implementation sglang_deft.tree_attention picks (its switch, forced either way)."""
    if request.param == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU only under TRITON_INTERPRET=1 (make test sets it)")
    monkeypatch.setattr(tree_attention, "use_triton_kernels", lambda device: request.param == "triton")
    return request.param


@cpu_only
def test_the_reference_path_plans_once_per_step(server_args, model_config, monkeypatch):
    """Its layers only gather and compute: each re-validated the tree, walked every query's path and copied every
    node's query list to the device (about 4 ms a layer on a 273-node tree of 256 queries, on the CPU)."""
    from sglang_deft.kernels import reference

    monkeypatch.setattr(tree_attention, "use_triton_kernels", lambda device: False)
    walks = []
    path_nodes = reference.path_nodes
    monkeypatch.setattr(reference, "path_nodes", lambda tree: walks.append(1) or path_nodes(tree))
    layers = attention_layers(model_config, 0.0)
    sim, kv_pool, backend = random_kv_setup(server_args, model_config, layers, 2048)
    reqs = forked_batch(sim)
    fb = decode_forward_batch(sim, reqs, kv_pool)
    backend.init_forward_metadata(fb)
    assert len(walks) == 1 and isinstance(backend.forward_metadata.plan, reference.ReferencePlan)
    hq, hkv, d = layers[0].tp_q_head_num, layers[0].tp_k_head_num, layers[0].head_dim
    for layer in layers:
        backend.forward(torch.randn(len(reqs), hq * d), torch.randn(len(reqs), hkv, d),
                        torch.randn(len(reqs), hkv, d), layer, fb)
    assert len(layers) > 1 and len(walks) == 1


@cpu_only
@pytest.mark.parametrize("logit_cap", [0.0, 5.0], ids=["plain", "logit_cap"])
def test_decode_matches_per_request_attention(server_args, model_config, logit_cap, implementation):
    layers = attention_layers(model_config, logit_cap)
    sim, kv_pool, backend = random_kv_setup(server_args, model_config, layers, 2048)
    reqs = forked_batch(sim)
    hq, hkv, d = layers[0].tp_q_head_num, layers[0].tp_k_head_num, layers[0].head_dim

    fb = decode_forward_batch(sim, reqs, kv_pool)
    backend.init_forward_metadata(fb)
    assert backend.sharing.total_attended == int(fb.seq_lens_cpu.sum())
    assert backend.sharing.total_unique < backend.sharing.total_attended  # the forked prompt is in the tree once

    B = len(reqs)
    for layer in layers:
        q = torch.randn(B, hq * d) * 3  # scaled up so that attention is far from uniform
        k, v = torch.randn(B, hkv, d), torch.randn(B, hkv, d)
        # Expected KV: this step's K/V written by us into a copy of the pool (the backend must write them).
        k_expected = kv_pool.get_key_buffer(layer.layer_id).clone()
        v_expected = kv_pool.get_value_buffer(layer.layer_id).clone()
        k_expected[fb.out_cache_loc], v_expected[fb.out_cache_loc] = k, v

        out = backend.forward(q, k, v, layer, fb)

        expected = per_request_reference(q.view(B, hq, d), k_expected, v_expected, sim, reqs, fb.seq_lens_cpu, layer)
        assert out.shape == (B, hq * d)
        torch.testing.assert_close(out.view(B, hq, d), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(kv_pool.get_key_buffer(layer.layer_id), k_expected)
        assert torch.equal(kv_pool.get_value_buffer(layer.layer_id), v_expected)


@cpu_only
def test_sglangs_warmup_decode_batch_attends_nothing(server_args, model_config, implementation, monkeypatch):
    """ModelRunner._dummy_run (FlashInfer's autotune, before graph capture) builds a decode ForwardBatch of
    placeholder rows without init_new, so without requests: deft used to stop the server at startup there. In
    that pass the rows attend nothing (zeros); a request-less decode batch at any other time is still refused."""
    layers = attention_layers(model_config)
    sim, kv_pool, backend = random_kv_setup(server_args, model_config, layers, 2048)
    rows = 5
    fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=rows, seq_lens_cpu=torch.ones(rows, dtype=torch.int64),
                         out_cache_loc=torch.zeros(rows, dtype=torch.int64), token_to_kv_pool=kv_pool)
    with pytest.raises(RuntimeError, match="carries no requests"):
        backend.init_forward_metadata(fb)
    monkeypatch.setattr(backend_module, "in_warmup_dummy_run", lambda: True)
    backend.init_forward_metadata(fb)
    layer = layers[0]
    hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
    out = backend.forward(torch.randn(rows, hq * d), torch.randn(rows, hkv, d), torch.randn(rows, hkv, d), layer, fb)
    assert out.shape == (rows, hq * d) and torch.equal(out, torch.zeros_like(out))


@cpu_only
def test_a_padded_eager_batch_decodes_its_requests(server_args, model_config, implementation):
    """SGLang pads an eager decode batch to a multiple of the attention-TP size when the MLP gathers across
    ranks (ForwardBatch.prepare_mlp_sync_batch: --moe-a2a-backend, --moe-dense-tp-size 1 at --tp > 1):
    seq_lens_cpu gets rows of the fill value, out_cache_loc rows of slot 0, q rows past the requests. The
    requests decode as unpadded, the padding rows attend nothing (zeros). Before, the tree builder refused
    the batch (3 requests, 4 seq_lens) and the scheduler died."""
    layers = attention_layers(model_config)
    sim, kv_pool, backend = random_kv_setup(server_args, model_config, layers, 2048)
    reqs = forked_batch(sim)[:3]
    fb = decode_forward_batch(sim, reqs, kv_pool)
    B, pad = len(reqs), 1
    fb = padded(fb, pad, backend.get_cuda_graph_seq_len_fill_value())
    backend.init_forward_metadata(fb)
    layer = layers[0]
    hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
    q = torch.randn(B + pad, hq * d) * 3
    k, v = torch.randn(B + pad, hkv, d), torch.randn(B + pad, hkv, d)
    k_expected = kv_pool.get_key_buffer(layer.layer_id).clone()
    v_expected = kv_pool.get_value_buffer(layer.layer_id).clone()
    k_expected[fb.out_cache_loc], v_expected[fb.out_cache_loc] = k, v
    out = backend.forward(q, k, v, layer, fb).view(B + pad, hq, d)
    expected = per_request_reference(q.view(B + pad, hq, d)[:B], k_expected, v_expected, sim, reqs,
                                     fb.seq_lens_cpu[:B], layer)
    torch.testing.assert_close(out[:B], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[B:], torch.zeros_like(out[B:]))


def windowed_layers(model_config, window: int):
    """The model's layers with every other one a sliding-window layer, as Gemma-2's (the even ones)."""
    layers = attention_layers(model_config)
    for layer in layers[::2]:
        layer.sliding_window_size = window
    return layers


@cpu_only
@pytest.mark.parametrize("window", [0, 4, 30, 1000])
def test_sliding_window_layers_attend_each_querys_window(server_args, model_config, window, implementation, caplog):
    """SGLang's sliding_window_size w (Gemma-2's local layers; a query attends its last w + 1 tokens) beside
    full-attention layers: windows of the query's own token, inside the private tails, inside the forked prompt
    (49-62 tokens by the first step), and past every sequence (the full tree). Over several steps, so that with the
    kernels the full layers' plan and the window plan take steady steps."""
    layers = windowed_layers(model_config, window)
    with caplog.at_level(logging.INFO, logger="sglang_deft.backend"):
        sim, kv_pool, backend = random_kv_setup(triton_prefill(server_args), model_config, layers, 2048)
    assert backend.window_tokens == window + 1
    if backend.window_graph_plan is not None:  # a private node per query beyond a builder's tree: one item each
        assert backend.window_graph_plan.items.shape[0] == backend.plan_limits.max_items + backend.max_bs
    assert f"sliding-window layers [0, 2] attend each query's last {window + 1} tokens" in caplog.text
    reqs = forked_batch(sim)
    B, hq, d = len(reqs), layers[0].tp_q_head_num, layers[0].head_dim
    window_steps = record_steady(backend, "window_step_planner") if backend.window_step_planner else None
    full_steps = record_steady(backend) if backend.window_step_planner else None
    for _ in range(4):
        fb = decode_forward_batch(sim, reqs, kv_pool)
        inputs = step_inputs(B, layers)
        outs = eager_step(sim, reqs, layers, kv_pool, backend, fb, inputs)  # checked against each window
        for layer, out, (q, _, _) in zip(layers, outs, inputs):
            if layer.sliding_window_size == window and window < 30:  # the window matters: the whole row differs
                layer.sliding_window_size = -1  # (the pool holds this step's K/V now)
                whole = per_request_reference(q.view(B, hq, d), kv_pool.get_key_buffer(layer.layer_id),
                                              kv_pool.get_value_buffer(layer.layer_id), sim, reqs, fb.seq_lens_cpu,
                                              layer)
                layer.sliding_window_size = window
                assert not torch.allclose(out, whole, rtol=1e-3, atol=1e-3)
        sim.finish_decode(reqs)
    # With the kernels, both plans' last two steps were steady: updated on the device
    assert window_steps in (None, [False, False, True, True])
    assert full_steps == window_steps


@cpu_only
@pytest.mark.parametrize("steady", ["0", "2"])
def test_steady_steps_come_from_the_environment(server_args, model_config, monkeypatch, caplog, steady):
    """SGLANG_DEFT_STEADY_STEPS=0 plans every step in full, both plans (a diagnostic: the steady update out of the
    way); 2 leaves room for two steady steps after each full plan, and sizes the window buffers' room by it."""
    monkeypatch.setattr(tree_attention, "use_triton_kernels", lambda device: True)
    monkeypatch.setenv("SGLANG_DEFT_STEADY_STEPS", steady)
    layers = windowed_layers(model_config, 4)
    with caplog.at_level(logging.INFO, logger="sglang_deft.backend"):
        sim, kv_pool, backend = random_kv_setup(triton_prefill(server_args), model_config, layers, 2048)
    assert backend.step_planner.slack == backend.window_step_planner.slack == int(steady)
    assert backend.window_graph_plan.kv_indices.numel() == backend.max_bs * (backend.window_tokens + 2 * int(steady)) + 1
    assert (f"SGLANG_DEFT_STEADY_STEPS={steady}: " + ("every decode step is planned in full on the host" if steady == "0"
            else "a full plan leaves room for 2 steady steps (default 64)")) in caplog.text
    reqs = forked_batch(sim)
    window_steps, full_steps = record_steady(backend, "window_step_planner"), record_steady(backend)
    for _ in range(6):
        fb = decode_forward_batch(sim, reqs, kv_pool)
        eager_step(sim, reqs, layers, kv_pool, backend, fb, step_inputs(len(reqs), layers))  # checked
        sim.finish_decode(reqs)
    # With room: a full plan without room (the batch is new), one with room, two steady steps, and again
    assert full_steps == window_steps == ([False] * 6 if steady == "0" else [False, False, True, True, False, True])


@pytest.mark.parametrize("raw", ["-1", "1025", "often", "1.5"])
def test_steady_steps_must_be_a_step_count(server_args, model_config, monkeypatch, raw):
    monkeypatch.setenv("SGLANG_DEFT_STEADY_STEPS", raw)
    sim = RadixSim(kv_slots=256)
    layers = attention_layers(model_config)
    with pytest.raises(ValueError, match=f"SGLANG_DEFT_STEADY_STEPS={raw!r}: expected a number of decode steps "
                                         "from 0 to 1024"):
        make_backend(sim, server_args, model_config, layers, kv_pool_for(layers, 256))


def test_sliding_windows_are_refused_where_they_cannot_be_served(server_args, model_config):
    """One window per model (a plan per window per step would be needed for more), and a prefill backend that
    applies it: SGLang's torch_native prefill attends every prompt token, its flashinfer prefill does outside
    piecewise CUDA graphs (its ragged path has no window_left)."""
    layers = windowed_layers(model_config, 64)
    assert model_runner_problems(model_runner(triton_prefill(server_args), model_config, layers)) == []
    for prefill in ("torch_native", "flashinfer"):
        args = copy.copy(triton_prefill(server_args))
        args.prefill_attention_backend = prefill
        problems = model_runner_problems(model_runner(args, model_config, layers))
        assert len(problems) == 1 and problems[0].startswith(
            f"sliding windows (64) with prefill on {prefill}: SGLang's {prefill} backend does not apply them"), problems
        assert problems[0].endswith("; prefill on triton or fa3")
    # On the CPU neither prefill that applies them runs: advice to switch to one would be refused in turn
    [problem] = model_runner_problems(model_runner(server_args, model_config, layers))
    assert server_args.device == "cpu" and problem.endswith(
        "wrong; the prefills that apply them (triton, fa3) need a GPU, so this model is not served on the CPU")
    # Windowed layers in a model class without get_attention_sliding_window_size (Cohere2's, ExaoneMoE's): SGLang's
    # triton prefill builds no window KV indices and failed at the first prompt; fa3's reads each layer's window
    [problem] = model_runner_problems(model_runner(triton_prefill(server_args), model_config, layers,
                                                   sliding_window_size=None))
    assert problem.startswith("sliding windows (64) with prefill on triton, which takes the window from the model "
                              "class's get_attention_sliding_window_size") and "--prefill-attention-backend fa3" in problem
    args = copy.copy(triton_prefill(server_args))
    args.prefill_attention_backend = "fa3"
    assert model_runner_problems(model_runner(args, model_config, layers, sliding_window_size=None)) == []
    # Gemma-3n's class gives sliding_window - 1, its layers sliding_window: refused on any prefill, the two windows
    # named (it was told to prefill on fa3, which served a window one token wider than the class's)
    for prefill_args in (triton_prefill(server_args), args):
        [problem] = model_runner_problems(model_runner(prefill_args, model_config, layers, sliding_window_size=63))
        assert problem.startswith("sliding windows: the model's layers set 64 and its class 63"), problem
    layers[2].sliding_window_size = 32
    problems = model_runner_problems(model_runner(triton_prefill(server_args), model_config, layers))
    assert problems == ["sliding windows of 2 sizes (32 in layers [2], 64 in layers [0]): deft plans one window per "
                        "decode step"]
    args = copy.copy(triton_prefill(server_args))  # both problems at once, not the second after the first is fixed
    args.prefill_attention_backend = "torch_native"
    problems = model_runner_problems(model_runner(args, model_config, layers))
    assert len(problems) == 2 and problems[1].startswith("sliding windows (32, 64) with prefill on torch_native")


def test_more_query_heads_per_kv_head_than_a_tile_holds_are_refused_by_model(server_args, model_config):
    """128 query heads on one KV head (MQA) were refused by the planner as the backend was made, a bare ValueError
    naming neither the layers nor what to change."""
    layers = [RadixAttention(128, 32, 32 ** -0.5, 1, layer_id=i) for i in range(2)]
    assert model_runner_problems(model_runner(server_args, model_config, layers)) == [
        "attention layers [0, 1]: 128 query heads per KV head on each rank (128 / 1): deft computes a KV head's query "
        "heads as rows of one 64-row tile (with one KV head replicated on every rank, a larger --tp-size gives each "
        "rank fewer)"]
    layers = [RadixAttention(64, 32, 32 ** -0.5, 1, layer_id=i) for i in range(2)]
    assert model_runner_problems(model_runner(server_args, model_config, layers)) == []


def test_attention_sinks_are_refused_at_startup(server_args, model_config):
    """gpt-oss's and MiMo-V2-Flash's attention modules hold sinks they pass to every attention call; with
    --disable-hybrid-swa-memory nothing else refuses those models, and forward_decode would raise mid-capture."""
    runner = model_runner(server_args, model_config, attention_layers(model_config))
    holder = torch.nn.Module()
    holder.sinks = torch.nn.Parameter(torch.zeros(8), requires_grad=False)
    runner.model.append(holder)
    assert model_runner_problems(runner) == ["attention sinks (3.sinks) are not supported: deft's softmax has no "
                                             "sink term"]
    del holder.sinks  # MiMo-V2's name for them, which the check missed
    holder.attention_sink_bias = torch.nn.Parameter(torch.zeros(8), requires_grad=False)
    assert model_runner_problems(runner) == ["attention sinks (3.attention_sink_bias) are not supported: deft's "
                                             "softmax has no sink term"]


def test_layers_held_in_a_dict_are_checked_as_the_modules_are(server_args, model_config):
    """SGLang's Transformers backend (--model-impl transformers, and its fallback for architectures SGLang has no
    class for) keeps its RadixAttention layers in a plain dict, attention_instances, which modules() does not walk:
    deft found no layer, so windows, caps and heads went unchecked and a windowed model got no window plan."""
    from sglang_deft.config_checks import attention_layers as model_attention_layers, windows_of

    layers = windowed_layers(model_config, 64)
    model = torch.nn.Module()
    model.attention_instances = {layer.layer_id: layer for layer in reversed(layers)}
    runner = model_runner(triton_prefill(server_args), model_config, [])
    runner.model = model
    found = model_attention_layers(model)
    assert [layer.layer_id for layer in found] == sorted(layer.layer_id for layer in layers)
    assert windows_of(found) == {64: [layer.layer_id for layer in layers if layer.sliding_window_size == 64]}
    args = copy.copy(triton_prefill(server_args))
    args.prefill_attention_backend = "torch_native"
    runner.server_args = args
    [problem] = model_runner_problems(runner)
    assert problem.startswith("sliding windows (64) with prefill on torch_native")
    runner.model = torch.nn.Linear(2, 2)  # no attention layer found at all: refused, not passed unchecked
    assert model_runner_problems(runner) == ["Linear holds no SGLang attention layer (RadixAttention) that deft can "
                                             "find: its per-layer settings cannot be checked"]


def test_layers_of_other_head_shapes_are_refused(server_args, model_config):
    """One plan serves every layer of a step, so the layers must share their heads (Step-3.5's window layers do
    not; SGLang serves it with --disable-hybrid-swa-memory)."""
    layers = attention_layers(model_config)
    hq, hkv, d = layers[0].tp_q_head_num, layers[0].tp_k_head_num, layers[0].head_dim
    layers[1] = RadixAttention(hq // 2, d, d ** -0.5, hkv, layer_id=1)
    problems = model_runner_problems(model_runner(server_args, model_config, layers))
    assert problems == [f"attention layers of 2 head shapes ({hq} q / {hkv} kv heads of {d} in layers [0, 2]; "
                        f"{hq // 2} q / {hkv} kv heads of {d} in layers [1]): deft plans each decode step once for "
                        "layers of one shape"]


@cpu_only
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("scales", [None, (0.5, 2.0)], ids=["uncalibrated", "calibrated"])
def test_decode_over_an_fp8_kv_cache_matches_per_request_attention(server_args, model_config, kv_dtype, scales,
                                                                   implementation):
    """--kv-cache-dtype fp8_e4m3 / fp8_e5m2: the backend stores this step's K/V as SGLang's pool does (divided by
    a checkpoint's scales, then cast) and attends the pool's values times those scales."""
    layers = attention_layers(model_config)
    if scales is not None:
        calibrate(layers, scales)
        server_args = triton_prefill(server_args)  # torch_native's prefill stores without the scales: refused
    k_scale, v_scale = scales or (1.0, 1.0)
    sim, kv_pool, backend = random_kv_setup(server_args, model_config, layers, 2048, kv_dtype)
    reqs = forked_batch(sim)
    hq, hkv, d = layers[0].tp_q_head_num, layers[0].tp_k_head_num, layers[0].head_dim
    fb = decode_forward_batch(sim, reqs, kv_pool)
    backend.init_forward_metadata(fb)
    B = len(reqs)
    for layer in layers:
        q = torch.randn(B, hq * d) * 3
        k, v = torch.randn(B, hkv, d) * k_scale, torch.randn(B, hkv, d) * v_scale
        k_expected = kv_pool.get_key_buffer(layer.layer_id).clone()
        v_expected = kv_pool.get_value_buffer(layer.layer_id).clone()
        k_expected[fb.out_cache_loc] = (k / k_scale).to(kv_dtype)
        v_expected[fb.out_cache_loc] = (v / v_scale).to(kv_dtype)

        out = backend.forward(q, k.clone(), v.clone(), layer, fb)  # SGLang's pool divides in place

        expected = per_request_reference(q.view(B, hq, d), k_expected, v_expected, sim, reqs, fb.seq_lens_cpu,
                                         layer, k_scale, v_scale)
        assert torch.equal(kv_pool.get_key_buffer(layer.layer_id).view(torch.uint8), k_expected.view(torch.uint8))
        assert torch.equal(kv_pool.get_value_buffer(layer.layer_id).view(torch.uint8), v_expected.view(torch.uint8))
        torch.testing.assert_close(out.view(B, hq, d), expected, rtol=1e-5, atol=1e-5 * max(v_scale, 1.0))


def kernel_check_setup(server_args, model_config, monkeypatch, window: int | None, every: int):
    """A backend on the Triton kernels (under the interpreter) checking every ``every``-th eager step, over the
    model's layers (every other one a ``window`` layer, prefilled on triton, unless None): (layers, sim, kv_pool,
    backend)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU only under TRITON_INTERPRET=1 (make test sets it)")
    monkeypatch.setattr(tree_attention, "use_triton_kernels", lambda device: True)
    monkeypatch.setenv("SGLANG_DEFT_VERIFY_EVERY", str(every))
    layers = attention_layers(model_config) if window is None else windowed_layers(model_config, window)
    if window is not None:
        server_args = triton_prefill(server_args)
    return (layers, *random_kv_setup(server_args, model_config, layers, 2048))


def test_the_kernel_checks_ground_truth_gives_a_padded_batchs_rows_an_empty_root():
    """The rows past the requests attend nothing (the kernels write zeros there): one more root without tokens."""
    from sglang_deft.kernel_check import request_tree

    tree = request_tree(torch.arange(40, dtype=torch.int32).view(2, 20), [0, 1], [5, 3], rows=4)
    assert tree.kv_indices.tolist() == [0, 1, 2, 3, 4, 20, 21, 22]
    assert tree.node_indptr.tolist() == [0, 5, 8, 8] and tree.query_node.tolist() == [0, 1, 2, 2]


@pytest.mark.parametrize("window", [None, 4], ids=["full", "window"])
def test_kernel_check_reports_the_kernels_error_against_the_reference(server_args, model_config, caplog,
                                                                      monkeypatch, window):
    """Steps 2 (planned in full), 4 (steady) and 6 (steady, with a planted bug) are checked. ``window``: layer 0 a
    sliding-window layer, checked against its window tree, built afresh on the steady steps (the kernels read the
    plan moved on the device), and layer 1, the first full-attention layer, against the full tree (only layer 0 was
    checked: Gemma's full-attention plan never was). The planted bug is also logged as a warning."""
    layers, sim, kv_pool, backend = kernel_check_setup(server_args, model_config, monkeypatch, window, every=2)
    full_steps = record_steady(backend)
    if window is not None:
        window_steps = record_steady(backend, "window_step_planner")
    reqs = forked_batch(sim)
    hq, hkv, d = layers[0].tp_q_head_num, layers[0].tp_k_head_num, layers[0].head_dim
    # A planted kernel bug on the last step: the check must see it (and only the first layer of each kind is checked).
    real_run_layer, broken = backend_module.run_layer, []

    def run_layer(q, k_buffer, v_buffer, plan, sm_scale, logit_cap, out, *kv_scales):
        real_run_layer(q, k_buffer, v_buffer, plan, sm_scale, logit_cap, out, *kv_scales)
        if broken:
            out[0, 0, 0] += 0.25

    monkeypatch.setattr(backend_module, "run_layer", run_layer)
    B = len(reqs)
    with caplog.at_level("INFO", logger="sglang_deft.kernel_check"):
        for step in range(1, 7):
            if step == 6:
                broken.append(True)
            fb = decode_forward_batch(sim, reqs, kv_pool)
            backend.init_forward_metadata(fb)
            for layer in layers:
                backend.forward(torch.randn(B, hq * d) * 3, torch.randn(B, hkv, d), torch.randn(B, hkv, d), layer, fb)
            sim.finish_decode(reqs)
    from sglang_deft.kernel_check import parse_kernel_check_lines

    rows = parse_kernel_check_lines(caplog.text)
    checked = (0,) if window is None else (0, 1)
    assert [(r["step"], r["layer"], r["queries"], r["dtype"]) for r in rows] == [
        (step, layer, B, "float32") for step in (2, 4, 6) for layer in checked]
    good, bad = rows[:-len(checked)], rows[-len(checked):]
    assert all(r["max_abs_diff"] < 1e-4 < r["max_abs_out"] for r in good)
    assert all(r["max_abs_diff"] >= 0.2 for r in bad)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and "fp32 reference" in r.getMessage()]
    assert [w.split(" at step ")[1][0] for w in warnings] == ["6"] * len(checked)
    assert "SGLANG_DEFT_DECODE_IMPL=reference" in warnings[0]
    assert full_steps == [False, False, True, True, True, True]  # steps 4 and 6 checked on steady full plans too
    if window is not None:
        assert window_steps == [False, False, True, True, True, True]


def test_kernel_checks_under_cuda_graphs_are_said_to_miss_the_replays(server_args):
    """SGLANG_DEFT_VERIFY_EVERY checks eager steps: under CUDA graphs a server logged no check and no word why."""
    from sglang_deft.backend import unchecked_replays

    graphs, eager = copy.copy(server_args), copy.copy(server_args)
    graphs.disable_cuda_graph, eager.disable_cuda_graph = False, True
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    warning = unchecked_replays(3, True, cuda, graphs)
    assert "SGLANG_DEFT_VERIFY_EVERY=3 checks eager decode steps only" in warning and "--disable-cuda-graph" in warning
    # Checked every step as asked: no checks asked for, graphs off, no graphs on a CPU, or the reference decoding
    assert [unchecked_replays(*a) for a in ((0, True, cuda, graphs), (3, True, cuda, eager), (3, True, cpu, graphs),
                                            (3, False, cuda, graphs))] == [None] * 4


@cpu_only
def test_the_server_log_names_what_computes_decode_attention(server_args, model_config, implementation, caplog):
    """Nothing said whether the Triton kernels or the PyTorch reference decoded (SGLANG_DEFT_DECODE_IMPL=reference on a
    GPU, any CPU server): only the absence of the stage-1 kernel's line told."""
    layers = attention_layers(model_config)
    with caplog.at_level(logging.INFO, logger="sglang_deft.backend"):
        random_kv_setup(server_args, model_config, layers, 64)
    what = "the Triton tree-decode kernels" if implementation == "triton" else "the PyTorch reference"
    assert f"deft: decode attention by {what}" in caplog.text and "(on cpu)" in caplog.text


@pytest.mark.parametrize("window", [None, 20])
def test_kernel_check_catches_a_wrong_kv_tree(server_args, model_config, caplog, monkeypatch, window):
    """The check's reference reads each request's KV from req_to_token, not the tree the plan was made from: a tree
    that reads another token in place of a request's newest (a builder bug) was checked against itself and passed."""
    layers, sim, kv_pool, backend = kernel_check_setup(server_args, model_config, monkeypatch, window, every=1)
    reqs = forked_batch(sim)
    real_plan = backend.planner.plan

    def plan_a_borrowed_token(tree, *args, **kwargs):
        tree.kv_indices[tree.kv_indices.numel() - 1] = tree.kv_indices[0]  # the last node's newest token
        return real_plan(tree, *args, **kwargs)

    monkeypatch.setattr(backend.planner, "plan", plan_a_borrowed_token)
    hq, hkv, d = layers[0].tp_q_head_num, layers[0].tp_k_head_num, layers[0].head_dim
    fb = decode_forward_batch(sim, reqs, kv_pool)
    with caplog.at_level("INFO", logger="sglang_deft.kernel_check"):
        backend.init_forward_metadata(fb)
        for layer in layers:
            backend.forward(torch.randn(len(reqs), hq * d), torch.randn(len(reqs), hkv, d),
                            torch.randn(len(reqs), hkv, d), layer, fb)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings and all("differs from the fp32 reference" in w for w in warnings), caplog.text


def three_query_tree() -> KVTree:
    """The kernel-check tests' tree: a 20-token root, two 5-token children over all 30 slots of the tests' KV
    buffers; queries end at both children and the root."""
    return make_tree([-1, 0, 0], [20, 5, 5], [1, 2, 0], pool=30)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_kernel_check_takes_a_half_precision_layer(dtype):
    """A float16/bfloat16 model's layer (every GPU server's): the check's fp32 reference went into an out the
    grouped reference refused as unlike q, and the ValueError stopped the scheduler at the first checked step."""
    from sglang_deft.kernel_check import check_layer

    torch.manual_seed(0)
    tree = three_query_tree()
    q, k, v = (torch.randn(shape).to(dtype) for shape in ((3, 8, 32), (30, 2, 32), (30, 2, 32)))
    out = attention_reference(q, k, v, tree, 32 ** -0.5, 0.0).to(dtype)
    row = check_layer(out, q, k, v, tree, 32 ** -0.5, 0.0, step=1, layer_id=0)
    assert row["dtype"] == str(dtype).removeprefix("torch.") and row["within_tolerance"]
    assert 0 < row["max_abs_diff"] < 1e-2  # out's own rounding, against an unrounded reference
    assert not check_layer(torch.zeros_like(out), q, k, v, tree, 32 ** -0.5, 0.0, step=2, layer_id=0)[
        "within_tolerance"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_steps_with_the_kernel_check(implementation, monkeypatch, caplog, dtype):
    """A float16/bfloat16 model's decode steps through the backend with the kernel check asked for on every step (a
    GPU server's precision; the CPU servers run float32, which hid a check that stopped every half-precision server):
    outputs in the layer's dtype, and on the kernels the check's lines within rounding."""
    from sglang_deft.kernel_check import parse_kernel_check_lines

    if implementation == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bfloat16 tl.dot is wrong (bf16 runs on the GPU host)")
    from sglang.srt.configs.model_config import ModelConfig

    monkeypatch.setenv("SGLANG_DEFT_VERIFY_EVERY", "1")
    server_args = cpu_server_args(decode_log_interval=1, dtype=str(dtype).removeprefix("torch."))
    model_config = ModelConfig.from_server_args(server_args)
    layers = attention_layers(model_config)
    sim, kv_pool, backend = random_kv_setup(server_args, model_config, layers, 2048, dtype)
    reqs = forked_batch(sim)
    hq, hkv, d = layers[0].tp_q_head_num, layers[0].tp_k_head_num, layers[0].head_dim
    with caplog.at_level("INFO", logger="sglang_deft.kernel_check"):
        for _ in range(2):
            fb = decode_forward_batch(sim, reqs, kv_pool)
            backend.init_forward_metadata(fb)
            for layer in layers:
                q, k, v = (torch.randn(len(reqs), *shape).to(dtype) for shape in ((hq * d,), (hkv, d), (hkv, d)))
                assert backend.forward(q, k, v, layer, fb).dtype == dtype
            sim.finish_decode(reqs)
    rows = parse_kernel_check_lines(caplog.text)
    checked = (1, 2) if implementation == "triton" else ()  # the reference path is what the check compares with
    assert [(r["step"], r["dtype"]) for r in rows] == [(step, str(dtype).removeprefix("torch.")) for step in checked]
    assert all(0 < r["max_abs_diff"] < 0.05 for r in rows), rows


def test_kernel_check_reads_the_cache_as_the_kernels_do():
    """An fp8 cache's V scale goes into the check's reference too (a reference without it flagged a right kernel as
    wrong), and no difference at no output is within tolerance (an all-zero output was judged outside it)."""
    from sglang_deft.kernel_check import check_layer, within_tolerance

    torch.manual_seed(0)
    tree = three_query_tree()
    q, k, v = torch.randn(3, 8, 32), torch.randn(30, 2, 32), torch.randn(30, 2, 32)
    exact = attention_reference(q, k, v, tree, 32 ** -0.5, 0.0, 0.5, 2.0)
    row = check_layer(exact, q, k, v, tree, 32 ** -0.5, 0.0, step=1, layer_id=0, k_scale=0.5, v_scale=2.0)
    assert row["max_abs_diff"] < 1e-5 and row["within_tolerance"]
    assert within_tolerance({"max_abs_diff": 0.0, "max_abs_out": 0.0, "dtype": "bfloat16"})


def test_a_float32_kernel_check_allows_for_large_scores():
    """Real models' scores reach 30-60, and a float32 score's rounding moves its weight by |s| roundoffs, in the kernels
    and in the reference alike: a right float32 kernel was flagged 3x past a bound of 2^-20 of |out| alone. The bound
    grows with the step's largest |score|; a wrong output is still far outside it."""
    from sglang_deft.kernel_check import check_layer
    from sglang_deft.kernels import plan_tree_decode, tree_decode

    torch.manual_seed(0)
    tree = make_tree([-1, 0, 0, 0, 0], [2048, 16, 16, 16, 16], [1, 2, 3, 4])
    d = 64
    q, k, v = torch.randn(4, 4, d) * 16, torch.randn(tree.kv_indices.numel() * 2, 1, d), torch.randn(
        tree.kv_indices.numel() * 2, 1, d)
    out = tree_decode(q, k, v, plan_tree_decode(tree, 4, 1, d, "cpu", kv_dtype=torch.float32), d ** -0.5)
    row = check_layer(out, q, k, v, tree, d ** -0.5, 0.0, step=0, layer_id=0)
    slots = tree.kv_indices.long()
    paths = [torch.cat([slots[:2048], slots[2048 + 16 * b:2064 + 16 * b]]) for b in range(4)]  # root + own child
    scores = [torch.einsum("hd,ld->hl", q[b], k[paths[b], 0]) * d ** -0.5 for b in range(4)]
    assert row["max_abs_score"] == pytest.approx(max(x.abs().max().item() for x in scores), rel=1e-5)
    assert row["max_abs_score"] > 40 and row["within_tolerance"], row
    # Query 0 without the root token its first head weights most: what a tree that drops a token gives.
    top = int(scores[0][0, :2048].argmax())
    keep = torch.ones(tree.kv_indices.numel(), dtype=torch.bool)
    keep[top] = False
    dropped = KVTree(tree.kv_indices[keep], tree.node_indptr - (tree.node_indptr > top).int(), tree.node_parent,
                     tree.query_node)
    wrong = out.clone()
    wrong[0] = attention_reference(q, k, v, dropped, d ** -0.5)[0]
    assert not check_layer(wrong, q, k, v, tree, d ** -0.5, 0.0, step=1, layer_id=0)["within_tolerance"]


@pytest.mark.parametrize("logit_cap", [0.0, 5.0], ids=["plain", "logit_cap"])
def test_kernel_check_compares_with_the_reference_of_the_same_layer(logit_cap, caplog):
    """check_layer's reference attends with the layer's scale and logit cap: an exact ``out`` shows no
    error, a zero ``out`` an error of the reference's magnitude."""
    from sglang_deft.kernel_check import check_layer, parse_kernel_check_lines

    torch.manual_seed(0)
    B, hq, hkv, d = 3, 8, 2, 32
    tree = three_query_tree()
    q, k, v = torch.randn(B, hq, d) * 3, torch.randn(30, hkv, d), torch.randn(30, hkv, d)
    exact = attention_reference(q, k, v, tree, d ** -0.5, logit_cap)
    with caplog.at_level("INFO", logger="sglang_deft.kernel_check"):
        ok = check_layer(exact, q, k, v, tree, d ** -0.5, logit_cap, step=7, layer_id=0)
        wrong = check_layer(torch.zeros_like(exact), q, k, v, tree, d ** -0.5, logit_cap, step=8, layer_id=0,
                            rank=1)
    assert ok["max_abs_diff"] < 1e-5 and ok["within_tolerance"] and not wrong["within_tolerance"]
    assert ok["max_abs_out"] == pytest.approx(exact.abs().max().item())
    assert wrong["max_abs_diff"] == wrong["max_abs_out"] == pytest.approx(exact.abs().max().item())
    rows = parse_kernel_check_lines(caplog.text)
    # the TP rank: each rank checks its own heads and logs its line (a summary counted them as checked steps)
    assert [(r["step"], r["layer"], r["rank"], r["queries"], r["dtype"]) for r in rows] == [
        (7, 0, 0, B, "float32"), (8, 0, 1, B, "float32")]
    assert all(type(r[key]) is int for r in rows for key in ("step", "layer", "rank", "queries"))


def test_kernel_check_interval_must_be_a_step_count(server_args, model_config, monkeypatch):
    monkeypatch.setenv("SGLANG_DEFT_VERIFY_EVERY", "often")
    sim = RadixSim(kv_slots=256)
    layers = attention_layers(model_config)
    with pytest.raises(ValueError, match="SGLANG_DEFT_VERIFY_EVERY='often'"):
        make_backend(sim, server_args, model_config, layers, kv_pool_for(layers, 256))


@cpu_only
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_plan_buffers_exist_before_the_first_step_where_the_kernels_run(server_args, model_config, monkeypatch,
                                                                          impl):
    """Made with the backend, before SGLang captures its (piecewise) CUDA graphs: made at the first decode
    step of a --disable-cuda-graph server, they changed that server's prefill outputs (SGLang 0.5.10)."""
    monkeypatch.setenv("SGLANG_DEFT_DECODE_IMPL", impl)
    sim = RadixSim(kv_slots=256)
    layers = attention_layers(model_config)
    backend = make_backend(sim, server_args, model_config, layers, kv_pool_for(layers, 256))
    if impl == "triton":
        assert backend.graph_plan is not None and backend.step_planner is not None
        assert backend.graph_plan.qperm.numel() == server_args.cuda_graph_max_bs
        assert backend.graph_plan.kv_indices.numel() == backend.kv_pool_size
    else:  # the reference path plans each step on its own
        assert backend.graph_plan is None


@cpu_only
def test_the_decode_path_is_chosen_once_with_the_backend(server_args, model_config, monkeypatch):
    """The backend chose the kernels or the reference at its setup, and made its buffers for that choice, but every
    step's plan read SGLANG_DEFT_DECODE_IMPL again: a process that changed it after making a backend got reference
    plans beside the kernels' buffers."""
    from sglang_deft.kernels import ReferencePlan

    monkeypatch.setenv("SGLANG_DEFT_DECODE_IMPL", "triton")
    sim = RadixSim(kv_slots=2048)
    reqs = forked_batch(sim)
    layers = attention_layers(model_config)
    kv_pool = kv_pool_for(layers, 2048)
    backend = make_backend(sim, server_args, model_config, layers, kv_pool)
    monkeypatch.setenv("SGLANG_DEFT_DECODE_IMPL", "reference")
    fb = decode_forward_batch(sim, reqs, kv_pool)
    backend.init_forward_metadata(fb)
    assert backend.kernels and not isinstance(backend.forward_metadata.plan, ReferencePlan)


def test_decode_step_logs_sharing(server_args, model_config, caplog):
    sim = RadixSim(kv_slots=2048)
    reqs = forked_batch(sim)
    layers = attention_layers(model_config)
    kv_pool = kv_pool_for(layers, 2048)
    backend = make_backend(sim, server_args, model_config, layers, kv_pool)  # decode_log_interval=1
    fb = decode_forward_batch(sim, reqs, kv_pool)
    with caplog.at_level("INFO", logger="sglang_deft.sharing_metrics"):
        backend.init_forward_metadata(fb)
    from sglang_deft.sharing_metrics import parse_sharing_lines

    (row,) = parse_sharing_lines(caplog.text)
    built = build_decode_kv_tree(reqs, sim.req_to_token, fb.seq_lens_cpu)
    assert row["attended_kv_tokens"] == built.attended_tokens
    assert row["unique_kv_tokens"] == built.unique_tokens < built.attended_tokens
    assert row["ratio"] == pytest.approx(built.attended_tokens / built.unique_tokens, abs=1e-3)
    assert 0 < row["plan_host_us"] < 1e6  # the step's tree build + plan, timed on the host


def test_a_windowed_models_sharing_counts_its_window_layers(server_args, model_config, caplog):
    """With sliding-window layers (two of the three here) the line's counts are per layer over the model's layers,
    a window layer counting its windows' tokens, and window_ratio is the window layers' own ratio."""
    from sglang_deft.sharing_metrics import parse_sharing_lines

    window = 4
    layers = windowed_layers(model_config, window)
    sim, kv_pool, backend = random_kv_setup(triton_prefill(server_args), model_config, layers, 2048)
    reqs = forked_batch(sim)
    fb = decode_forward_batch(sim, reqs, kv_pool)
    full = build_decode_kv_tree(reqs, sim.req_to_token, fb.seq_lens_cpu)
    windowed = DecodeKVTreeBuilder(sim.req_to_token).build_window(reqs, fb.seq_lens_cpu, window + 1)
    with caplog.at_level("INFO", logger="sglang_deft.sharing_metrics"):
        backend.init_forward_metadata(fb)
    (row,) = parse_sharing_lines(caplog.text)
    attended = (full.attended_tokens + 2 * windowed.attended_tokens) / 3
    unique = (full.unique_tokens + 2 * windowed.unique_tokens) / 3
    assert windowed.attended_tokens == len(reqs) * (window + 1) < full.attended_tokens
    assert (row["attended_kv_tokens"], row["unique_kv_tokens"]) == (round(attended), round(unique))
    assert row["ratio"] == pytest.approx(attended / unique, abs=1e-3)
    assert row["window_ratio"] == pytest.approx(windowed.attended_tokens / windowed.unique_tokens, abs=1e-3)


def test_the_sharing_meter_logs_a_pause_after_the_seconds_the_server_was_given(server_args, model_config,
                                                                               monkeypatch):
    """SGLANG_DEFT_SHARING_IDLE_S reaches the backend's meter (tests/conftest.py sets 0 for the in-process tests,
    whose windows must not be cut by a slow step)."""
    sim = RadixSim(kv_slots=256)
    layers = attention_layers(model_config)
    monkeypatch.setenv("SGLANG_DEFT_SHARING_IDLE_S", "2.5")
    assert make_backend(sim, server_args, model_config, layers, kv_pool_for(layers, 256)).sharing.idle_s == 2.5
    monkeypatch.setenv("SGLANG_DEFT_SHARING_IDLE_S", "0")
    assert make_backend(sim, server_args, model_config, layers, kv_pool_for(layers, 256)).sharing.idle_s is None
    monkeypatch.setenv("SGLANG_DEFT_SHARING_IDLE_S", "-1")
    with pytest.raises(ValueError, match="SGLANG_DEFT_SHARING_IDLE_S='-1'"):
        make_backend(sim, server_args, model_config, layers, kv_pool_for(layers, 256))


def test_one_tp_rank_logs_sharing(server_args, model_config, caplog):
    """Every TP rank runs the same steps; only rank 0 logs them (each rank did: N lines per interval at TP=N)."""
    sim = RadixSim(kv_slots=2048)
    reqs = forked_batch(sim)
    layers = attention_layers(model_config)
    kv_pool = kv_pool_for(layers, 2048)
    backend = DeftAttnBackend(model_runner(server_args, model_config, layers, sim, kv_pool, tp_rank=1))
    with caplog.at_level("INFO", logger="sglang_deft.sharing_metrics"):
        backend.init_forward_metadata(decode_forward_batch(sim, reqs, kv_pool))
    assert "DeFT decode sharing" not in caplog.text
    assert backend.sharing.total_steps == 1  # still counted


def test_a_forward_batch_run_again_counts_as_one_step(server_args, model_config):
    """Elastic expert parallelism re-runs ModelRunner._forward_raw on the same ForwardBatch after a rank fault:
    planned again (the output must be right), counted once; the next step's batch counts again."""
    sim = RadixSim(kv_slots=2048)
    reqs = forked_batch(sim)
    layers = attention_layers(model_config)
    kv_pool = kv_pool_for(layers, 2048)
    backend = make_backend(sim, server_args, model_config, layers, kv_pool)
    batch = decode_forward_batch(sim, reqs, kv_pool)
    backend.init_forward_metadata(batch)
    first = backend.forward_metadata
    backend.init_forward_metadata(batch)
    assert backend.forward_metadata is not first and backend.sharing.total_steps == 1
    backend.init_forward_metadata(decode_forward_batch(sim, reqs, kv_pool))  # another batch of the same step
    assert backend.sharing.total_steps == 2


def test_extend_batch_is_refused_with_routing_hint(server_args, model_config):
    sim = RadixSim(kv_slots=256)
    layers = attention_layers(model_config)
    kv_pool = kv_pool_for(layers, 256)
    backend = make_backend(sim, server_args, model_config, layers, kv_pool)
    with pytest.raises(RuntimeError, match="decode attention only.*--decode-attention-backend deft"):
        backend.init_forward_metadata(SimpleNamespace(forward_mode=ForwardMode.EXTEND))
    # a speculative batch: routing would not help, speculative decoding is what deft does not serve
    for mode in (ForwardMode.TARGET_VERIFY, ForwardMode.DRAFT_EXTEND):
        with pytest.raises(RuntimeError, match=f"deft got a {mode.name} batch: speculative decoding"):
            backend.init_forward_metadata(SimpleNamespace(forward_mode=mode))


def test_decode_batch_without_requests_is_refused(server_args, model_config):
    sim = RadixSim(kv_slots=256)
    layers = attention_layers(model_config)
    kv_pool = kv_pool_for(layers, 256)
    backend = make_backend(sim, server_args, model_config, layers, kv_pool)
    fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, deft_reqs=None)
    with pytest.raises(RuntimeError, match="forward_batch_reqs"):
        backend.init_forward_metadata(fb)


def test_decode_batch_without_host_sequence_lengths_is_refused(server_args, model_config):
    """The KV tree is built on the host from seq_lens_cpu; a batch without it is refused by name, and the
    step before it stays the backend's metadata untouched by the refused one."""
    sim = RadixSim(kv_slots=256)
    layers = attention_layers(model_config)
    kv_pool = kv_pool_for(layers, 256)
    backend = make_backend(sim, server_args, model_config, layers, kv_pool)
    reqs = sim.prefill([sim.new_req(sim.fresh(5))])
    fb = decode_forward_batch(sim, reqs, kv_pool)
    backend.init_forward_metadata(fb)
    planned, steps = backend.forward_metadata, backend.eager_steps
    fb.seq_lens_cpu = None
    with pytest.raises(RuntimeError, match="without seq_lens_cpu; the KV tree is planned on the host"):
        backend.init_forward_metadata(fb)
    assert backend.forward_metadata is planned and backend.eager_steps == steps


def test_the_last_steps_plan_is_dropped_before_the_next_is_made(server_args, model_config, monkeypatch):
    """A plan in buffers of its own (a batch past the graph buffers: 51 MB of partials for Llama-3-8B's heads at 256
    requests) stayed allocated beside the next step's while that was planned."""
    sim = RadixSim(kv_slots=256)
    layers = attention_layers(model_config)
    kv_pool = kv_pool_for(layers, 256)
    backend = make_backend(sim, server_args, model_config, layers, kv_pool)
    reqs = sim.prefill([sim.new_req(sim.fresh(5))])
    backend.init_forward_metadata(decode_forward_batch(sim, reqs, kv_pool))
    held, plan_step = [], backend_module.plan_step
    monkeypatch.setattr(backend_module, "plan_step",
                        lambda *a, **k: held.append(backend.forward_metadata) or plan_step(*a, **k))
    backend.init_forward_metadata(decode_forward_batch(sim, reqs, kv_pool))
    assert held == [None] and backend.forward_metadata is not None


def test_unsupported_layer_is_refused_at_creation(server_args, model_config):
    sim = RadixSim(kv_slots=256)
    layers = attention_layers(model_config)
    layers[1].use_irope = True
    kv_pool = kv_pool_for(layers, 256)
    with pytest.raises(UnsupportedConfiguration, match=r"attention layers \[1\]: iRoPE chunked attention"):
        make_backend(sim, server_args, model_config, layers, kv_pool)


@pytest.mark.parametrize(
    "changes, expected",
    [
        (dict(attn_type=AttentionType.ENCODER_ONLY), "encoder_only attention is not supported"),
        # Gemma-3's layers: bidirectional in extend only (config_checks._layer_problems), so served
        (dict(attn_type=AttentionType.DECODER_BIDIRECTIONAL), None),
        (dict(is_cross_attention=True), "cross-attention is not supported (causal decoder self-attention only)"),
        (dict(v_head_dim=16), "Q/K head dim 32 != V head dim 16 is not supported"),
        (dict(qk_head_dim=384, v_head_dim=384), "head dim 384 is not supported (deft's kernels serve up to 256)"),
        (dict(logit_cap=30.0, logit_capping_method="sigmoid"), "logit capping method 'sigmoid' is not supported"),
        (dict(use_irope=True), "iRoPE chunked attention is not supported"),
        (dict(xai_temperature_len=1024), "xai temperature scaling is not supported"),
        (dict(logit_cap=30.0), None),  # tanh capping (Gemma-2, Grok) is supported
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_unsupported_layers_are_named_once_with_their_ids(server_args, model_config, changes, expected):
    layers = attention_layers(model_config)
    for layer in layers[1:]:
        for name, value in changes.items():
            setattr(layer, name, value)
    problems = model_runner_problems(model_runner(server_args, model_config, layers))
    if expected is None:
        assert problems == []
    else:  # one line for all the layers
        ids = [layer.layer_id for layer in layers[1:]]
        assert len(problems) == 1 and problems[0].startswith(f"attention layers {ids}: ") and expected in problems[0]


@pytest.mark.parametrize("prefill_flags, warned", [
    (dict(disable_cuda_graph=True, chunked_prefill_size=-1), True),
    (dict(disable_cuda_graph=True, chunked_prefill_size=8192), False),
    (dict(disable_cuda_graph=False, chunked_prefill_size=-1), False),
], ids=["bidirectional_prefill", "chunked", "graphs"])
def test_gemma3s_layers_are_served_with_a_warning_where_sglang_prefills_them_bidirectionally(
        server_args, model_config, caplog, prefill_flags, warned):
    """Gemma-3's layers (SGLang's DECODER_BIDIRECTIONAL type) decode as any other; SGLang's triton prefill runs
    them without a causal mask under --disable-cuda-graph --chunked-prefill-size -1, which the user is told."""
    from sglang_deft.config_checks import check_model_runner

    layers = attention_layers(model_config)
    for layer in layers:
        layer.attn_type = AttentionType.DECODER_BIDIRECTIONAL
    args = triton_prefill(server_args)
    for name, value in prefill_flags.items():
        setattr(args, name, value)
    with caplog.at_level(logging.WARNING, logger="sglang_deft.config_checks"):
        check_model_runner(model_runner(args, model_config, layers))
    assert ("attention layers [0, 1, 2] are of SGLang's decoder_bidirectional type" in caplog.text) == warned


@pytest.mark.parametrize("prefill, cap, warned", [
    ("flashinfer", 30.0, True), ("torch_native", 50.0, True), ("triton", 30.0, False), ("fa3", 50.0, False),
    ("flashinfer", 0.0, False),
])
def test_a_prefill_backend_that_drops_the_soft_cap_is_served_with_a_warning(server_args, model_config, caplog,
                                                                             prefill, cap, warned):
    """Grok's and Gemma-2's layers cap their scores; SGLang's flashinfer and torch_native prefills leave the cap
    out, deft's decode applies it (as triton's does), which the user is told."""
    from sglang_deft.config_checks import check_model_runner

    layers = attention_layers(model_config)
    for layer in layers:
        layer.logit_cap = cap
    args = triton_prefill(server_args)
    args.prefill_attention_backend = prefill
    with caplog.at_level(logging.WARNING, logger="sglang_deft.config_checks"):
        check_model_runner(model_runner(args, model_config, layers))
    assert (f"tanh soft cap {cap:g}), which SGLang's {prefill} prefill does not apply" in caplog.text) == warned


@pytest.mark.parametrize(
    "changes, expected",
    [
        (dict(use_mla_backend=True), "the model runner uses an MLA backend"),
        (dict(mambaish_config=object()), "hybrid linear-attention / Mamba models are not supported"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_unsupported_model_runner_is_refused_by_name(server_args, model_config, changes, expected):
    runner = model_runner(server_args, model_config, attention_layers(model_config), **changes)
    problems = model_runner_problems(runner)
    assert len(problems) == 1 and problems[0].startswith(expected)


def test_an_fp8_kv_cache_chosen_by_sglang_for_the_checkpoint_is_served(server_args, model_config):
    """With --kv-cache-dtype auto, SGLang's model runner stores an FP8-quantized checkpoint's KV cache in
    fp8_e4m3 and rewrites the flag; deft serves that cache (fp4, which it does not read, stays refused)."""
    runner = model_runner(copy.copy(server_args), model_config, attention_layers(model_config))
    runner.model.quant_config = SimpleNamespace(kv_cache_quant_algo="FP8")
    runner.server_args.kv_cache_dtype = "fp8_e4m3"
    assert model_runner_problems(runner) == []
    runner.server_args.kv_cache_dtype = "fp4_e2m1"
    assert model_runner_problems(runner) == [
        "--kv-cache-dtype fp4_e2m1: deft reads KV caches in the model's dtype or in fp8 (fp8_e4m3, fp8_e5m2), "
        "not this format"]


@pytest.mark.parametrize("capability, kv_dtype, refused", [
    ((8, 0), torch.float8_e4m3fn, True), ((8, 6), torch.float8_e4m3fn, True), ((8, 9), torch.float8_e4m3fn, False),
    ((9, 0), torch.float8_e4m3fn, False), ((8, 0), torch.float8_e5m2, False)])
def test_an_fp8_e4m3_cache_is_refused_on_gpus_triton_cannot_compile_it_for(server_args, model_config, monkeypatch,
                                                                          capability, kv_dtype, refused):
    """Triton compiles float8_e4m3fn for sm_89+ only: on an A100 the first decode step failed to compile
    instead of the server refusing the flag."""
    from sglang_deft.kernels.tree_decode import kv_dtype_unsupported_on

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    kv_dtype_unsupported_on.cache_clear()
    try:
        runner = model_runner(server_args, model_config, attention_layers(model_config), device="cuda",
                              kv_cache_dtype=kv_dtype)
        problems = model_runner_problems(runner)
    finally:
        kv_dtype_unsupported_on.cache_clear()  # the fake capability must not outlive the test
    expected = [f"--kv-cache-dtype {server_args.kv_cache_dtype}: deft cannot read a float8_e4m3fn KV cache on "
                f"NVIDIA A100-SXM4-80GB (sm_{capability[0]}{capability[1]}): Triton reads that format on sm_89 and "
                "newer only (Ada, Hopper); fp8_e5m2 or the model's dtype work here"]
    assert problems == (expected if refused else [])


def test_an_fp8_cache_the_checkpoint_chose_is_refused_naming_the_checkpoint(server_args, model_config, monkeypatch):
    """Under --kv-cache-dtype auto SGLang rewrites the flag to fp8_e4m3 for an FP8 checkpoint before deft
    checks it: an A100's refusal named a flag value the user never gave."""
    from sglang_deft.kernels.tree_decode import kv_dtype_unsupported_on

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    kv_dtype_unsupported_on.cache_clear()
    try:
        runner = model_runner(copy.copy(server_args), model_config, attention_layers(model_config), device="cuda",
                              kv_cache_dtype=torch.float8_e4m3fn)
        runner.model.quant_config = SimpleNamespace(kv_cache_quant_algo="FP8")
        runner.server_args.kv_cache_dtype = "fp8_e4m3"
        problems = model_runner_problems(runner)
    finally:
        kv_dtype_unsupported_on.cache_clear()
    assert len(problems) == 1 and problems[0].startswith(
        "the checkpoint's FP8 KV cache (its quantization config's kv_cache_quant_algo, which SGLang applies under "
        "--kv-cache-dtype auto or fp8_e4m3): deft cannot read a float8_e4m3fn KV cache on NVIDIA A100")


def test_fp8_scales_are_refused_where_the_cache_would_be_read_unlike_it_was_written(server_args, model_config):
    """deft divides a calibrated checkpoint's K/V scales out as it stores a token and multiplies them back as it
    reads one, as SGLang's triton backend does. SGLang's torch_native prefill (deft's on CPU) stores and reads
    without them, so deft would read every prompt token scaled (1.33 off at |out| 2.2 with scales 0.5 / 2.0);
    and scales set without their float copies (--quantization-param-path) crash the triton prefill. Both are
    refused when the backend is made; an uncalibrated cache, or calibrated scales beside triton's prefill, are
    served."""
    layers = attention_layers(model_config)
    fp8_runner = lambda args: model_runner(args, model_config, layers, kv_cache_dtype=torch.float8_e4m3fn)  # noqa: E731
    assert model_runner_problems(fp8_runner(server_args)) == []  # uncalibrated
    calibrate(layers, (0.5, 2.0))
    problems = model_runner_problems(fp8_runner(server_args))
    assert len(problems) == 1 and ("calibrated fp8 KV scales (K 0.5, V 2) with prefill on torch_native" in problems[0])
    assert model_runner_problems(fp8_runner(triton_prefill(server_args))) == []
    assert model_runner_problems(model_runner(server_args, model_config, layers)) == []  # a float32 cache: unscaled
    for layer in layers:
        layer.k_scale_float = layer.v_scale_float = None
    problems = model_runner_problems(fp8_runner(triton_prefill(server_args)))
    assert len(problems) == 1 and "KV scales without their float copies (k_scale_float)" in problems[0]


def test_a_scales_file_sglang_did_not_load_is_not_refused(server_args, model_config):
    """--quantization-param-path under --kv-cache-dtype auto: SGLang reads the file only for a flag of fp8_e4m3,
    then rewrites auto to fp8_e4m3 for an FP8 checkpoint, whose own scales stand. The backend's check sees the
    rewritten flag; it used to refuse the file it took for loaded."""
    layers = attention_layers(model_config)
    calibrate(layers, (0.5, 2.0))
    args = triton_prefill(server_args)
    args.quantization_param_path, args.kv_cache_dtype = "scales.json", "fp8_e4m3"
    assert model_runner_problems(model_runner(args, model_config, layers, kv_cache_dtype=torch.float8_e4m3fn)) == []


def test_a_bf16_kv_cache_under_another_model_dtype_is_refused(server_args, model_config):
    """--kv-cache-dtype bf16 under a float16/float32 model: the kernels read K/V in q's dtype or fp8, so this
    would fail at the first decode step; it is refused when the backend is made instead."""
    runner = model_runner(copy.copy(server_args), model_config, attention_layers(model_config),
                          kv_cache_dtype=torch.bfloat16)
    runner.server_args.kv_cache_dtype = "bf16"
    assert model_config.dtype != torch.bfloat16
    assert model_runner_problems(runner) == [
        f"--kv-cache-dtype bf16: a torch.bfloat16 KV cache under a {model_config.dtype} model; deft reads a KV "
        "cache in the model's dtype or in fp8"]
    runner.kv_cache_dtype, runner.server_args.kv_cache_dtype = model_config.dtype, "auto"
    assert model_runner_problems(runner) == []


def reference_step(server_args, model_config, monkeypatch):
    """A backend on the reference path after one decode step of the forked batch: (backend, layers, fb)."""
    monkeypatch.setattr(tree_attention, "use_triton_kernels", lambda device: False)
    layers = attention_layers(model_config)
    sim, kv_pool, backend = random_kv_setup(server_args, model_config, layers, 2048)
    reqs = forked_batch(sim)
    fb = decode_forward_batch(sim, reqs, kv_pool)
    backend.init_forward_metadata(fb)
    return backend, layers, fb


def test_unsupported_forward_arguments_are_refused_not_ignored(server_args, model_config, monkeypatch):
    backend, layers, fb = reference_step(server_args, model_config, monkeypatch)
    layer, B = layers[0], len(fb.deft_reqs)
    hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
    q, k, v = torch.randn(B, hq * d), torch.randn(B, hkv, d), torch.randn(B, hkv, d)
    with pytest.raises(NotImplementedError, match=r"does not support \['sinks'\]"):
        backend.forward_decode(q, k, v, layer, fb, sinks=torch.zeros(hq))
    # None: not in use. (No KV write: a CUDA build of SGLang writes a CPU pool with a CUDA-only op.)
    assert backend.forward_decode(q, k, v, layer, fb, save_kv_cache=False, sinks=None).shape == (B, hq * d)


def test_queries_other_than_the_planned_requests_are_refused(server_args, model_config, monkeypatch):
    backend, layers, fb = reference_step(server_args, model_config, monkeypatch)
    layer, B = layers[0], len(fb.deft_reqs)
    hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
    pool = fb.token_to_kv_pool
    before = pool.get_key_buffer(0).clone(), pool.get_value_buffer(0).clone()
    with pytest.raises(RuntimeError, match=f"metadata is for {B} requests but q has {B - 1} tokens"):
        backend.forward_decode(torch.randn(B - 1, hq * d), torch.randn(B - 1, hkv, d), torch.randn(B - 1, hkv, d),
                               layer, fb)
    # Refused before the KV write: the cache holds what it held.
    assert torch.equal(pool.get_key_buffer(0), before[0]) and torch.equal(pool.get_value_buffer(0), before[1])
    windowed = copy.copy(layer)
    windowed.sliding_window_size = 64  # a layer the backend (made for a model without windows) has no plan for
    with pytest.raises(RuntimeError, match="layer 0 has a sliding window of 64 but the backend was made for a model "
                                           "without one"):
        backend.forward_decode(torch.randn(B, hq * d), torch.randn(B, hkv, d), torch.randn(B, hkv, d), windowed, fb)
    assert torch.equal(pool.get_key_buffer(0), before[0]) and torch.equal(pool.get_value_buffer(0), before[1])
    backend.init_forward_metadata(SimpleNamespace(forward_mode=ForwardMode.IDLE))  # an idle batch plans nothing
    with pytest.raises(RuntimeError, match=r"forward_decode without decode metadata .* or ran for an idle batch"):
        backend.forward_decode(torch.randn(B, hq * d), torch.randn(B, hkv, d), torch.randn(B, hkv, d), layer, fb)


def test_the_kernel_check_is_off_on_the_reference_path(server_args, model_config, monkeypatch, caplog):
    """SGLANG_DEFT_VERIFY_EVERY compares the kernels with the reference: where the reference itself runs,
    nothing is checked (nor logged)."""
    monkeypatch.setenv("SGLANG_DEFT_VERIFY_EVERY", "1")
    with caplog.at_level("INFO"):
        backend, layers, fb = reference_step(server_args, model_config, monkeypatch)
        B, layer = len(fb.deft_reqs), layers[0]
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
        backend.forward_decode(torch.randn(B, hq * d), torch.randn(B, hkv, d), torch.randn(B, hkv, d), layer, fb,
                               save_kv_cache=False)
    assert backend.verify_every == 1 and backend.forward_metadata.check_tree is None
    from sglang_deft.kernel_check import parse_kernel_check_lines

    assert parse_kernel_check_lines(caplog.text) == []
    assert "this server decodes with the PyTorch reference on cpu, so neither logs anything" in caplog.text


def test_a_kernel_check_line_cut_short_is_left_out():
    """gpu_e2e reads the log of a server that may still be writing it: a line cut before its dtype gave a row
    that within_tolerance raised KeyError on."""
    from sglang_deft.kernel_check import parse_kernel_check_lines, within_tolerance

    whole = ("INFO DeFT kernel check: step=4 layer=0 rank=0 queries=8 max_abs_diff=0.000244 max_abs_out=1.5 "
             "dtype=float16")
    rows = parse_kernel_check_lines(f"{whole}\n{whole.replace('step=4', 'step=8').split(' max_abs_out')[0]}")
    assert [r["step"] for r in rows] == [4] and rows[0]["dtype"] == "float16"
    assert within_tolerance(rows[0])
    # cut inside its dtype: "float" was read as a dtype, judged at bf16's rounding, and a failed fp16 check passed
    failed = whole.replace("max_abs_diff=0.000244", "max_abs_diff=0.002")
    assert not within_tolerance(parse_kernel_check_lines(failed)[0])
    assert parse_kernel_check_lines(failed[:-2]) == []
    # cut inside a number's exponent (%.6g writes 3.8147e-06): float() raised on "3.8147e"
    small = whole.replace("max_abs_diff=0.000244", "max_abs_diff=3.8147e-06")
    assert [parse_kernel_check_lines(small.split("e-06")[0] + cut) for cut in ("e", "e-")] == [[], []]
    assert parse_kernel_check_lines(small)[0]["max_abs_diff"] == 3.8147e-06
    with pytest.raises(ValueError, match="kernel check of dtype 'float'"):
        within_tolerance({"max_abs_diff": 0.002, "max_abs_out": 1.0, "dtype": "float"})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_kernel_check_judges_each_row_at_its_own_size(dtype):
    """One batch-wide |out| let a long request's small outputs be far off unseen: a short request's sharp attention
    (|out| ~3) next to a 4000-token near-uniform one (|out| ~0.04) whose last 150 tokens came from the wrong slots is
    outside the tolerance, the same batch with every row only rounded within it."""
    from sglang_deft.kernels import KVTree
    from sglang_deft.kernel_check import ROUNDOFF, ROW_FACTOR, check_layer

    torch.manual_seed(1)
    n_long, d = 4000, 64
    k, v = torch.randn(n_long + 8, 1, d) * 0.01, torch.randn(n_long + 8, 1, d)
    k[n_long:] = torch.randn(8, 1, d) * 3  # the short request's keys: sharp attention
    q = torch.randn(2, 1, d) * 3
    slots = torch.cat([torch.arange(n_long), torch.arange(n_long, n_long + 8)]).to(torch.int32)
    tree = KVTree(slots, torch.tensor([0, n_long, n_long + 8], dtype=torch.int32),
                  torch.full((2,), -1, dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32))
    exact = attention_reference(q, k, v, tree, d ** -0.5, 0.0)
    assert exact[1].abs().max() > 30 * exact[0].abs().max()
    rounded = check_layer(exact.to(dtype), q.to(dtype), k.to(dtype), v.to(dtype), tree, d ** -0.5, 0.0, 1, 0)
    assert rounded["within_tolerance"] and rounded["max_row_rel_diff"] <= 2 * ROUNDOFF[rounded["dtype"]]
    wrong_slots = slots.clone()
    wrong_slots[n_long - 150:n_long] = torch.arange(150, dtype=torch.int32)  # read the request's first 150 again
    wrong = attention_reference(q, k, v, dataclasses.replace(tree, kv_indices=wrong_slots), d ** -0.5, 0.0)
    row = check_layer(wrong.to(dtype), q.to(dtype), k.to(dtype), v.to(dtype), tree, d ** -0.5, 0.0, 2, 0)
    if dtype == torch.bfloat16:  # the batch-wide bound alone passes it: below bf16 rounding at the short one's |out|
        assert row["max_abs_diff"] <= 2 * ROUNDOFF[row["dtype"]] * row["max_abs_out"]
    assert row["max_row_rel_diff"] > ROW_FACTOR * ROUNDOFF[row["dtype"]] and not row["within_tolerance"]
