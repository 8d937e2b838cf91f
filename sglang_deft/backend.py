"""``DeftAttnBackend``: SGLang decode attention over the batch's KV tree.

Per decode batch, the requests' radix-tree paths become a KV tree (``sglang_deft.kv_tree_builder``):
shared prefix nodes plus each request's private tail, planned once (``sglang_deft.tree_attention``).
Each layer (``forward_decode``) writes the new token's K/V, then computes attention over the tree
(the reference PyTorch path, or the Triton kernels on CUDA), reading each shared KV segment once
for every request below it.

deft computes decode attention only: the launcher and ``sglang_deft.Engine`` route prefill/extend
to SGLang's triton (GPU) or torch_native (CPU) backend through SGLang's HybridAttnBackend, which
hands decode and the CUDA-graph hooks to deft.

``SGLANG_DEFT_VERIFY_EVERY=N`` checks the first layer of each kind (full, sliding-window) of every N-th eager step
against the fp32 reference in the same server and logs the error (``sglang_deft.kernel_check``; a diagnostic: it
synchronises).

Plans (``sglang_deft.step_planner.DecodeStepPlanner``) go into one fixed-capacity ``TreeDecodePlan``:
up to ``--cuda-graph-max-bs`` queries (or the largest batch SGLang captures, when it captures less: with
``--max-running-requests`` below it), the KV pool's size in tree tokens, and the server's
``PlanLimits`` of work items and partials. A steady step (the same requests, one token longer each)
updates the last plan on the device instead of planning on the host (see that module).

CUDA graphs (on by default; ``--disable-cuda-graph`` turns them off). A captured graph replays fixed
kernel launches on fixed buffers, and its replay gets no ForwardBatch, hence no requests to build the
KV tree from. So:
- The backend allocates the plan buffers when it is made (before SGLang captures anything; again in
  ``init_cuda_graph_state`` if SGLang's largest captured size differs), shared by every captured batch
  size. Stage 1 is launched over the whole capacity of work items, stage 2 over the graph's batch size
  (``tree_attention.plan_graph_step``); programs past the plan's device-side counts exit at once.
- Capture (``init_forward_metadata_capture_cuda_graph``) writes a plan of padding queries only into
  those buffers, which the warm-up runs compute with (zeros). The captured launches read the buffers,
  so a replay computes whatever plan was written there last.
- Before each replay, ``sglang_deft.patches.cuda_graph_replay`` calls ``deft_prepare_graph_replay``
  from ``CudaGraphRunner.can_run`` with the step's ForwardBatch (``deft_reqs``) and the padded batch
  size: the step is planned into the buffers there, with the padding rows as queries of an empty
  node (they read no KV; stage 2 writes zeros for them). A tree past the buffers' capacity makes the
  step run eagerly instead. ``init_forward_metadata_replay_cuda_graph`` only checks that the
  replayed size is the planned one.
Sliding-window layers (Gemma-2's local layers: SGLang's ``layer.sliding_window_size`` w, a
query attends its last w + 1 tokens, as FlashInfer's ``window_left`` and Hugging Face's models define it)
get a second plan per step, of the same batch's KV tree cut to each query's window
(``DecodeKVTreeBuilder.build_window``, with a builder of its own), in plan buffers of their own, by a step
planner of its own whose steady steps also move each window's start (``step_planner``); every layer runs the
plan of its kind. The window plan comes after the full layers' plan in an eager step, before it ahead of a
replay (so that a window plan past the buffers leaves the full layers' step planner untouched), the same plans
either way. A step whose window plan does not fit runs eagerly, with the batch's own rows where the replays before
and after it have the graph's padded rows; the step planners' steady steps carry on across such changes (only the
padding rows' merge ranges change: ``step_planner._with_rows``), so the full layers are chunked as in a server
without graphs.

Eager steps use the same buffers, the same limits and the same steady-step decisions; steps the
buffers cannot take are planned under the same limits into buffers of their own
(``tree_attention.plan_step``), or without them for a tree past them. The limit on work items decides
the chunking and with it each query's merge order, and the padding queries change neither, so a step's
attention output is bitwise the same with and without CUDA graphs (a request's bits depend on the tree
of the batch it decodes in, so only for the same batches), and so are whole servers' outputs
(``tests/test_cuda_graph_gpu.py``).
"""
from __future__ import annotations

import logging
import os
import time
import weakref
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.dp_attention import get_attention_tp_size
from sglang.srt.utils import require_gathered_buffer

from sglang_deft.config_checks import attention_layers, check_model_runner, decode_impl, layer_window, windows_of
from sglang_deft.kernel_check import check_layer, request_tree, verify_every
from sglang_deft.kernels import KVTree, TreeDecodePlan, TreeDecodePlanner
from sglang_deft.kernels.plan import named_device
from sglang_deft.kernels.tree_decode import FP8_KV_DTYPES
from sglang_deft.kv_tree_builder import DecodeKVTree, DecodeKVTreeBuilder
from sglang_deft.patches.forward_batch_reqs import ATTRIBUTE as REQS_ATTRIBUTE
from sglang_deft.patches.warmup_dummy_run import in_warmup_dummy_run
from sglang_deft.sharing_metrics import SharingMeter, sharing_idle_s
from sglang_deft.step_planner import SLACK_TOKENS, STEADY_ENV, DecodeStepPlanner, StepPlan, steady_steps
from sglang_deft import tree_attention
from sglang_deft.tree_attention import (PlanLimits, empty_tree, graph_batch_sizes, new_graph_plan, plan_graph_step,
                                        plan_limits, plan_step, run_layer, window_plan_limits, with_padding_queries)

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
    from sglang.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)
# SGLANG_DEFT_TRACE_PLANS=1: log a fingerprint of every decode step's plans (``_trace_plan``).
TRACE_PLANS = os.environ.get("SGLANG_DEFT_TRACE_PLANS", "0") == "1"


@dataclass(frozen=True)
class DeftDecodeMetadata:
    """One decode step's attention plan, shared by every layer."""

    plan: Any  # ReferencePlan (reference path) or TreeDecodePlan (Triton path): device tensors; see tree_attention
    num_queries: int  # B: requests (one query token each) in the batch; a CUDA graph's padded size
    check_tree: KVTree | None = None  # set on the steps whose layers are checked (sglang_deft.kernel_check)
    step: int = 0  # eager decode steps so far, this one included
    window_plan: Any = None  # the sliding-window layers' plan (models with such layers; see the module doc)
    check_window_tree: KVTree | None = None  # check_tree's window tree, for the first sliding-window layer


def unchecked_replays(every: int, kernels: bool, device: torch.device, server_args) -> str | None:
    """What a server's kernel checks miss: only eager steps are checked, so under CUDA graphs (nearly every step a
    replay) a user who asked for them saw almost no check lines and could take the silence for kernels verified."""
    if every and kernels and device.type == "cuda" and not server_args.disable_cuda_graph:
        return (f"deft: SGLANG_DEFT_VERIFY_EVERY={every} checks eager decode steps only; with CUDA graphs nearly every "
                "step is a replay and goes unchecked: add --disable-cuda-graph to check every step it names")
    return None


@dataclass(frozen=True)
class _RefusedStep:
    """A batch whose CUDA-graph plan did not fit the buffers: SGLang then runs it eagerly, which need not
    try the buffers again (a weak reference: the backend keeps no batch alive)."""

    batch: weakref.ref
    started: float  # when its graph plan started: the step's host time includes it
    window_only: bool  # only its sliding-window plan did not fit (planned first: the full plan was not tried)


class DeftAttnBackend(AttentionBackend):
    def __init__(self, model_runner: ModelRunner):
        super().__init__()
        check_model_runner(model_runner)
        config = model_runner.model_config
        tp = get_attention_tp_size()
        self.num_qo_heads = config.num_attention_heads // tp
        self.num_kv_heads = config.get_num_kv_heads(tp)
        self.head_dim = config.head_dim
        self.kv_dtype = model_runner.kv_cache_dtype
        # Tokens a sliding-window layer's query attends (check_model_runner allows one window per model).
        layers = attention_layers(model_runner.model)
        windows = windows_of(layers)
        self.window_tokens = next(iter(windows)) + 1 if windows else None
        # SGLang's "cuda" is the scheduler's GPU, set current: named, as the plan buffers' device is, so that
        # the planner keeps one staging ring for both (it made a new one whenever they alternated).
        self.device = named_device(torch.device(model_runner.device))
        # Every TP rank runs the same steps: one logs them, as SGLang logs its decode stats (without DP
        # attention, which deft refuses, the attention-TP rank is the TP rank).
        self.tp_rank = model_runner.tp_rank
        self.logging_rank = self.tp_rank == 0
        if self.window_tokens is not None and self.logging_rank:
            logger.info("deft: sliding-window layers %s attend each query's last %d tokens, with a plan of their own "
                        "per step", windows[self.window_tokens - 1], self.window_tokens)
        # Keeps the last step's radix structure: a step whose requests only grew their tails reuses it.
        self.tree_builder = DecodeKVTreeBuilder(model_runner.req_to_token_pool.req_to_token)
        # The window trees' own builder: its kept radix part must not tell the step planner that a batch is the
        # last one (a window build of a new batch would, before that batch's full plan).
        self.window_builder = (DecodeKVTreeBuilder(model_runner.req_to_token_pool.req_to_token)
                               if self.window_tokens is not None else None)
        self.kv_pool_size = model_runner.token_to_kv_pool.size
        window_share = len(windows[self.window_tokens - 1]) / len(layers) if windows else 0.0
        self.sharing = SharingMeter(interval=model_runner.server_args.decode_log_interval, window_share=window_share,
                                    log=self.logging_rank, idle_s=sharing_idle_s())
        self._recorded_batch = None  # a weak reference to the ForwardBatch whose step was last counted
        self._refused_batch: _RefusedStep | None = None
        self.forward_metadata: DeftDecodeMetadata | None = None
        self.verify_every = verify_every()  # SGLANG_DEFT_VERIFY_EVERY: kernels vs reference, every N eager steps
        self.steady_steps = steady_steps()  # SGLANG_DEFT_STEADY_STEPS: room for steady steps after a full plan
        if self.steady_steps != SLACK_TOKENS and self.logging_rank:
            logger.info("deft: %s=%d: %s", STEADY_ENV, self.steady_steps,
                        "every decode step is planned in full on the host" if not self.steady_steps else
                        f"a full plan leaves room for {self.steady_steps} steady steps (default {SLACK_TOKENS})")
        # The layers it checks: the first of each kind, so that a model with window layers checks both plans
        # (Gemma's layer 0 is a window layer: checking layer 0 alone never checked the full-attention plan).
        window_ids = {i for ids in windows.values() for i in ids}
        ids = [layer.layer_id for layer in layers]  # (attention_layers sorts them)
        first_window = next((i for i in ids if i in window_ids), None)
        first_full = next((i for i in ids if i not in window_ids), None)
        self._checked_layers = frozenset({first_window, first_full} - {None})
        self.eager_steps = 0
        # Sized by --cuda-graph-max-bs, which SGLang sets with or without --disable-cuda-graph: eager
        # steps and graph replays are held to the same limits (see the module docstring).
        self.max_bs = model_runner.server_args.cuda_graph_max_bs
        self.plan_limits = plan_limits(self.max_bs, self.num_qo_heads, self.num_kv_heads, self.device)
        self.window_plan_limits = window_plan_limits(self.plan_limits, self.max_bs)
        # One planner per server: its host schedule buffer and page-locked staging ring are allocated once,
        # and the last plan's item ends (items_ending_at) let the step planner update a steady step on the
        # device instead of planning it again.
        # With the batch sizes SGLang captures graphs for (set with or without --disable-cuda-graph), so
        # that stage 2's launch shape is the same for a batch and the graph size it is padded to.
        args = model_runner.server_args
        sizes = graph_batch_sizes(args.cuda_graph_bs, model_runner.req_to_token_pool.size,
                                  get_attention_tp_size() if require_gathered_buffer(args) else 1)
        self.planner = TreeDecodePlanner(self.num_qo_heads, self.num_kv_heads, self.head_dim, kv_dtype=self.kv_dtype,
                                         graph_batch_sizes=sizes)
        # The fixed plan buffers every captured graph reads, and eager steps of up to max_bs requests
        # too (made below where the kernels run, remade by init_cuda_graph_state for other graph sizes),
        # and the step planner that writes them (steady steps update the last plan in place).
        self.graph_plan: TreeDecodePlan | None = None
        self.window_graph_plan: TreeDecodePlan | None = None  # the sliding-window layers' buffers
        self.step_planner: DecodeStepPlanner | None = None
        self.window_step_planner: DecodeStepPlanner | None = None  # the sliding-window layers' (window buffers)
        self.planned_replay_size: int | None = None  # padded batch size planned into graph_plan, not yet replayed
        # The decode path, chosen once: the plan buffers below and every step's plan follow it.
        self.kernels = kernels = tree_attention.use_triton_kernels(self.device)
        if self.logging_rank:
            impl = decode_impl()
            why = f"SGLANG_DEFT_DECODE_IMPL={impl}" if impl != "auto" else f"on {self.device.type}"
            logger.info("deft: decode attention by %s (%s)", "the Triton tree-decode kernels" if kernels else
                        "the PyTorch reference (kernels/reference.py, grouped by KV segment as the kernels are)", why)
        if self.logging_rank and (warning := unchecked_replays(self.verify_every, kernels, self.device,
                                                               model_runner.server_args)):
            logger.warning(warning)
        if kernels:
            # Made here, with or without CUDA graphs, before SGLang captures any graph: made at the first
            # decode step instead (after SGLang 0.5.10 has captured its piecewise CUDA graphs for prefill,
            # on by default), a --disable-cuda-graph server's prefill outputs changed from then on
            # (scripts/diagnose_graph_bitwise.py: first tokens differed from every other server's).
            self._make_plan_buffers(self.max_bs)
        elif (self.verify_every or TRACE_PLANS) and self.logging_rank:
            logger.warning("deft: SGLANG_DEFT_VERIFY_EVERY and SGLANG_DEFT_TRACE_PLANS check and trace the GPU "
                           "kernels' plans; this server decodes with the PyTorch reference on %s, so neither "
                           "logs anything", self.device)

    def _make_plan_buffers(self, max_bs: int) -> None:
        # The tree's KV slots are distinct slots of the pool, so the pool's size bounds its tokens.
        self.graph_plan = new_graph_plan(self.plan_limits, max_bs, self.kv_pool_size, self.num_qo_heads,
                                         self.num_kv_heads, self.head_dim, self.kv_dtype, self.device,
                                         self.planner.graph_batch_sizes)
        self.step_planner = DecodeStepPlanner(self.tree_builder, self.planner, self.graph_plan,
                                              slack=self.steady_steps)
        if self.window_tokens is not None:
            # A window tree holds at most every query's window: max_bs x window tokens (a slot may appear
            # under two different window starts, so the pool's size does not bound it), plus the room for steady
            # steps after its tails and its queries' private nodes (one each at most) and the steady update's
            # scratch entry.
            self.window_graph_plan = new_graph_plan(self.window_plan_limits, max_bs,
                                                    max_bs * (self.window_tokens + 2 * self.steady_steps) + 1,
                                                    self.num_qo_heads, self.num_kv_heads, self.head_dim, self.kv_dtype,
                                                    self.device, self.planner.graph_batch_sizes)
            self.window_step_planner = DecodeStepPlanner(self.window_builder, self.planner, self.window_graph_plan,
                                                         slack=self.steady_steps, window=self.window_tokens)
        if not self.logging_rank:
            return
        logger.info(
            "deft plan buffers: %d requests, %d KV tokens, %s; %.1f MB of partial results; merges of batches "
            "of up to %d requests on 4 warps (one merge per SM, a captured batch size)%s",
            max_bs, self.kv_pool_size, self.plan_limits,
            self.plan_limits.partial_bytes(self.num_qo_heads, self.head_dim) / 1e6,
            self.graph_plan.few_merges_max_queries,
            "" if self.window_tokens is None else
            f"; the same again for the sliding-window layers' plan, with {self.window_graph_plan.kv_indices.numel()} "
            "KV tokens",
        )

    def _requests(self, forward_batch: ForwardBatch):
        reqs = getattr(forward_batch, REQS_ATTRIBUTE, None)
        if reqs is None:
            raise RuntimeError(
                "deft: this decode ForwardBatch carries no requests (forward_batch.deft_reqs); it was not "
                "built by ForwardBatch.init_new with sglang_deft.patches.forward_batch_reqs applied. "
                "Start SGLang through sglang_deft.launch_server or sglang_deft.Engine."
            )
        if forward_batch.seq_lens_cpu is None:
            raise RuntimeError("deft: decode ForwardBatch without seq_lens_cpu; the KV tree is planned on the host")
        return reqs

    def init_forward_metadata(self, forward_batch: ForwardBatch):
        mode = forward_batch.forward_mode
        if mode.is_idle():
            self.forward_metadata = None
            return
        if not mode.is_decode():
            raise _extend_not_routed_away(mode)
        if getattr(forward_batch, REQS_ATTRIBUTE, None) is None and in_warmup_dummy_run():
            self._plan_warmup_batch(forward_batch)
            return
        started = time.perf_counter()
        refused, self._refused_batch = self._refused_batch, None
        if refused is not None and refused.batch() is forward_batch:
            started = refused.started  # the step's host time includes the graph plan that did not fit
        else:
            refused = None
        reqs = self._requests(forward_batch)
        rows = forward_batch.seq_lens_cpu.numel()
        seq_lens = _request_seq_lens(forward_batch, reqs)
        # The batch is one deft plans: the last step's plan goes now, not when this one is made, or a plan in buffers
        # of its own (a batch past the graph buffers) would stay allocated beside this step's.
        self.forward_metadata = None
        self.eager_steps += 1
        check = self.verify_every > 0 and self.eager_steps % self.verify_every == 0
        step = None
        # Not where this very batch's graph plan just failed to fit the buffers: the step planner would build
        # and schedule the same tree again to fail again (on every step of a batch past the plan limits).
        window_refused = refused is not None and refused.window_only
        tried = (self.step_planner is not None and rows <= self.graph_plan.qperm.numel()
                 and (refused is None or window_refused))
        if tried:
            step = self.step_planner.plan(reqs, seq_lens, rows)
        if step is not None:
            plan, attended, unique = step.plan, step.attended_tokens, step.unique_tokens
        else:
            # The reference path (CPU), a batch past the buffers or a tree past the plan limits: a
            # plan of its own, under the same limits where they hold.
            if self.step_planner is not None:
                self.step_planner.invalidate()
            built = self.tree_builder.build(reqs, seq_lens)
            # After a refused graph plan, or one the step planner just refused, not under the limits again:
            # it refuses only trees past the limits (its buffers take every row count and KV token below
            # them), and padding rows add no items or partials, so they would refuse it again.
            why = ("its CUDA-graph plan was refused for them" if refused is not None and not window_refused else
                   "the plan buffers refused it" if tried else None)
            plan = plan_step(with_padding_queries(built.tree, rows), self.num_qo_heads, self.num_kv_heads,
                             self.head_dim, self.kv_dtype, self.device, self._eager_limits(rows, self.plan_limits),
                             self.planner, refused=why, warn=self.logging_rank, kernels=self.kernels)
            attended, unique = built.attended_tokens, built.unique_tokens
        window_plan = window_counts = window_steady = None
        if self.window_tokens is not None:
            # Into the window buffers where the full plan went into its buffers (as before a replay), unless
            # they already refused this step's window plan: it is past the limits.
            window_plan, window_counts, window_steady = self._window_plan(
                reqs, seq_lens, rows, buffers=step is not None and not window_refused, past_limits=window_refused)
        # The step's host time is its planning: not the kernel check's reference tree, nor the trace's device wait.
        host_s = time.perf_counter() - started
        check_tree = check_window_tree = None
        if check and isinstance(plan, TreeDecodePlan):  # (the reference path has nothing to check)
            pool, lens = [req.req_pool_idx for req in reqs], seq_lens.tolist()
            check_tree = request_tree(self.tree_builder.req_to_token, pool, lens, rows)
            if self.window_tokens is not None:
                check_window_tree = request_tree(self.tree_builder.req_to_token, pool, lens, rows, self.window_tokens)
        if TRACE_PLANS and isinstance(plan, TreeDecodePlan):
            # "own": a plan in buffers of its own (a batch past the plan buffers or their limits), traced as well, so
            # that two servers' traces stay step for step.
            self._trace_plan("eager" if step is not None else "own", step is not None and step.steady, seq_lens, plan,
                             window_plan, window_steady)
        self.forward_metadata = DeftDecodeMetadata(plan, rows, check_tree, self.eager_steps, window_plan,
                                                   check_window_tree)
        self._record(forward_batch, attended, unique, host_s, step is not None and step.steady, window_counts)

    def _window_plan(self, reqs, seq_lens: torch.Tensor, rows: int, buffers: bool, past_limits: bool):
        """The step's sliding-window plan, its (attended, unique) tokens and its steady flag (None: not in the
        window buffers): by the window step planner into the window buffers when ``buffers`` and it fits them, else
        in buffers of its own (or its ReferencePlan, on the reference path); ``past_limits``: its CUDA-graph plan
        was refused."""
        if buffers:
            step = self.window_step_planner.plan(reqs, seq_lens, rows)
            if step is not None:
                return step.plan, _counts(step), step.steady
        if self.window_step_planner is not None:
            self.window_step_planner.invalidate()
        built = self.window_builder.build_window(reqs, seq_lens, self.window_tokens)
        # The buffers refuse only trees past the limits (as the full plan's), so not under them again.
        why = ("the plan buffers refused it" if buffers else
               "its CUDA-graph plan was refused for them" if past_limits else None)
        plan = plan_step(with_padding_queries(built.tree, rows), self.num_qo_heads, self.num_kv_heads, self.head_dim,
                         self.kv_dtype, self.device, self._eager_limits(rows, self.window_plan_limits), self.planner,
                         refused=why, kind="sliding-window layers", warn=self.logging_rank, kernels=self.kernels)
        return plan, _counts(built), None

    def _eager_limits(self, rows: int, limits: PlanLimits) -> PlanLimits | None:
        """The limits an eager step's own plan keeps: the server's, unless the batch is larger than the plan buffers
        (``--cuda-graph-max-bs``): no graph replays it, and limits sized for smaller batches would not hold it."""
        return None if rows > self.max_bs else limits

    def _record(self, forward_batch: ForwardBatch, attended: int, unique: int, host_s: float, steady: bool,
                window: tuple[int, int] | None) -> None:
        """Count the step in the sharing metrics once: after a rank fault under elastic expert parallelism,
        ``ModelRunner.forward`` runs the same ForwardBatch again (planned again, rightly, but one step).
        ``host_s``: its planning's host time; ``window``: the window layers' attended and unique tokens (models with
        such layers)."""
        if self._recorded_batch is not None and self._recorded_batch() is forward_batch:
            return
        self._recorded_batch = weakref.ref(forward_batch)  # the backend keeps no batch alive
        self.sharing.record(attended, unique, host_s, steady, window)

    def _plan_warmup_batch(self, forward_batch: ForwardBatch) -> None:
        """SGLang's warm-up forward pass (FlashInfer's autotune, ``patches.warmup_dummy_run``): a decode batch
        of placeholder rows and no requests. Its rows attend nothing (zeros), as a CUDA graph's capture batch's
        do; the pass only tunes the model's other kernels."""
        rows = forward_batch.batch_size
        if self.logging_rank:
            logger.info("deft: SGLang's warm-up decode batch of %d rows (FlashInfer autotune) attends nothing", rows)
        self._invalidate_step_planners()
        tree = with_padding_queries(empty_tree(self.device), rows)
        plan = plan_step(tree, self.num_qo_heads, self.num_kv_heads, self.head_dim, self.kv_dtype, self.device,
                         self.plan_limits, self.planner, kernels=self.kernels)
        # No KV at all: the sliding-window layers' tree is the same tree.
        self.forward_metadata = DeftDecodeMetadata(plan, rows, window_plan=plan)

    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs,
    ):
        # Under CUDA-graph capture this runs once per batch size and is recorded: everything here is
        # the same for every replay (shapes, the plan's fixed buffers and grids).
        unsupported = {name for name, value in kwargs.items() if value is not None}
        if unsupported:
            # e.g. attention sinks: ignoring them would silently change the model's outputs.
            raise NotImplementedError(f"deft forward_decode does not support {sorted(unsupported)}")
        meta = self.forward_metadata
        q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        # Checked before the KV write: a batch that is not the planned one must not touch the cache.
        if meta is None:
            raise RuntimeError("deft: forward_decode without decode metadata (init_forward_metadata did not run, "
                               "or ran for an idle batch)")
        if q.shape[0] != meta.num_queries:
            raise RuntimeError(
                f"deft: decode metadata is for {meta.num_queries} requests but q has "
                f"{q.shape[0]} tokens (one query token per request)"
            )
        windowed = layer_window(layer) is not None
        plan = meta.window_plan if windowed else meta.plan
        if plan is None:
            raise RuntimeError(f"deft: layer {layer.layer_id} has a sliding window of {layer.sliding_window_size} "
                               "but the backend was made for a model without one")
        if save_kv_cache:
            # As SGLang's triton backend stores it: an fp8 pool divides by the layer's scales (None: a cast).
            forward_batch.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v, layer.k_scale,
                                                         layer.v_scale)
        out = q.new_empty(q.shape[0], layer.tp_q_head_num, layer.v_head_dim)
        k_buffer = forward_batch.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_buffer = forward_batch.token_to_kv_pool.get_value_buffer(layer.layer_id)
        k_scale, v_scale = kv_scales(layer, k_buffer.dtype)
        run_layer(q, k_buffer, v_buffer, plan, layer.scaling, layer.logit_cap, out, k_scale, v_scale)
        check_tree = meta.check_window_tree if windowed else meta.check_tree
        if check_tree is not None and layer.layer_id in self._checked_layers:
            check_layer(out, q, k_buffer, v_buffer, check_tree, layer.scaling, layer.logit_cap, meta.step,
                        layer.layer_id, k_scale, v_scale, rank=self.tp_rank)
        return out.view(-1, layer.tp_q_head_num * layer.v_head_dim)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        raise _extend_not_routed_away(forward_batch.forward_mode)

    # CUDA graphs. SGLang's CudaGraphRunner calls init_cuda_graph_state once, then per captured batch
    # size init_forward_metadata_capture_cuda_graph before capturing; per replay, the patched can_run
    # calls deft_prepare_graph_replay, then replay_prepare calls init_forward_metadata_replay_cuda_graph.

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        if max_num_tokens != max_bs:
            raise RuntimeError(f"deft: CUDA graphs of {max_num_tokens} tokens for {max_bs} requests; deft decodes "
                               "one token per request")
        if not self.kernels:  # (config_checks refuses it first)
            raise RuntimeError("deft: CUDA graphs with decode attention by the PyTorch reference: its plans are host "
                               "objects a graph cannot replay; graph buffers would switch the server to the kernels")
        if self.graph_plan is None or self.graph_plan.qperm.numel() != max_bs:
            self._make_plan_buffers(max_bs)

    def init_forward_metadata_capture_cuda_graph(
        self,
        bs: int,
        num_tokens: int,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        encoder_lens: torch.Tensor | None,
        forward_mode: ForwardMode,
        spec_info,
    ):
        if not forward_mode.is_decode() or spec_info is not None:
            batch = f"a {forward_mode.name} batch" + (" with spec_info (speculative decoding)" if spec_info is not None
                                                      else "")
            raise RuntimeError(f"deft: CUDA-graph capture of {batch}; deft captures plain decode only")
        # Padding queries only: valid buffers for the warm-up runs; each replay writes its own plan.
        plan = plan_graph_step(self.graph_plan, empty_tree(self.device), bs, self.kv_dtype, self.planner)
        if plan is None:
            raise RuntimeError(f"deft: CUDA graph of batch size {bs}, past the plan buffers' "
                               f"{self.graph_plan.qperm.numel()} requests")
        window_plan = None
        if self.window_graph_plan is not None:
            window_plan = plan_graph_step(self.window_graph_plan, empty_tree(self.device), bs, self.kv_dtype,
                                          self.planner)
        self.forward_metadata = DeftDecodeMetadata(plan, bs, window_plan=window_plan)
        self.planned_replay_size = None  # whatever was planned is overwritten
        self._invalidate_step_planners()

    def _invalidate_step_planners(self) -> None:
        """Something else wrote the plan buffers: the next step is planned in full."""
        for planner in (self.step_planner, self.window_step_planner):
            if planner is not None:
                planner.invalidate()

    def deft_prepare_graph_replay(self, forward_batch: ForwardBatch, padded_bs: int) -> bool:
        """Plan a decode step into the graph's buffers, padded to ``padded_bs`` queries; False (the
        step runs eagerly) when its tree does not fit them. Called by the patched
        ``CudaGraphRunner.can_run`` (``sglang_deft.patches.cuda_graph_replay``)."""
        # A replay never reads forward_metadata: drop the last eager step's plan, whose buffers of its own
        # would stay allocated for as long as graphs replay.
        self.forward_metadata = None
        if not forward_batch.forward_mode.is_decode():
            return False
        started = time.perf_counter()
        reqs = self._requests(forward_batch)
        # Padded already where this batch ran eagerly and is run again (a rerun under elastic expert parallelism).
        seq_lens = _request_seq_lens(forward_batch, reqs)
        # The window plan first: one that does not fit leaves the step planner untouched, so that the eager step
        # plans the full layers as a server without CUDA graphs does (up to the row count: the module doc).
        window_counts = window_steady = None
        if self.window_tokens is not None:
            window_step = self.window_step_planner.plan(reqs, seq_lens, padded_bs)
            if window_step is None:
                self._refused_batch = _RefusedStep(weakref.ref(forward_batch), started, window_only=True)
                return False
            window_counts, window_steady = _counts(window_step), window_step.steady
        step = self.step_planner.plan(reqs, seq_lens, padded_bs)
        if step is None:
            self._refused_batch = _RefusedStep(weakref.ref(forward_batch), started, window_only=False)
            return False
        host_s = time.perf_counter() - started
        if TRACE_PLANS:
            self._trace_plan("graph", step.steady, seq_lens, self.graph_plan, self.window_graph_plan, window_steady)
        self.planned_replay_size = padded_bs
        self._record(forward_batch, step.attended_tokens, step.unique_tokens, host_s, step.steady, window_counts)
        return True

    def init_forward_metadata_replay_cuda_graph(
        self,
        bs: int,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_sum: int,
        encoder_lens: torch.Tensor | None,
        forward_mode: ForwardMode,
        spec_info,
        seq_lens_cpu: torch.Tensor | None,
    ):
        planned, self.planned_replay_size = self.planned_replay_size, None
        if planned != bs:
            raise RuntimeError(
                f"deft: CUDA-graph replay of batch size {bs}, but the plan buffers hold "
                f"{'no step' if planned is None else f'a step padded to {planned}'}. deft plans a replay in "
                "CudaGraphRunner.can_run (sglang_deft.patches.cuda_graph_replay); this replay did not come "
                "through it, or SGLang padded the batch differently."
            )

    @staticmethod
    def _trace_plan(mode: str, steady: bool, seq_lens_cpu: torch.Tensor, plan: TreeDecodePlan,
                    window_plan: TreeDecodePlan | None = None, window_steady: bool | None = None) -> None:
        """One log line per planned decode step with a fingerprint of what stage 1 and stage 2 will
        read (items, merge lists, and the KV slots of every item's range), so that two servers'
        steps can be compared line by line: ``plan`` and ``window_plan`` (models with sliding-window layers), whose
        steady flag ``window_steady`` is (None: in buffers of its own). Waits for the device: a debugging aid only."""
        n_q = int(plan.counts[2])
        line = (f"deft trace {mode}: queries={n_q} steady={int(steady)} seq_lens={seq_lens_cpu.tolist()} "
                f"{_fingerprint(plan)}")
        if window_plan is not None:  # not "steady=": tests and tools count the full plan's steady steps by it
            line += f" window_in_place={int(bool(window_steady))} window_{_fingerprint(window_plan)}"
        logger.info(line)

    def get_cuda_graph_seq_len_fill_value(self):
        # As SGLang's triton backend. deft reads no seq_lens of padding rows (they attend nothing).
        return 1


def kv_scales(layer, kv_dtype: torch.dtype) -> tuple[float, float]:
    """The layer's (K, V) scales for a KV pool of ``kv_dtype``: in an fp8 pool, a checkpoint's calibrated
    per-tensor scales (``k_scale_float``, which SGLang's pool divided the values by as it stored them), else
    1.0 (the values were cast as they are). A pool in the model's dtype stores them unscaled either way."""
    if kv_dtype in FP8_KV_DTYPES and layer.k_scale is not None and layer.v_scale is not None:
        return layer.k_scale_float, layer.v_scale_float
    return 1.0, 1.0


def _fingerprint(plan: TreeDecodePlan) -> str:
    """``_trace_plan``'s fingerprint of one plan's buffers: its item counts and CRCs of its items, merge lists and
    the KV slots every item reads (entries nothing reads do not count)."""
    if plan.meta.is_cuda:
        torch.cuda.synchronize(plan.meta.device)
    n_large, n_small, n_q = plan.counts.tolist()
    items = plan.items[:n_large + n_small].cpu().numpy()
    indptr = plan.merge_indptr[:n_q + 1].cpu().numpy()
    slots = plan.merge_slots[:int(indptr[-1])].cpu().numpy()
    kv = plan.kv_indices.cpu().numpy()
    kv_read = [kv[start:start + length] for start, length in items[:, :2]]
    crc = [zlib.crc32(a.tobytes()) for a in (items, indptr, slots)]
    crc.append(zlib.crc32(b"".join(a.tobytes() for a in kv_read)))
    return "items={}+{} crc items={:08x} merge={:08x}/{:08x} kv={:08x}".format(n_large, n_small, *crc)


def _counts(built: DecodeKVTree | StepPlan) -> tuple[int, int]:
    """A KV tree's (or a planned step's) attended and unique tokens, as the sharing metrics count them."""
    return built.attended_tokens, built.unique_tokens


def _request_seq_lens(forward_batch: ForwardBatch, reqs: list) -> torch.Tensor:
    """The requests' sequence lengths: rows of ``seq_lens_cpu`` past the requests are padding. SGLang pads an eager
    decode batch to a multiple of the attention-TP size when its MLP gathers across ranks (--moe-a2a-backend,
    --moe-dense-tp-size 1 at --tp > 1), seq_lens_cpu included; they attend nothing, as a CUDA graph's padding rows."""
    rows = forward_batch.seq_lens_cpu.numel()
    if rows < len(reqs):
        raise RuntimeError(f"deft: decode batch of {len(reqs)} requests with {rows} seq_lens")
    return forward_batch.seq_lens_cpu[:len(reqs)]


def _extend_not_routed_away(mode) -> RuntimeError:
    if mode.is_target_verify() or mode.is_draft_extend():
        return RuntimeError(f"deft got a {mode.name} batch: speculative decoding, which deft does not serve (its "
                            "draft tokens would need a tree of their own per request); start without --speculative-*")
    return RuntimeError(
        f"deft computes decode attention only, but got a {mode.name} batch. Start SGLang through "
        "sglang_deft.launch_server or sglang_deft.Engine (they route --attention-backend deft's "
        "prefill/extend to SGLang's triton or torch_native backend), or pass "
        "--attention-backend triton|torch_native --decode-attention-backend deft."
    )
