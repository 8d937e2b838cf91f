"""CUDA-graph decode, on CPU: the plan written into fixed buffers before each replay, and the patch
that hands the replay's ForwardBatch to the backend.

A CUDA graph cannot run here, but what it replays can be: the kernel launches recorded at capture
read the fixed plan buffers, so calling ``forward_decode`` with the metadata captured for a batch
size, after ``deft_prepare_graph_replay`` has rewritten those buffers, is what a replay computes.
The Triton kernels run under TRITON_INTERPRET=1 in fp32, and the eager step must give bitwise the
same output.
"""
from __future__ import annotations

import bisect
import copy
import logging
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

import sglang_deft.kernels.plan as kernel_plan
import sglang_deft.step_planner as step_planner_module
import sglang_deft.tree_attention as tree_attention
from cpu_only import cpu_only
from kernel_trees import make_tree
from sglang_deft.backend import DeftAttnBackend
from sglang_deft.kernels import KVTree, attention_reference, plan_tree_decode, tree_decode
from sglang_deft.kernels.plan import TreeDecodePlanner, build_schedule, few_merges_max_queries
from sglang_deft.kernels.tree_decode import STAGE2_SHAPE, STAGE2_SHAPE_FEW_MERGES, stage2_shape
from sglang_deft.patches import cuda_graph_replay, forward_batch_reqs, sglang_version, warmup_dummy_run
from sglang_deft.sharing_metrics import parse_sharing_lines
from sglang_deft.tree_attention import PlanLimits, plan_graph_step, plan_limits, plan_step, with_padding_queries
from test_backend import (ForwardBatchStub, attention_layers, cpu_server_args, decode_forward_batch, eager_step,
                          make_backend, padded, per_request_reference, random_kv_setup, record_steady, step_inputs,
                          triton_prefill, windowed_layers)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton kernels on CPU need TRITON_INTERPRET=1")
CAPTURE_BS = [1, 2, 4, 8]  # SGLang's smallest capture sizes; the largest is init_cuda_graph_state's max_bs


@pytest.fixture(scope="module")
def server_args():
    args = cpu_server_args()
    args.cuda_graph_max_bs, args.cuda_graph_bs = max(CAPTURE_BS), list(CAPTURE_BS)
    return args


@pytest.fixture(autouse=True)
def single_rank_triton(monkeypatch, single_rank):
    monkeypatch.setattr(tree_attention, "use_triton_kernels", lambda device: True)


# --------------------------------------------------------------------------------------------------
# Plan limits
# --------------------------------------------------------------------------------------------------
def h200(monkeypatch):
    monkeypatch.setattr(kernel_plan, "sm_count", lambda device: 132)
    return torch.device("cuda")


def test_limits_of_the_documented_example(monkeypatch):
    limits = plan_limits(256, 32, 8, h200(monkeypatch))
    assert limits == PlanLimits(max_items=706, max_partials=3104)
    assert limits.partial_bytes(32, 128) / 1e6 == pytest.approx(51.3, abs=0.05)
    cap = limits.capacity(256, 1000)
    assert (cap.max_queries, cap.max_kv_tokens, cap.max_merge) == (256, 1000, 3104)


@pytest.mark.parametrize("q_heads, kv_heads", [(32, 8), (28, 4), (40, 8)])
def test_limits_round_the_large_tiles_up(monkeypatch, q_heads, kv_heads):
    """Items: 2B (a tile per node of the builder's 2B - 1 and a tail each) + the large tiles of PATH_NODES * B rows of
    queries, rounded up (GQA 7: 9 queries a tile, which do not divide 8 x 10), + the schedule's target."""
    B = 10
    limits = plan_limits(B, q_heads, kv_heads, h200(monkeypatch))
    tile = 64 // (q_heads // kv_heads)
    target = 4 * 132 // kv_heads
    assert limits.max_items == 2 * B + math.ceil(tree_attention.PATH_NODES * B / tile) + target


def fork_trees(B: int) -> dict:
    """Trees of B queries shaped like the builder's: merged chains, and the B private tails last."""

    def tree(parent, lengths):
        return make_tree(parent, lengths, list(range(len(parent) - B, len(parent))))

    # prompt -> 4 branches -> B / 4 sub-branches in all -> 4 tails each
    nested = tree([-1] + [0] * 4 + [1 + i % 4 for i in range(B // 4)] + [5 + i % (B // 4) for i in range(B)],
                  [2000] + [1000] * 4 + [256] * (B // 4) + [3] * B)
    # binary forks down to B / 4 nodes, 4 tails each: paths of log2(B) nodes
    parent, level = [-1], [0]
    while len(level) < B // 4:
        parent += [p for p in level for _ in range(2)]
        level = list(range(len(parent) - 2 * len(level), len(parent)))
    binary = tree(parent + [p for p in level for _ in range(4)], [500] + [40] * (len(parent) - 1) + [7] * B)
    return {
        "fork": tree([-1] + [0] * B, [2000] + [1 + i % 50 for i in range(B)]),
        "nested": nested,
        "binary": binary,
        "no_sharing": make_tree([-1] * B, [300 + i for i in range(B)], list(range(B))),
    }


@pytest.mark.parametrize("name", ["fork", "nested", "binary", "no_sharing"])
@pytest.mark.parametrize("heads", [(32, 8), (32, 32), (8, 1), (28, 4), (40, 8), (24, 8)],
                         ids=["gqa4", "mha", "gqa8_tp", "gqa7", "gqa5", "gqa3"])
def test_fork_trees_fit_without_coarser_chunks(monkeypatch, name, heads):
    """At B = max_batch on an H200, the limits hold the usual fork shapes, and the plan they allow is
    the plan without limits: the limits never change the chunking of such a step."""
    B, (hq, hkv) = 256, heads
    limits = plan_limits(B, hq, hkv, h200(monkeypatch))
    tree = fork_trees(B)[name]
    args = [tree.node_indptr.numpy().astype(np.int64), tree.node_parent.numpy().astype(np.int64),
            tree.query_node.numpy().astype(np.int64)]
    kw = dict(group_size=hq // hkv, head_dim=128, kv_elem_bytes=2, num_kv_heads=hkv, num_sms=132)
    limited = build_schedule(*args, **kw, max_items=limits.max_items)
    free = build_schedule(*args, **kw)
    for a, b in zip(limited, free):
        np.testing.assert_array_equal(a, b)
    assert limited[-1] <= limits.max_partials


# --------------------------------------------------------------------------------------------------
# Plans written into the fixed buffers
# --------------------------------------------------------------------------------------------------
def qkv(tree, n_rows, hq=8, hkv=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    slots = int(tree.kv_indices.max()) + 1
    return (torch.randn(n_rows, hq, d, generator=g) * 3, torch.randn(slots, hkv, d, generator=g),
            torch.randn(slots, hkv, d, generator=g))


@needs_interpreter
def test_padding_queries_leave_the_real_plan_unchanged():
    tree = fork_trees(16)["nested"]
    q, k, v = qkv(tree, 24)
    q[16:] = 1e4  # padding rows hold whatever the previous replay left
    limits = PlanLimits(max_items=64, max_partials=256)
    plain = plan_tree_decode(tree, 8, 2, 32, "cpu", kv_dtype=torch.float32, capacity=limits.capacity(16, 20000))
    padded = plan_tree_decode(with_padding_queries(tree, 24), 8, 2, 32, "cpu", kv_dtype=torch.float32,
                              capacity=limits.capacity(24, 20000))
    eager = tree_decode(q[:16], k, v, plain, 0.2)
    graph = tree_decode(q, k, v, padded, 0.2)
    assert torch.equal(graph[:16], eager)
    assert torch.equal(graph[16:], torch.zeros_like(graph[16:]))


def test_padding_to_fewer_queries_is_refused():
    tree = make_tree([-1, 0, 0], [9, 4, 5], [1, 2, 2])
    assert with_padding_queries(tree, 3) is tree
    with pytest.raises(ValueError, match="cannot pad a tree of 3 queries to 2"):
        with_padding_queries(tree, 2)


@needs_interpreter
def test_a_tree_past_the_limits_is_refused_untouched_and_planned_eagerly():
    # A caterpillar: query i branches off a chain at depth i, so paths average B / 2 nodes.
    B = 12
    parent = [-1] + list(range(B - 1)) + list(range(B))
    tree = make_tree(parent, [20] * B + [2] * B, list(range(B, 2 * B)))
    limits = PlanLimits(max_items=40, max_partials=48)
    graph = tree_attention.new_graph_plan(limits, 16, 512, 8, 2, 32, torch.float32, torch.device("cpu"))
    before = [t.clone() for t in (graph.meta, graph.kv_indices)]
    assert plan_graph_step(graph, tree, 16, torch.float32) is None
    assert all(torch.equal(a, b) for a, b in zip(before, (graph.meta, graph.kv_indices)))

    eager = plan_step(tree, 8, 2, 32, torch.float32, torch.device("cpu"), limits)
    q, k, v = qkv(tree, B)
    torch.testing.assert_close(tree_decode(q, k, v, eager, 0.2), attention_reference(q, k, v, tree, 0.2),
                               atol=2e-5, rtol=0)


def test_window_limits_add_a_tile_and_a_partial_per_query():
    """The window plan's buffers budget one more item and partial per query than the full plan's (each query's
    private window node): without the partials, large window batches were refused by the buffers and ran eagerly."""
    assert tree_attention.window_plan_limits(PlanLimits(max_items=10, max_partials=20), 4) == PlanLimits(14, 24)


@needs_interpreter
def test_an_unlimited_plan_keeps_the_reason_and_the_graphs_merge_shape(monkeypatch, caplog):
    """A step past the limits says why it was refused, and plans its stage 2 against the captured batch sizes (as a
    graph of its size would), not against powers of two."""
    monkeypatch.setattr(tree_attention, "_warned_unlimited", set())
    planner = TreeDecodePlanner(2, 2, 32, kv_dtype=torch.float32, graph_batch_sizes=[1, 3, 8])
    B = 12
    tree = make_tree([-1] + list(range(B - 1)) + list(range(B)), [20] * B + [2] * B, list(range(B, 2 * B)))
    with caplog.at_level(logging.WARNING, logger=tree_attention.__name__):
        plan = plan_step(tree, 2, 2, 32, torch.float32, torch.device("cpu"), PlanLimits(2, 4), planner,
                         refused="the CUDA-graph plan buffers refused it")
    assert "(the CUDA-graph plan buffers refused it)" in caplog.text
    assert plan.few_merges_max_queries == 3
    plan_step(tree, 2, 2, 32, torch.float32, torch.device("cpu"), PlanLimits(2, 4), planner, refused="again")
    assert caplog.text.count("exceeds the") == 1  # once per kind of layers: not a line per step of a busy server


@needs_interpreter
def test_only_a_tree_past_the_limits_takes_the_unlimited_path(monkeypatch, caplog):
    """plan_step's fallback (a plan without limits) and its one warning are for trees past the limits only:
    a malformed call was caught as well, warned about as past the limits (spending the one warning), and
    plan_graph_step took it for a tree that does not fit."""
    monkeypatch.setattr(tree_attention, "_warned_unlimited", set())
    limits = PlanLimits(max_items=40, max_partials=48)
    graph = tree_attention.new_graph_plan(limits, 16, 512, 8, 2, 32, torch.float32, torch.device("cpu"))
    ok = make_tree([-1, 0], [9, 4], [1])
    bad = KVTree(ok.kv_indices.long(), ok.node_indptr, ok.node_parent, ok.query_node)
    with caplog.at_level(logging.WARNING, logger=tree_attention.__name__):
        for call in (lambda: plan_step(bad, 8, 2, 32, torch.float32, torch.device("cpu"), limits),
                     lambda: plan_graph_step(graph, bad, 2, torch.float32)):
            with pytest.raises(ValueError, match="kv_indices must be a 1-D int32 tensor"):
                call()
        assert "exceeds the plan limits" not in caplog.text
        B = 12  # the caterpillar above: past the limits
        tree = make_tree([-1] + list(range(B - 1)) + list(range(B)), [20] * B + [2] * B, list(range(B, 2 * B)))
        plan_step(tree, 8, 2, 32, torch.float32, torch.device("cpu"), limits, warn=False)  # a TP rank above 0
        assert "exceeds the plan limits" not in caplog.text and not tree_attention._warned_unlimited
        plan_step(tree, 8, 2, 32, torch.float32, torch.device("cpu"), limits)
        assert "a decode step of 12 rows exceeds the full layers' plan limits" in caplog.text


# --------------------------------------------------------------------------------------------------
# The backend through capture and replays
# --------------------------------------------------------------------------------------------------
def capture_graph(backend, bs, mode=ForwardMode.DECODE, spec_info=None):
    """What SGLang's CudaGraphRunner calls before capturing a graph of ``bs`` requests, with its buffers'
    initial values as the dummy inputs."""
    backend.init_forward_metadata_capture_cuda_graph(bs, bs, torch.zeros(bs, dtype=torch.int64),
                                                     torch.ones(bs, dtype=torch.int32), None, mode, spec_info)


class GraphEmulator:
    """What CudaGraphRunner does with the backend, minus the graph: per captured size the metadata
    its recorded launches read; per replay, the patched can_run's call and replay_prepare's."""

    def __init__(self, backend, kv_pool, max_bs=max(CAPTURE_BS)):
        self.backend, self.kv_pool = backend, kv_pool
        backend.init_cuda_graph_state(max_bs, max_bs)
        self.capture()

    def capture(self):
        """Largest size first, as SGLang captures; the dummy inputs are its buffers' initial values."""
        self.captured = {}
        for bs in reversed(CAPTURE_BS):
            capture_graph(self.backend, bs)
            self.captured[bs] = self.backend.forward_metadata

    def padded_size(self, batch_size):
        return CAPTURE_BS[bisect.bisect_left(CAPTURE_BS, batch_size)]

    def prepare(self, fb) -> int | None:
        bs = self.padded_size(len(fb.deft_reqs))
        if not self.backend.deft_prepare_graph_replay(fb, bs):
            return None
        self.backend.init_forward_metadata_replay_cuda_graph(bs, None, None, 0, None, ForwardMode.DECODE, None, None)
        return bs

    def forward(self, bs, fb, q, k, v, layer):
        """One layer as the replayed graph computes it: padded inputs, the captured metadata."""
        B = q.shape[0]
        pad = bs - B
        self.backend.forward_metadata = self.captured[bs]
        # Padding rows: SGLang zeroes their out_cache_loc (slot 0, never handed out); q, k and v hold
        # whatever the graph's buffers last had.
        loc = torch.cat([fb.out_cache_loc, torch.zeros(pad, dtype=torch.int64)])
        graph_fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, out_cache_loc=loc, token_to_kv_pool=self.kv_pool)
        junk = torch.full((pad, *q.shape[1:]), 1e4)
        return self.backend.forward_decode(torch.cat([q, junk]), torch.cat([k, junk[:, :k.shape[1]]]),
                                           torch.cat([v, junk[:, :v.shape[1]]]), layer, graph_fb)


def graph_setup(server_args, model_config, kv_slots=4096):
    layers = attention_layers(model_config)[:2]
    sim, kv_pool, backend = random_kv_setup(server_args, model_config, layers, kv_slots)
    return sim, layers, kv_pool, backend


def step_both_ways(sim, reqs, layers, kv_pool, backend, emulator):
    """One decode step replayed (if the tree fits the buffers) and eagerly; returns the padded size
    (None: the step ran eagerly only) after checking the two outputs are bitwise equal. The replay
    runs all layers first: eager steps plan into the same buffers (as in a server, where a step is
    either replayed or eager, never both)."""
    fb = decode_forward_batch(sim, reqs, kv_pool)
    bs = emulator.prepare(fb)
    B, layer0 = len(reqs), layers[0]
    hq, d = layer0.tp_q_head_num, layer0.head_dim
    inputs = step_inputs(B, layers)
    if bs is not None:
        replayed = [emulator.forward(bs, fb, q.view(B, hq, d), k, v, layer).view(bs, hq, d)
                    for layer, (q, k, v) in zip(layers, inputs)]
    for i, eager in enumerate(eager_step(sim, reqs, layers, kv_pool, backend, fb, inputs)):
        if bs is not None:
            assert torch.equal(replayed[i][:B], eager)
            assert torch.equal(replayed[i][B:], torch.zeros_like(replayed[i][B:]))
    sim.finish_decode(reqs)
    return bs


@needs_interpreter
def test_replays_match_eager_steps_bitwise(server_args, model_config):
    """Consecutive steps with new trees: tails grow, requests join and leave, batches smaller than
    the captured size (padded) and equal to it."""
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config)
    emulator = GraphEmulator(backend, kv_pool)
    for bs, meta in emulator.captured.items():  # every captured size reads the same fixed buffers
        assert meta.num_queries == bs and meta.plan.meta.data_ptr() == backend.graph_plan.meta.data_ptr()
        assert meta.plan.grid_queries == bs  # stage 2 over the graph's own rows (the buffers hold 8)
    prompt = sim.fresh(150)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.tokens(3 + i)) for i in range(3)])
    sizes = []
    for step in range(6):
        if step == 2:  # a nested fork joins: two requests sharing more than the prompt
            inner = prompt + sim.tokens(20)
            reqs += sim.prefill([sim.new_req(inner + sim.tokens(2)), sim.new_req(inner + sim.tokens(4))])
        if step == 4:  # one leaves; its tokens enter the radix tree
            sim.finish(reqs.pop(0))
        if step == 5:  # an unrelated request joins: 5 queries, padded to 8
            reqs += sim.prefill([sim.new_req(sim.fresh(30))])
        sizes.append(step_both_ways(sim, reqs, layers, kv_pool, backend, emulator))
    assert sizes == [4, 4, 8, 8, 4, 8]
    assert backend.planned_replay_size is None  # every plan was consumed by its replay


@needs_interpreter
def test_a_rerun_of_a_padded_eager_batch_replays_its_requests(server_args, model_config):
    """After a rank fault under elastic expert parallelism, ModelRunner.forward runs the same batch again; if it ran
    eagerly, SGLang had padded its seq_lens_cpu in place to the attention-TP size (prepare_mlp_sync_batch), and the
    rerun's can_run asked deft to plan that padded batch for a graph: the padding rows reached the step planner as
    requests' lengths (a numpy broadcast error out of can_run). They are padding there too."""
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config)
    emulator = GraphEmulator(backend, kv_pool)
    prompt = sim.fresh(40)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.tokens(2 + i)) for i in range(3)])
    fb = decode_forward_batch(sim, reqs, kv_pool)
    padded_fb = padded(fb, 1, backend.get_cuda_graph_seq_len_fill_value())
    backend.init_forward_metadata(padded_fb)  # the first, eager pass
    assert emulator.prepare(padded_fb) == 4  # the rerun, as a replay of the graph of 4
    B, hq, d = len(reqs), layers[0].tp_q_head_num, layers[0].head_dim
    inputs = step_inputs(B, layers)
    replayed = [emulator.forward(4, fb, q.view(B, hq, d), k, v, layer).view(4, hq, d)
                for layer, (q, k, v) in zip(layers, inputs)]
    for i, eager in enumerate(eager_step(sim, reqs, layers, kv_pool, backend, fb, inputs)):
        assert torch.equal(replayed[i][:B], eager)
        assert torch.equal(replayed[i][B:], torch.zeros_like(replayed[i][B:]))


@needs_interpreter
def test_coarser_chunks_are_the_same_in_eager_steps_and_replays(server_args, model_config, monkeypatch):
    """Limits tight enough that the planner coarsens chunks: replays and eager steps (both planned into the
    fixed buffers) agree bitwise, and plan_step, the path of an eager step the buffers do not take, coarsens
    the same tree the same way under the same limits (else a batch's merge order, and its last bits, would
    depend on which path planned it)."""
    # Chunks down to 64 tokens, so that this short prompt (the pool's rows hold 512) is split at all.
    monkeypatch.setattr(kernel_plan, "MIN_CHUNK_TOKENS", 64)
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config)
    backend.plan_limits = PlanLimits(max_items=4, max_partials=64)
    backend._make_plan_buffers(backend.max_bs)  # under these limits
    emulator = GraphEmulator(backend, kv_pool)
    prompt = sim.fresh(400)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.tokens(2 + i)) for i in range(3)])
    # The same step's tree, planned with and without the limit: the limit does change the chunks.
    fb = decode_forward_batch(sim, reqs, kv_pool)
    tree = backend.tree_builder.build(fb.deft_reqs, fb.seq_lens_cpu).tree
    args = [t.numpy().astype(np.int64) for t in (tree.node_indptr, tree.node_parent, tree.query_node)]
    kw = dict(group_size=4, head_dim=layers[0].head_dim, kv_elem_bytes=4, num_kv_heads=2, num_sms=8)
    assert len(build_schedule(*args, **kw, max_items=4)[1]) < len(build_schedule(*args, **kw)[1])
    sim.finish_decode(reqs)
    for _ in range(2):
        assert step_both_ways(sim, reqs, layers, kv_pool, backend, emulator) == 4
    fb = decode_forward_batch(sim, reqs, kv_pool)
    backend.init_forward_metadata(fb)
    buffered = backend.forward_metadata.plan
    tree = with_padding_queries(backend.tree_builder.build(fb.deft_reqs, fb.seq_lens_cpu).tree, len(reqs))
    own = plan_step(tree, backend.num_qo_heads, backend.num_kv_heads, backend.head_dim, backend.kv_dtype,
                    backend.device, backend.plan_limits, backend.planner)
    assert torch.equal(own.counts, buffered.counts)
    items, B = int(own.counts[0] + own.counts[1]), len(reqs)
    assert 1 < items <= 4  # coarsened to the limit, as in the steps above
    # The same chunks (lengths, query ranges, partial slots) reading the same KV slots; kv_start differs, as
    # the step planner lays out room for the tails to grow.
    assert torch.equal(own.items[:items, 1:], buffered.items[:items, 1:])
    for (start, length), (start_b, _) in zip(own.items[:items, :2].tolist(), buffered.items[:items, :2].tolist()):
        assert torch.equal(own.kv_indices[start:start + length], buffered.kv_indices[start_b:start_b + length])
    merges = int(own.merge_indptr[B])
    assert torch.equal(own.merge_indptr[:B + 1], buffered.merge_indptr[:B + 1])
    assert torch.equal(own.merge_slots[:merges], buffered.merge_slots[:merges])


def past_limits_setup(server_args, model_config, monkeypatch):
    """A backend whose plan limits a forked batch of 3 is past (a shared prompt and 3 tails: 4 items, 2
    allowed), that batch, and what the backend tries: the batch sizes the step planner is asked to plan and,
    for each plan the server's planner makes, whether it was made under the limits (``capacity=``)."""
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config)
    backend.plan_limits = PlanLimits(max_items=2, max_partials=64)
    backend._make_plan_buffers(backend.max_bs)
    tried, under_limits = [], []
    step_plan = backend.step_planner.plan
    monkeypatch.setattr(backend.step_planner, "plan", lambda *a: tried.append(len(a[0])) or step_plan(*a))
    planner_plan = backend.planner.plan
    monkeypatch.setattr(backend.planner, "plan", lambda *a, **kw: (under_limits.append("capacity" in kw)
                                                                   and None) or planner_plan(*a, **kw))
    prompt = sim.fresh(150)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.tokens(2 + i)) for i in range(3)])
    return sim, layers, kv_pool, backend, reqs, tried, under_limits


@needs_interpreter
def test_a_step_the_buffers_refused_runs_eagerly_without_trying_them_again(server_args, model_config, monkeypatch):
    """A step whose tree is past the plan limits: its graph plan is refused (the step planner builds and schedules
    it once), and the eager step SGLang then runs plans it on its own path, correctly, without building and
    scheduling it into the buffers a second time. A later batch still tries the buffers."""
    sim, layers, kv_pool, backend, reqs, tried, under_limits = past_limits_setup(server_args, model_config,
                                                                                 monkeypatch)
    emulator = GraphEmulator(backend, kv_pool)
    assert step_both_ways(sim, reqs, layers, kv_pool, backend, emulator) is None  # eager only, checked
    assert tried == [3]
    assert True not in under_limits  # nor under the same limits a third time, to be refused again
    one = sim.prefill([sim.new_req(sim.fresh(30))])  # one request, one item: fits
    assert step_both_ways(sim, one, layers, kv_pool, backend, emulator) == 1
    assert tried == [3, 1, 1]  # its replay, then its eager twin (step_both_ways runs both)


@needs_interpreter
def test_an_eager_step_the_step_planner_refused_is_not_scheduled_under_the_limits_again(
        server_args, model_config, monkeypatch):
    """Without CUDA graphs (no replay asked first), an eager step goes to the step planner, which refuses a tree
    only past the limits: the step is then planned without them, not scheduled under them a second time to be
    refused again (before, every step of such a batch was built twice and scheduled three times)."""
    sim, layers, kv_pool, backend, reqs, tried, under_limits = past_limits_setup(server_args, model_config,
                                                                                 monkeypatch)
    eager_step(sim, reqs, layers, kv_pool, backend, decode_forward_batch(sim, reqs, kv_pool),
               step_inputs(len(reqs), layers))  # checked against the reference
    assert tried == [3] and True not in under_limits


@needs_interpreter
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph_refused"])
def test_the_steps_of_a_batch_past_the_limits_build_its_tree_once_each(server_args, model_config, monkeypatch, graphs):
    """Each step of a batch past the plan limits was built (and scheduled) twice: by the step planner, to be refused,
    and on the eager step's own path. After its first step the step planner refuses it without a build, through the
    backend's invalidate() after each refusal, with and without a graph replay asked for first."""
    sim, layers, kv_pool, backend, reqs, tried, under_limits = past_limits_setup(server_args, model_config,
                                                                                 monkeypatch)
    builds = []
    build = backend.tree_builder.build
    monkeypatch.setattr(backend.tree_builder, "build", lambda *a, **kw: builds.append(1) or build(*a, **kw))
    emulator = GraphEmulator(backend, kv_pool)
    per_step = []
    for _ in range(4):
        before = len(builds)
        if graphs:
            assert step_both_ways(sim, reqs, layers, kv_pool, backend, emulator) is None  # eager only, checked
        else:
            eager_step(sim, reqs, layers, kv_pool, backend, decode_forward_batch(sim, reqs, kv_pool),
                       step_inputs(len(reqs), layers))  # checked against the reference
        sim.finish_decode(reqs)
        per_step.append(len(builds) - before)
    assert per_step == [2, 1, 1, 1], per_step


@needs_interpreter
def test_a_batch_past_the_buffers_is_planned_without_limits_or_a_warning(server_args, model_config, monkeypatch,
                                                                       caplog):
    """9 requests where graphs and buffers hold 8: no graph replays it, so it keeps no graph's chunking. Under limits
    sized for 8 such ordinary batches were warned about as trees past the plan limits (with --max-running-requests
    above --cuda-graph-max-bs, the first of them spent the one warning)."""
    monkeypatch.setattr(tree_attention, "_warned_unlimited", set())
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config)
    backend.plan_limits = PlanLimits(max_items=2, max_partials=64)  # a batch of 9 forks is past these
    prompt = sim.fresh(40)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.tokens(2 + i)) for i in range(9)])
    with caplog.at_level(logging.WARNING, logger=tree_attention.__name__):
        eager_step(sim, reqs, layers, kv_pool, backend, decode_forward_batch(sim, reqs, kv_pool),
                   step_inputs(len(reqs), layers))  # checked against the reference
    assert "exceeds" not in caplog.text


@needs_interpreter
def test_a_replay_drops_the_last_eager_steps_plan(server_args, model_config):
    """A step past the buffers (9 requests, graphs up to 8) runs eagerly with a plan of its own; the replays
    that follow never read forward_metadata, and holding that plan would keep its buffers allocated for as
    long as graphs replay."""
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config)
    emulator = GraphEmulator(backend, kv_pool)
    prompt = sim.fresh(40)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.tokens(2 + i)) for i in range(9)])
    backend.init_forward_metadata(decode_forward_batch(sim, reqs, kv_pool))  # can_run refuses 9 before asking deft
    sim.finish_decode(reqs)
    own = backend.forward_metadata.plan
    assert own.meta.data_ptr() != backend.graph_plan.meta.data_ptr()
    sim.finish(reqs[8])
    assert emulator.prepare(decode_forward_batch(sim, reqs[:8], kv_pool)) == 8
    assert backend.forward_metadata is None


@needs_interpreter
def test_stage2_shape_is_the_graphs_in_eager_steps(server_args, model_config, monkeypatch):
    """On 48 SMs the 8 heads' merges fit one per SM for up to 6 queries, which is no captured size: a
    batch of 5 replays in the graph of 8. The threshold for stage 2's shape for few merges is therefore 4,
    and eager steps of 3 and 5 queries merge as their graphs of 4 and 8 do, bitwise. (With the threshold
    at 6, the step of 5 took the wide shape eagerly and the narrow one in its graph, and differed.)"""
    monkeypatch.setattr(kernel_plan, "sm_count", lambda device: 48)
    monkeypatch.setattr(kernel_plan, "MIN_CHUNK_TOKENS", 16)  # more partials per query than one load takes
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config)
    emulator = GraphEmulator(backend, kv_pool)
    assert {bs: stage2_shape(meta.plan) for bs, meta in emulator.captured.items()} == {
        8: STAGE2_SHAPE, 4: STAGE2_SHAPE_FEW_MERGES, 2: STAGE2_SHAPE_FEW_MERGES, 1: STAGE2_SHAPE_FEW_MERGES}
    prompt = sim.fresh(400)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.tokens(2 + i)) for i in range(3)])
    for count, graph_size, shape in ((3, 4, STAGE2_SHAPE_FEW_MERGES), (5, 8, STAGE2_SHAPE)):
        if count > len(reqs):
            reqs += sim.prefill([sim.new_req(prompt + sim.tokens(9 + i)) for i in range(count - len(reqs))])
        assert step_both_ways(sim, reqs, layers, kv_pool, backend, emulator) == graph_size
        eager = backend.forward_metadata.plan
        assert eager.grid_queries == count and stage2_shape(eager) == shape
        assert int(eager.merge_indptr[:count + 1].diff().max()) > STAGE2_SHAPE[0]


@pytest.mark.parametrize("sms", [132, 114, 108, 78, 8])
@pytest.mark.parametrize("heads", [8, 12, 20, 28, 32, 40, 64])
@pytest.mark.parametrize("sizes", ["sglang", "powers_of_two", "odd", "every"])
def test_few_merges_threshold_is_a_captured_size(sms, heads, sizes):
    """For every batch up to the largest graph, the batch and the graph size it is padded to fall on the
    same side of the threshold, and the threshold is the largest such size with one merge per SM."""
    capture = {"sglang": [1, 2, 4, 8, 12, *range(16, 257, 8)], "powers_of_two": None, "odd": [1, 3, 5, 7, 9, 33],
               "every": list(range(1, 65))}[sizes]
    graph = tree_attention.graph_batch_sizes(capture, 4096)
    threshold = few_merges_max_queries(sms, heads, graph)
    graph = graph or [1 << i for i in range(9)]
    assert threshold == max((size for size in graph if size * heads <= sms), default=0)
    for batch in range(1, graph[-1] + 1):
        padded = graph[bisect.bisect_left(graph, batch)]
        assert (batch <= threshold) == (padded <= threshold)


def test_a_step_in_graph_buffers_keeps_their_threshold():
    """The threshold is the graph buffers': a step written into them by a planner without the graph
    sizes (powers of two by default: 4 on the CPU's 8 "SMs" at 2 heads) keeps the captured 3, through
    plan_graph_step and through plan_tree_decode's reuse= alike."""
    cpu = torch.device("cpu")
    graph = tree_attention.new_graph_plan(plan_limits(8, 2, 2, cpu), 8, 512, 2, 2, 32, torch.float32, cpu,
                                          graph_batch_sizes=[1, 3, 8])
    assert graph.few_merges_max_queries == 3 and few_merges_max_queries(8, 2) == 4
    tree = make_tree([-1, 0, 0], [9, 4, 5], [1, 2, 2])
    step = plan_graph_step(graph, tree, 3, torch.float32)
    assert step.grid_queries == 3 and step.few_merges_max_queries == 3
    assert plan_tree_decode(tree, 2, 2, 32, cpu, kv_dtype=torch.float32, reuse=graph).few_merges_max_queries == 3


def test_graph_batch_sizes_as_sglang_captures_them():
    assert tree_attention.graph_batch_sizes(None, 64) is None
    assert tree_attention.graph_batch_sizes([1, 2, 4, 8, 12, 16], 10) == [1, 2, 4, 8, 10]
    assert tree_attention.graph_batch_sizes([1, 2, 4, 8, 12, 16], 64) == [1, 2, 4, 8, 12, 16]
    assert tree_attention.graph_batch_sizes([1, 2, 4, 6, 8], 5, multiple=2) == [2, 4, 6]
    assert tree_attention.graph_batch_sizes([1, 2, 4, 8], 7) == [1, 2, 4, 7]  # the largest one past the pool


@needs_interpreter
def test_step_past_the_buffers_runs_eagerly(server_args, model_config):
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config)
    backend.plan_limits = PlanLimits(max_items=64, max_partials=6)  # 6 partials: fewer than 2 paths of 4
    backend._make_plan_buffers(backend.max_bs)  # under these limits
    emulator = GraphEmulator(backend, kv_pool)
    prompt = sim.fresh(40)
    sim.run_to_cache(prompt)
    inner = prompt + sim.tokens(9)
    reqs = sim.prefill([sim.new_req(inner + sim.tokens(3)), sim.new_req(inner + sim.tokens(5)),
                        sim.new_req(prompt + sim.tokens(7))])
    meta_before = backend.graph_plan.meta.clone()
    assert step_both_ways(sim, reqs, layers, kv_pool, backend, emulator) is None
    assert torch.equal(backend.graph_plan.meta, meta_before)
    assert backend.planned_replay_size is None
    # the refused tree's KV slots went into the buffers before the plan was refused: they hold no step to run
    assert backend.graph_plan.buffered_queries is None


@cpu_only
def test_replay_without_a_plan_for_it_is_refused(server_args, model_config):
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config, kv_slots=256)
    emulator = GraphEmulator(backend, kv_pool)
    with pytest.raises(RuntimeError, match="batch size 4.*hold no step"):
        backend.init_forward_metadata_replay_cuda_graph(4, None, None, 0, None, ForwardMode.DECODE, None, None)
    reqs = sim.prefill([sim.new_req(sim.fresh(10)) for _ in range(3)])
    fb = decode_forward_batch(sim, reqs, kv_pool)
    assert backend.deft_prepare_graph_replay(fb, 4)
    with pytest.raises(RuntimeError, match="batch size 8.*padded to 4"):
        backend.init_forward_metadata_replay_cuda_graph(8, None, None, 0, None, ForwardMode.DECODE, None, None)
    # A recapture between the plan and its replay overwrites the buffers: the replay must not run.
    assert backend.deft_prepare_graph_replay(fb, 4)
    emulator.capture()
    with pytest.raises(RuntimeError, match="hold no step"):
        backend.init_forward_metadata_replay_cuda_graph(4, None, None, 0, None, ForwardMode.DECODE, None, None)


@cpu_only
def test_fill_value_and_one_token_per_request(server_args, model_config):
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config, kv_slots=256)
    assert backend.get_cuda_graph_seq_len_fill_value() == 1
    with pytest.raises(RuntimeError, match="one token per request"):
        backend.init_cuda_graph_state(8, 32)


# --------------------------------------------------------------------------------------------------
# The patch
# --------------------------------------------------------------------------------------------------
def fake_graph_runner(attn_backend, max_bs=8):
    """The fields CudaGraphRunner.can_run (0.5.10.post1) reads, for a plain decode server."""
    return SimpleNamespace(
        require_mlp_tp_gather=False, enable_pdmux=False, disable_padding=False, graphs={}, max_bs=max_bs,
        capture_bs=[b for b in CAPTURE_BS if b <= max_bs], require_mlp_sync=False, is_encoder_decoder=False,
        capture_hidden_mode=CaptureHiddenMode.NULL, enable_two_batch_overlap=False, num_tokens_per_bs=1,
        model_runner=SimpleNamespace(spec_algorithm=SpeculativeAlgorithm.NONE, attn_backend=attn_backend),
    )


def decode_batch(batch_size):
    return SimpleNamespace(batch_size=batch_size, forward_mode=ForwardMode.DECODE,
                           capture_hidden_mode=CaptureHiddenMode.NULL, spec_info=None)


def test_patched_can_run_asks_the_decode_backend():
    from sglang.srt.model_executor.cuda_graph_runner import CudaGraphRunner

    cuda_graph_replay.apply()
    cuda_graph_replay.apply()  # idempotent
    calls = []

    class Deft:
        def deft_prepare_graph_replay(self, forward_batch, padded_bs):
            calls.append((forward_batch.batch_size, padded_bs))
            return forward_batch.batch_size != 2

    hybrid = SimpleNamespace(decode_backend=Deft(), prefill_backend=object())
    runner = fake_graph_runner(hybrid)
    assert [CudaGraphRunner.can_run(runner, decode_batch(n)) for n in (1, 2, 3, 5, 8, 9)] == \
        [True, False, True, True, True, False]
    assert calls == [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8)]  # 9 > max_bs: SGLang says no, deft is not asked
    assert CudaGraphRunner.can_run(fake_graph_runner(Deft()), decode_batch(3))  # deft as the only backend
    assert CudaGraphRunner.can_run(fake_graph_runner(object()), decode_batch(3))  # another backend: not asked
    assert hasattr(DeftAttnBackend, cuda_graph_replay.HOOK)


@pytest.mark.parametrize("patch", [cuda_graph_replay, forward_batch_reqs, warmup_dummy_run],
                         ids=lambda m: m.__name__.rsplit(".", 1)[1])
@pytest.mark.parametrize("installed", ["0.5.11", "0.5.10", "0.5.10.post2"])
def test_patch_refuses_another_sglang_version(monkeypatch, patch, installed):
    monkeypatch.setattr(sglang_version, "version", lambda name: installed)
    name = patch.__name__.rsplit(".", 1)[1]
    with pytest.raises(sglang_version.UnsupportedSGLangVersion, match=f"{name}.*0.5.10.post1.*SGLang {installed} is"):
        patch.apply()


@pytest.mark.parametrize("patch", [cuda_graph_replay, forward_batch_reqs, warmup_dummy_run],
                         ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_patch_refuses_a_modified_sglang_of_the_same_release(monkeypatch, patch):
    """The version string names the release; a modified copy of it (a local fix, a backport) is told by the source of
    what the patch wraps or relies on. A patch applied again checks SGLang's function under its own wrapper."""
    import inspect

    name = patch.__name__.rsplit(".", 1)[1]
    patch.apply()
    patch.apply()  # the installed release, unmodified, with the patch already in place
    real = inspect.getsource
    monkeypatch.setattr(inspect, "getsource", lambda function: real(function) + "    # a local fix\n")
    with pytest.raises(sglang_version.UnsupportedSGLangVersion,
                       match=rf"{name}` relies on SGLang 0.5.10.post1's sglang\.srt\.model_executor\..* but the one "
                             r"installed here \(.*\.py\) differs from that release's"):
        patch.apply()

    def unreadable(function):
        raise OSError("could not get source code")

    monkeypatch.setattr(inspect, "getsource", unreadable)
    with pytest.raises(sglang_version.UnsupportedSGLangVersion, match=f"{name}` relies on .* whose source cannot be "
                                                                      "read here .could not get source code."):
        patch.apply()


def test_a_replacement_made_with_functools_wraps_is_checked_as_what_runs(monkeypatch):
    """The source check followed every __wrapped__: another plugin's replacement made with functools.wraps was looked
    through to SGLang's source underneath, passed, and the patch then wrapped code it had never checked. It follows
    deft's own wrappers only."""
    import functools
    import inspect

    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    forward_batch_reqs.apply()
    installed = inspect.getattr_static(ForwardBatch, "init_new").__func__  # deft's wrapper: checked through
    sglang_version.require_source("forward_batch_reqs", ForwardBatch, "init_new", forward_batch_reqs.SOURCE_SHA256)

    @functools.wraps(installed)
    def replaced(*args, **kwargs):
        return installed(*args, **kwargs)

    monkeypatch.setattr(ForwardBatch, "init_new", classmethod(replaced))
    with pytest.raises(sglang_version.UnsupportedSGLangVersion, match="differs from that release's"):
        sglang_version.require_source("forward_batch_reqs", ForwardBatch, "init_new", forward_batch_reqs.SOURCE_SHA256)


def graphs_and_eager(graphs, server_args, model_config, layers, sim, kv_pool):
    """Beside ``graphs`` (a backend whose steps SGLang replays from CUDA graphs: the emulator), a backend of
    another server over the same requests and KV pool that runs every step eagerly (--disable-cuda-graph); both
    with room for 3 steady steps (it runs out within a test); the lists of their steady-step flags."""
    eager = make_backend(sim, server_args, model_config, layers, kv_pool)
    emulator = GraphEmulator(graphs, kv_pool)
    eager._make_plan_buffers(eager.max_bs)  # what __init__ does where the Triton kernels run
    graphs.step_planner.slack = eager.step_planner.slack = 3
    return eager, emulator, (record_steady(graphs), record_steady(eager))


def four_branches(sim):
    """Four requests forked from a cached 150-token prompt, with 3-6 tokens of their own."""
    prompt = sim.fresh(150)
    sim.run_to_cache(prompt)
    return sim.prefill([sim.new_req(prompt + sim.tokens(3 + i)) for i in range(4)])


@needs_interpreter
def test_steady_steps_replayed_and_eager_agree_bitwise(server_args, model_config):
    """Two backends over the same steps, as two servers: one replays every step from its graphs, the
    other runs every step eagerly (--disable-cuda-graph). Both take the same steady steps (plan
    updated in place on the device), and their outputs are bitwise equal and per-request exact."""
    sim, layers, kv_pool, graphs = graph_setup(server_args, model_config)
    eager, emulator, logs = graphs_and_eager(graphs, server_args, model_config, layers, sim, kv_pool)
    reqs = four_branches(sim)
    layer0 = layers[0]
    hq, hkv, d = layer0.tp_q_head_num, layer0.tp_k_head_num, layer0.head_dim
    for step in range(9):
        if step == 5:  # an unrelated request joins: 5 queries, padded to 8 in the graphs
            reqs += sim.prefill([sim.new_req(sim.fresh(30))])
        fb = decode_forward_batch(sim, reqs, kv_pool)
        B = len(reqs)
        bs = emulator.prepare(fb)
        assert bs is not None
        eager.init_forward_metadata(fb)
        for layer in layers:
            q, k, v = torch.randn(B, hq * d) * 3, torch.randn(B, hkv, d), torch.randn(B, hkv, d)
            replayed = emulator.forward(bs, fb, q.view(B, hq, d), k, v, layer).view(bs, hq, d)
            out = eager.forward(q, k, v, layer, fb).view(B, hq, d)
            assert torch.equal(replayed[:B], out)
            expected = per_request_reference(q.view(B, hq, d), kv_pool.get_key_buffer(layer.layer_id),
                                             kv_pool.get_value_buffer(layer.layer_id), sim, reqs, fb.seq_lens_cpu,
                                             layer)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        sim.finish_decode(reqs)
    assert logs[0] == logs[1] == [False, False, True, True, True, False, False, True, True]


@needs_interpreter
def test_a_requests_bits_depend_on_its_batch_not_on_graphs(server_args, model_config):
    """Why comparing whole servers bitwise (test_cuda_graph_gpu) needs both to form the same batches.
    One request, same q and KV: decoded alone, its path is one tree node (one partial result); next to
    a request sharing its prompt, it is the prompt's partial merged with its own tail's. Both are exact
    attention, equal to rounding but not bitwise. A graph replay and an eager step of one batch are
    bitwise equal."""
    sim, layers, kv_pool, graphs = graph_setup(server_args, model_config)
    eager = make_backend(sim, server_args, model_config, layers, kv_pool)
    emulator = GraphEmulator(graphs, kv_pool)
    prompt = sim.fresh(150)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.tokens(3)), sim.new_req(prompt + sim.tokens(4))])
    pair = decode_forward_batch(sim, reqs, kv_pool)
    alone = ForwardBatchStub(**{**vars(pair), "deft_reqs": reqs[:1], "seq_lens_cpu": pair.seq_lens_cpu[:1],
                               "seq_lens": pair.seq_lens[:1], "req_pool_indices": pair.req_pool_indices[:1],
                               "out_cache_loc": pair.out_cache_loc[:1]})
    layer = layers[0]
    hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
    q, k, v = torch.randn(2, hq * d) * 3, torch.randn(2, hkv, d), torch.randn(2, hkv, d)
    eager.init_forward_metadata(alone)
    out_alone = eager.forward(q[:1], k[:1], v[:1], layer, alone).view(1, hq, d)
    bs = emulator.prepare(pair)
    replayed = emulator.forward(bs, pair, q.view(2, hq, d), k, v, layer).view(bs, hq, d)
    eager.init_forward_metadata(pair)
    out_pair = eager.forward(q, k, v, layer, pair).view(2, hq, d)
    assert torch.equal(replayed[:2], out_pair)  # the same batch: graphs or not, the same bits
    torch.testing.assert_close(out_alone[0], out_pair[0], rtol=1e-5, atol=1e-5)
    assert not torch.equal(out_alone[0], out_pair[0])  # another batch: other (exact) bits


def test_plan_trace_fingerprints_what_the_kernels_read(caplog):
    """SGLANG_DEFT_TRACE_PLANS's line: equal for equal plans written into other buffers, different when
    one KV slot an item reads changes, blind to buffer entries no item reads."""
    from sglang_deft.kernels import KVTree
    from sglang_deft.kernels.plan import PlanCapacity

    def traced(kv: torch.Tensor, unread: int = 0) -> str:
        tree = KVTree(kv, torch.tensor([0, 6, 8, 10], dtype=torch.int32), torch.tensor([-1, 0, 0], dtype=torch.int32),
                      torch.tensor([1, 2], dtype=torch.int32))
        plan = plan_tree_decode(tree, 8, 2, 64, capacity=PlanCapacity(4, 64, 32, 64, 64))
        plan.kv_indices[10:].fill_(unread)  # past every item's range
        caplog.clear()
        with caplog.at_level("INFO", logger="sglang_deft.backend"):
            DeftAttnBackend._trace_plan("eager", False, torch.tensor([7, 8]), plan)
        (line,) = [r.getMessage() for r in caplog.records if "deft trace" in r.getMessage()]
        return line

    kv = torch.arange(10, dtype=torch.int32)
    first = traced(kv)
    assert "queries=2 steady=0 seq_lens=[7, 8]" in first and "window" not in first
    assert traced(kv.clone(), unread=99) == first
    other = kv.clone()
    other[7] = 42
    assert traced(other).split(" kv=")[0] == first.split(" kv=")[0] and traced(other) != first
    # With a sliding-window plan in its buffers, its fingerprint follows: the window plan's own, not the full plan's
    def plain_plan(kv):
        return plan_tree_decode(KVTree(kv, torch.tensor([0, 6, 8, 10], dtype=torch.int32),
                                       torch.tensor([-1, 0, 0], dtype=torch.int32),
                                       torch.tensor([1, 2], dtype=torch.int32)), 8, 2, 64)

    plan, window_plan = plain_plan(kv), plain_plan(other)
    alone = {}
    for name, one in (("plan", plan), ("window", window_plan)):
        caplog.clear()
        with caplog.at_level("INFO", logger="sglang_deft.backend"):
            DeftAttnBackend._trace_plan("graph", True, torch.tensor([7, 8]), one)
        alone[name] = caplog.records[-1].getMessage().split("seq_lens=[7, 8] ")[1]
    assert alone["plan"] != alone["window"]
    for steady in (True, False):
        caplog.clear()
        with caplog.at_level("INFO", logger="sglang_deft.backend"):
            DeftAttnBackend._trace_plan("graph", True, torch.tensor([7, 8]), plan, window_plan, window_steady=steady)
        full, window = caplog.records[-1].getMessage().split(f" window_in_place={int(steady)} window_")
        assert full.endswith(alone["plan"]) and window == alone["window"]


@needs_interpreter
@pytest.mark.parametrize("batch", [7, 8, 9])
def test_eager_steps_up_to_max_bs_use_the_plan_buffers_and_steady_steps(server_args, model_config, batch):
    """--cuda-graph-max-bs requests (8 here) fit the plan buffers: their eager steps go through the step
    planner (steady steps included), as their graph replays would; one request more gets a plan of its own."""
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config)
    log = record_steady(backend)
    prompt = sim.fresh(60)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.tokens(2 + i)) for i in range(batch)])
    in_buffers = []
    for _ in range(3):
        backend.init_forward_metadata(decode_forward_batch(sim, reqs, kv_pool))
        in_buffers.append(backend.forward_metadata.plan.meta.data_ptr() == backend.graph_plan.meta.data_ptr())
        sim.finish_decode(reqs)
    fits = batch <= server_args.cuda_graph_max_bs
    assert in_buffers == [fits] * 3
    assert log == ([False, False, True] if fits else [])
    assert backend.sharing.total_steps == 3 and backend.sharing.steady == log.count(True)  # the meter's steady_steps


@needs_interpreter
def test_every_eager_step_is_traced_and_its_host_time_leaves_the_trace_out(server_args, model_config, caplog,
                                                                          monkeypatch):
    """SGLANG_DEFT_TRACE_PLANS traced only the steps in the plan buffers: a batch past them (planned in buffers of its
    own) left a gap where two servers' traces are compared step for step. And the trace's device wait was counted
    in the step's plan_host_us."""
    import sglang_deft.backend as backend_module

    monkeypatch.setattr(backend_module, "TRACE_PLANS", True)
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config)
    prompt = sim.fresh(60)
    sim.run_to_cache(prompt)
    traced, host_s, record = [], [], backend.sharing.record
    monkeypatch.setattr(backend_module, "_fingerprint", lambda plan: (traced.append(plan), time.sleep(1.0))[0] or "fp")
    monkeypatch.setattr(backend.sharing, "record", lambda *a: (host_s.append(a[2]), record(*a)))
    for batch in (3, server_args.cuda_graph_max_bs + 1):
        reqs = sim.prefill([sim.new_req(prompt + sim.tokens(2 + i)) for i in range(batch)])
        with caplog.at_level("INFO", logger="sglang_deft.backend"):
            backend.init_forward_metadata(decode_forward_batch(sim, reqs, kv_pool))
        assert traced[-1] is backend.forward_metadata.plan
        sim.finish_decode(reqs)
    # and a step planned for a graph replay
    emulator = GraphEmulator(backend, kv_pool)
    reqs = sim.prefill([sim.new_req(prompt + sim.tokens(2 + i)) for i in range(3)])
    with caplog.at_level("INFO", logger="sglang_deft.backend"):
        assert emulator.prepare(decode_forward_batch(sim, reqs, kv_pool)) is not None
    assert traced[-1] is backend.graph_plan
    lines = [r.getMessage() for r in caplog.records if "deft trace" in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == ["deft trace eager", "deft trace own", "deft trace graph"], lines
    assert "queries=9 steady=0" in lines[1]
    assert len(host_s) == 3 and max(host_s) < 1.0  # each step waited a second in its trace


@needs_interpreter
def test_a_capture_after_steady_steps_makes_the_next_step_a_full_plan(server_args, model_config):
    """Capture writes padding-only plans into the buffers: a step right after it must not update the
    overwritten plan in place as if it were the last step's."""
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config)
    emulator = GraphEmulator(backend, kv_pool)
    log = record_steady(backend)
    prompt = sim.fresh(60)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.tokens(2 + i)) for i in range(3)])
    for step in range(4):
        if step == 3:
            emulator.capture()
        backend.init_forward_metadata(decode_forward_batch(sim, reqs, kv_pool))
        sim.finish_decode(reqs)
    assert log == [False, False, True, False]


def test_graph_state_on_the_reference_path_is_refused(server_args, model_config, monkeypatch):
    """The reference path has no plan buffers: making them for a graph would switch its eager steps to the kernels
    while the log said the reference decodes (config_checks refuses the pair first; this keeps it refused)."""
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config)
    backend.kernels = False  # as a backend set up on the reference path chose (the choice is made once, at setup)
    with pytest.raises(RuntimeError, match="CUDA graphs with decode attention by the PyTorch reference"):
        backend.init_cuda_graph_state(16, 16)


@cpu_only
def test_graph_state_for_more_requests_than_the_buffers_remakes_them(server_args, model_config):
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config, kv_slots=256)
    assert backend.graph_plan.qperm.numel() == server_args.cuda_graph_max_bs == 8
    backend.init_cuda_graph_state(16, 16)
    assert backend.graph_plan.qperm.numel() == 16 and backend.step_planner.buffers is backend.graph_plan
    capture_graph(backend, 16)
    assert backend.forward_metadata.num_queries == 16


# --------------------------------------------------------------------------------------------------
# The graph hooks' contracts
# --------------------------------------------------------------------------------------------------
@cpu_only
@pytest.mark.parametrize("max_bs, max_num_tokens", [(8, 4), (8, 16), (4, 8)])
def test_graph_state_for_other_than_one_token_per_request_is_refused_before_any_buffer_is_made(
        server_args, model_config, max_bs, max_num_tokens):
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config, kv_slots=256)
    buffers = backend.graph_plan
    with pytest.raises(RuntimeError, match=f"CUDA graphs of {max_num_tokens} tokens for {max_bs} requests"):
        backend.init_cuda_graph_state(max_bs, max_num_tokens)
    assert backend.graph_plan is buffers


@cpu_only
def test_graph_state_for_the_buffers_own_size_keeps_them_and_fewer_requests_remakes_them(server_args, model_config):
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config, kv_slots=256)
    buffers, planner = backend.graph_plan, backend.step_planner
    # SGLang's max_bs is --cuda-graph-max-bs here: the buffers made with the backend (before any capture) stay.
    backend.init_cuda_graph_state(8, 8)
    assert backend.graph_plan is buffers and backend.step_planner is planner
    # Graphs of at most 4 requests (a small request pool): buffers of their size, eager steps alike.
    backend.init_cuda_graph_state(4, 4)
    assert backend.graph_plan.qperm.numel() == 4 and backend.step_planner.buffers is backend.graph_plan
    assert backend.graph_plan.kv_indices.numel() == kv_pool.size  # the pool's slots bound a tree's tokens


@cpu_only
@pytest.mark.parametrize("mode, spec_info", [(ForwardMode.EXTEND, None), (ForwardMode.TARGET_VERIFY, None),
                                             (ForwardMode.IDLE, None), (ForwardMode.DECODE, SimpleNamespace())],
                         ids=["extend", "target_verify", "idle", "decode_with_spec_info"])
def test_capture_of_anything_but_a_plain_decode_batch_is_refused(server_args, model_config, mode, spec_info):
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config, kv_slots=256)
    meta = backend.graph_plan.meta.clone()
    batch = f"a {mode.name} batch" + (r" with spec_info \(speculative decoding\)" if spec_info else "")
    with pytest.raises(RuntimeError, match=f"capture of {batch}; deft captures plain decode only"):
        capture_graph(backend, 4, mode, spec_info)
    assert backend.forward_metadata is None and torch.equal(backend.graph_plan.meta, meta)


@cpu_only
def test_capture_of_a_batch_size_past_the_buffers_is_refused(server_args, model_config):
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config, kv_slots=256)
    with pytest.raises(RuntimeError, match="CUDA graph of batch size 9, past the plan buffers' 8 requests"):
        capture_graph(backend, 9)
    assert backend.forward_metadata is None
    capture_graph(backend, 8)
    assert backend.forward_metadata.num_queries == 8


@cpu_only
def test_a_replay_asked_for_a_batch_that_is_not_decode_declines_and_plans_nothing(server_args, model_config):
    """deft plans decode batches only: any other batch SGLang would replay runs eagerly instead, and
    nothing is planned into the buffers or counted for it."""
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config, kv_slots=256)
    meta = backend.graph_plan.meta.clone()
    idle = SimpleNamespace(forward_mode=ForwardMode.IDLE, deft_reqs=[], seq_lens_cpu=torch.zeros(0, dtype=torch.int64))
    assert backend.deft_prepare_graph_replay(idle, 1) is False
    assert backend.planned_replay_size is None and backend.sharing.total_steps == 0
    assert torch.equal(backend.graph_plan.meta, meta)


@needs_interpreter
def test_a_batch_of_exactly_max_bs_replays_unpadded_in_the_largest_graph(server_args, model_config):
    sim, layers, kv_pool, backend = graph_setup(server_args, model_config)
    emulator = GraphEmulator(backend, kv_pool)
    prompt = sim.fresh(40)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.tokens(2 + i)) for i in range(server_args.cuda_graph_max_bs)])
    assert step_both_ways(sim, reqs, layers, kv_pool, backend, emulator) == 8  # bitwise as its eager step
    assert backend.forward_metadata.plan.meta.data_ptr() == backend.graph_plan.meta.data_ptr()


@needs_interpreter
def test_replays_are_metered_and_logged_as_the_eager_steps_they_stand_for(server_args, model_config, caplog):
    """A server's sharing line must not depend on CUDA graphs: each replayed step is counted once, with
    the KV tokens its requests attend, the tokens of its tree and its steady flag, as the eager step of
    a --disable-cuda-graph server over the same batches counts it."""
    sim, layers, kv_pool, graphs = graph_setup(server_args, model_config)
    eager = make_backend(sim, server_args, model_config, layers, kv_pool)
    emulator = GraphEmulator(graphs, kv_pool)
    graphs.step_planner.slack = eager.step_planner.slack = 2
    recorded = {}
    for name, backend in (("graphs", graphs), ("eager", eager)):
        backend.sharing.interval = 3
        record, recorded[name] = backend.sharing.record, []

        def counted(attended, unique, host_s, steady, window, record=record, log=recorded[name]):
            log.append((attended, unique, steady))
            record(attended, unique, host_s, steady, window)

        backend.sharing.record = counted
    prompt = sim.fresh(60)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.tokens(2 + i)) for i in range(3)])
    expected = []
    with caplog.at_level("INFO", logger="sglang_deft.sharing_metrics"):
        for step in range(6):
            if step == 4:  # a request joins: a full plan, and the graph of 4
                reqs += sim.prefill([sim.new_req(sim.fresh(20))])
            fb = decode_forward_batch(sim, reqs, kv_pool)
            rows = [sim.req_to_token[r.req_pool_idx, :n] for r, n in zip(reqs, fb.seq_lens_cpu.tolist())]
            expected.append((int(fb.seq_lens_cpu.sum()), len(set(torch.cat(rows).tolist()))))
            assert emulator.prepare(fb) == 4
            eager.init_forward_metadata(fb)
            sim.finish_decode(reqs)
    assert recorded["graphs"] == recorded["eager"]
    assert [r[:2] for r in recorded["graphs"]] == expected
    assert [r[2] for r in recorded["graphs"]] == [False, False, True, True, False, False]
    lines = [{k: v for k, v in row.items() if k != "plan_host_us"} for row in parse_sharing_lines(caplog.text)]
    assert len(lines) == 4 and lines[0::2] == lines[1::2]  # each window: the graphs' line, then the eager one
    assert [line["steady_steps"] for line in lines[0::2]] == [1, 1]


@cpu_only
def test_the_plan_buffers_take_stage2s_threshold_from_the_servers_graph_sizes(server_args, model_config, monkeypatch):
    """On 48 SMs at 8 heads one merge per SM fits 6 queries: with graphs of 1, 3 and 8 requests the
    threshold is 3, not the 4 of the default powers of two (a batch of 4 replays in the graph of 8)."""
    monkeypatch.setattr(kernel_plan, "sm_count", lambda device: 48)
    args = copy.copy(server_args)
    args.cuda_graph_bs = [1, 3, 8]
    sim, layers, kv_pool, backend = graph_setup(args, model_config, kv_slots=256)
    assert backend.graph_plan.few_merges_max_queries == 3


@needs_interpreter
@pytest.mark.parametrize("refused_steps", [(), tuple(range(8)), (5,)],
                         ids=["windows_fit", "windows_refused", "windows_refused_once"])
def test_sliding_window_replays_and_eager_steps_agree_bitwise(server_args, model_config, monkeypatch, refused_steps):
    """test_steady_steps_replayed_and_eager_agree_bitwise with a sliding-window layer (a window of 41 tokens,
    starting inside the 150-token prompt at a different place for each branch) beside a full one: both servers plan
    the window tree into its own buffers besides the full plan, both plans take the same steady steps, and the
    replays read both. ``windows_refused``: the window buffers take no step (as a window tree past the limits), so the
    graph server runs every step eagerly, its full layers planned as the eager server's (the same steady steps);
    still bitwise the eager server's. ``windows_refused_once``: only step 5, where the graph server's batch of 5 is
    padded to 8 in its graphs: its eager step plans the full layers for 5 rows, and the replay after it steps that
    plan on at 8 (``step_planner._with_rows``): steady as in the eager server, whose chunking it keeps."""
    args = triton_prefill(server_args)  # torch_native's prefill ignores windows: refused
    layers = windowed_layers(model_config, 40)[:2]
    sim, kv_pool, graphs = random_kv_setup(args, model_config, layers, 4096)
    eager, emulator, logs = graphs_and_eager(graphs, args, model_config, layers, sim, kv_pool)
    refusing = [False]
    fits = step_planner_module.plan_graph_step
    monkeypatch.setattr(step_planner_module, "plan_graph_step", lambda plan, *a: None if refusing[0] and any(
        plan is b.window_graph_plan for b in (graphs, eager)) else fits(plan, *a))
    window_logs = [record_steady(backend, "window_step_planner") for backend in (graphs, eager)]
    reqs = four_branches(sim)
    hq, hkv, d = layers[0].tp_q_head_num, layers[0].tp_k_head_num, layers[0].head_dim
    window_attended = 0
    for step in range(8):
        if step == 4:  # an unrelated request joins: 5 queries, padded to 8 in the graphs
            reqs += sim.prefill([sim.new_req(sim.fresh(30))])
        if refusing[0] and step not in refused_steps:
            # A tree refused once and fitting at its next step: the step planners remember a refused batch for up to
            # their room's steps (_RefusedBatch), which a tree past the limits stays past; one that fits again is
            # tried after that room, which this step stands for.
            for backend in (graphs, eager):
                backend.window_step_planner._refused = None
        refusing[0] = step in refused_steps
        fb = decode_forward_batch(sim, reqs, kv_pool)
        window_attended += int(fb.seq_lens_cpu.clamp(max=41).sum())
        B = len(reqs)
        bs = emulator.prepare(fb)
        assert (bs is None) == refusing[0]
        if bs is None:
            graphs.init_forward_metadata(fb)  # SGLang runs the step eagerly
        eager.init_forward_metadata(fb)
        for layer in layers:
            q, k, v = torch.randn(B, hq * d) * 3, torch.randn(B, hkv, d), torch.randn(B, hkv, d)
            if bs is None:
                served = graphs.forward(q, k, v, layer, fb).view(B, hq, d)
            else:
                served = emulator.forward(bs, fb, q.view(B, hq, d), k, v, layer).view(bs, hq, d)[:B]
            out = eager.forward(q, k, v, layer, fb).view(B, hq, d)
            assert torch.equal(served, out)
            expected = per_request_reference(q.view(B, hq, d), kv_pool.get_key_buffer(layer.layer_id),
                                             kv_pool.get_value_buffer(layer.layer_id), sim, reqs, fb.seq_lens_cpu,
                                             layer)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        sim.finish_decode(reqs)
    steady = [False, False, True, True, False, False, True, True]
    assert logs[0] == logs[1] == steady
    # The window plan's steady steps too (its roots start at each branch's own place and move with the windows):
    # none in buffers that take no step, and after a refused step a full plan (with room: the same batch)
    assert window_logs[0] == window_logs[1] == [None if i in refused_steps else
                                                False if i - 1 in refused_steps else s for i, s in enumerate(steady)]
    # Both servers' sharing metrics count the window layer's trees, replayed or eager: each branch's window starts
    # at a place of its own, and they share the prompt from the latest of those places on
    unique = eager.sharing.total_window_unique
    assert [(m.total_window_attended, m.total_window_unique) for m in (graphs.sharing, eager.sharing)] == [
        (window_attended, unique)] * 2
    assert unique < 0.6 * window_attended
