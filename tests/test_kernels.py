"""Tree decode kernels against a plain fp32 per-query reference.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by `make test`) in fp16/fp32 only: the
interpreter's bf16 tl.dot is wrong. On a GPU the same tests add bf16 and larger shapes.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re

import pytest
import torch
import triton

from kernel_trees import make_tree, named_trees, random_forest
import sglang_deft.kernels.plan as kernel_plan
from sglang_deft.kernels import (KVTree, PlanCapacity, attention_reference, plan_tree_decode, tree_decode,
                                 tree_decode_reference)
from sglang_deft.kernels.tree_decode import (HOPPER_CONFIG, STAGE2_SHAPE, STAGE2_SHAPE_FEW_MERGES, Stage1Config,
                                             stage1_config, stage2_shape)

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# Max abs error allowed against the fp32 reference for unit-normal q/k/v (outputs are averages of
# values of size ~1): the inputs' rounding dominates, so the bound follows the dtype's epsilon.
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
TREES = named_trees()


def fp8_case(tree: KVTree, hq: int, hkv: int, d: int, dtype, kv_dtype, seed: int):
    """q in ``dtype``, an fp8 KV pool (unit-normal values cast to ``kv_dtype``) and the tree's plan."""
    g = torch.Generator().manual_seed(seed)
    slots = int(tree.kv_indices.max()) + 1
    q = torch.randn(tree.num_queries, hq, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(slots, hkv, d, generator=g).to(DEVICE).to(kv_dtype)
    v = torch.randn(slots, hkv, d, generator=g).to(DEVICE).to(kv_dtype)
    return q, k, v, plan_tree_decode(tree, hq, hkv, d, device=DEVICE, kv_dtype=kv_dtype)


def run_case(tree: KVTree, hq: int, hkv: int, d: int, dtype, logit_cap=0.0, seed=0, large_rows=64):
    g = torch.Generator().manual_seed(seed)
    slots = int(tree.kv_indices.max()) + 1 if tree.kv_indices.numel() else 1
    q = torch.randn(tree.num_queries, hq, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(slots, hkv, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(slots, hkv, d, generator=g).to(DEVICE, dtype)
    sm_scale = d ** -0.5
    plan = plan_tree_decode(tree, hq, hkv, d, device=DEVICE, kv_dtype=dtype, large_rows=large_rows)
    out = tree_decode(q, k, v, plan, sm_scale, logit_cap)
    ref = attention_reference(q, k, v, tree, sm_scale, logit_cap)
    return out, ref, (q, k, v, plan, sm_scale, logit_cap)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(TREES))
def test_tree_shapes(name, dtype):
    out, ref, _ = run_case(TREES[name], 8, 2, 64, dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("strided", ["k", "v"])
@pytest.mark.parametrize("d", [64, 128])  # 128: the Hopper kernel on an H100/H200
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_k_and_v_each_read_by_their_own_strides(strided, d, dtype):
    """The kernels take K's and V's strides apart: one of them head-major (a head's slots contiguous), the other as
    SGLang's pool lays it out. Every other test passes K and V alike, where reading V by K's strides went unseen."""
    tree = TREES["odd_lengths"]
    g = torch.Generator().manual_seed(0)
    slots = int(tree.kv_indices.max()) + 1
    q = torch.randn(tree.num_queries, 8, d, generator=g).to(DEVICE, dtype)
    pool = torch.randn(slots, 2, d, generator=g).to(DEVICE, dtype)
    head_major = torch.randn(2, slots, d, generator=g).to(DEVICE, dtype).transpose(0, 1)
    k, v = (head_major, pool) if strided == "k" else (pool, head_major)
    assert k.stride() != v.stride()
    plan = plan_tree_decode(tree, 8, 2, d, device=DEVICE, kv_dtype=dtype)
    out = tree_decode(q, k, v, plan, d ** -0.5)
    ref = attention_reference(q, k.contiguous(), v.contiguous(), tree, d ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (16, 2)], ids=["gqa1", "gqa4", "gqa8"])
# 80 and 96: Phi-2's and Phi-3-mini's head dims, which the kernels pad to 128 and mask; 192 pads to 256, and 8
# to 16 (the least inner dim of tl.dot for 16-bit types on NVIDIA GPUs).
@pytest.mark.parametrize("d", [8, 64, 80, 96, 128, 192, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_heads_and_dims(hq, hkv, d, dtype):
    out, ref, _ = run_case(TREES["odd_lengths"], hq, hkv, d, dtype)
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=0)


# GQA groups besides 1/4/8: 2, 3 (Llama-3.2-3B's 24 q / 8 kv heads),
# 5 (Qwen2.5-14B/32B, 40 / 8), 6 (Qwen2-1.5B, 12 / 2), 7 (Qwen2.5-7B, 28 / 4) and 16 (ChatGLM3-6B,
# 32 / 2). A tile's rows are then not a multiple of the group (at 7: a 64-row large tile holds 9
# queries, 63 rows), and at 16 one query fills a small tile. Head dim 128: the Hopper kernel on the H200.
@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 2), (10, 2), (12, 2), (14, 2), (32, 2)],
                         ids=["gqa2", "gqa3", "gqa5", "gqa6", "gqa7", "gqa16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gqa_groups_of_any_size(hq, hkv, dtype):
    out, ref, _ = run_case(TREES["random_forest"], hq, hkv, 128, dtype)
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# (a kernel that ignored caps <= 1 passed with 1.5 alone; tanh as 1 - 2 / (1 + e^{2x}) lost its digits at caps far
# above the scores: 1.9e-4 off at 5000 in float32, every score 0 at 1e8; at 3e38, near float32's largest, sm_scale / cap
# is under float32's normal range and the kernels take it as 0: no cap, as it is for the reference)
@pytest.mark.parametrize("cap", [0.5, 1.5, 30.0, 5000.0, 1e8, 3e38])
def test_logit_cap(dtype, cap):
    out, ref, _ = run_case(TREES["inner_queries"], 8, 2, 64, dtype, logit_cap=cap)
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=0)
    if cap < 2:  # scores of N(0, 1) inputs reach ~4: a cap of 30 barely touches them
        out_nocap, ref_nocap, _ = run_case(TREES["inner_queries"], 8, 2, 64, dtype)
        # The cap must change the result, or this test could not catch a cap that is ignored.
        assert (ref - ref_nocap).abs().max() > 10 * ATOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_capped_score_that_is_not_a_number_stays_one(dtype, bad):
    """A NaN score (a NaN in K, or inf - inf from an inf) went through the cap's clamp as -cap, a finite score, and
    the output came back finite where the uncapped path and the reference give NaN."""
    tree = TREES["inner_queries"]
    out, ref, (q, k, v, plan, sm_scale, cap) = run_case(tree, 8, 2, 64, dtype, logit_cap=30.0)
    k[int(tree.kv_indices[0]), 0, :] = bad  # the first node's first token, in every query's path
    out = tree_decode(q, k, v, plan, sm_scale, cap)
    ref = attention_reference(q, k, v, tree, sm_scale, cap)
    assert ref.isnan().any()
    assert torch.equal(out.float().isnan(), ref.isnan())


def test_a_cap_the_scale_cannot_reach_in_float32_is_refused():
    """sm_scale / logit_cap past float32's range (2e38 / 0.5) left the clamp subnormal: the output was 0.039 off. And
    the Hopper kernel takes capped scores in base 2, cap x log2(e): past float32's range where the cap acts."""
    out, ref, (q, k, v, plan, _, _) = run_case(TREES["inner_queries"], 8, 2, 64, torch.float32)
    with pytest.raises(ValueError, match=r"logit_cap 0.5 with sm_scale 2e\+38: the kernels take sm_scale / logit_cap"):
        tree_decode(q, k, v, plan, 2e38, 0.5)
    with pytest.raises(ValueError, match=r"logit_cap 3e\+38 with sm_scale 10.0: the kernels take .* logit_cap x log2"):
        tree_decode(q, k, v, plan, 10.0, 3e38)
    # the same cap where sm_scale / cap is under float32's normal range: no cap (as the reference computes it)
    torch.testing.assert_close(tree_decode(q, k, v, plan, 0.125, 3e38).float(),
                               attention_reference(q, k, v, TREES["inner_queries"], 0.125), atol=ATOL[q.dtype], rtol=0)


def check_capped_scores(dtype, d, q_scale, logit_cap):
    """tree_decode against the reference on the random forest with q x ``q_scale`` under ``logit_cap``; returns the
    scaled q, k and sm_scale (for a check of the scores' size)."""
    tree = TREES["random_forest"]
    _, _, (q, k, v, plan, sm_scale, _) = run_case(tree, 8, 2, d, dtype)
    q = q * q_scale
    out = tree_decode(q, k, v, plan, sm_scale, logit_cap)
    ref = attention_reference(q, k, v, tree, sm_scale, logit_cap)
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=0)
    return q, k, sm_scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
def test_logit_cap_on_scores_near_the_cap(dtype, d):
    """Scores of q x 8 (|score| up to ~30) under Gemma-2's cap of 50, where the cap's tanh is far from 0 and 1 and
    an error in it moves the softmax's weights. The capped score 2^-11 off relative to itself (tanh.approx.f32's
    bound, FlashInfer's cap), made so in the Triton kernel's rational on the CPU, fails the float32 cases."""
    q, k, sm_scale = check_capped_scores(dtype, d, q_scale=8, logit_cap=50.0)
    scores = torch.einsum("qhd,khd->qhk", q[:, ::4].float(), k.float()) * sm_scale  # (q heads of KV head 0, 1)
    assert scores.abs().max() > 20


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
def test_logit_cap_on_scores_in_the_series_range(dtype, d):
    """Scores of q x 3 (|score| up to ~12) under a cap of 100: x = score / cap under ~0.12, where a tanh form's
    small-x branch (a series, or a rational's low terms) decides the capped score. Tanh's series with +1/3 for -1/3
    puts fp16 outputs 7-14 x ATOL off (the reference with that series, on the CPU); bf16's tolerance is too coarse."""
    check_capped_scores(dtype, d, q_scale=3, logit_cap=100.0)


@pytest.mark.skipif(not CUDA, reason="CUDA devices")
def test_tensors_off_the_current_device_run_on_theirs(monkeypatch):
    """Triton launches on the current device: tensors on another GPU were read from it (an illegal address, or a race
    with their own stream). With one GPU here, the current device is made to read as another."""
    module = importlib.import_module("sglang_deft.kernels.tree_decode")
    tree = one_node_tree([0, 1, 2])
    plan = plan_tree_decode(tree, 8, 2, 16, DEVICE, kv_dtype=torch.float16)
    q = torch.randn(2, 8, 16, device=DEVICE, dtype=torch.float16)
    kv = torch.randn(3, 2, 16, device=DEVICE, dtype=torch.float16)
    entered = []

    class Recorded(torch.cuda.device):  # (a subclass: torch checks isinstance against torch.cuda.device)
        def __enter__(self):
            entered.append(self.idx)
            return super().__enter__()

    monkeypatch.setattr(module, "_current_device", lambda: 7)
    monkeypatch.setattr(module.torch.cuda, "device", Recorded)
    out = tree_decode(q, kv, kv, plan, 0.25)
    assert entered == [plan.meta.device.index]
    torch.testing.assert_close(out.float(), attention_reference(q, kv, kv, tree, 0.25).float(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("reference", [attention_reference, tree_decode_reference])
def test_the_references_refuse_what_einsum_would_broadcast(reference):
    """SGLang's CPU decode path, the kernel check's ground truth (grouped) and the tests' (per query): a one-head V
    beside two-head K was read as V's head 0 for both KV heads (einsum broadcasts a size-1 dim), a head_dim-1 V or K
    gave numbers too, a V of fewer slots than K an IndexError with no word of why, and a NaN or infinite cap no cap
    or NaN, where tree_decode refuses them all."""
    tree = one_node_tree([0, 1, 2])
    q, k = torch.randn(2, 4, 16), torch.randn(3, 2, 16)
    for kk, v in ((k, torch.randn(3, 1, 16)), (k, torch.randn(3, 2, 1)), (torch.randn(3, 2, 1), k),
                  (torch.randn(3, 3, 16), torch.randn(3, 3, 16)), (k, torch.randn(2, 2, 16)),
                  (torch.randn(3, 2, 1), torch.randn(3, 2, 1))):  # K and V alike, of head_dim 1
        with pytest.raises(ValueError, match="K and V both .slots, kv heads, head_dim. with q's head_dim"):
            reference(q, kk, v, tree, 0.25)
    for cap in (float("nan"), float("inf"), 1e39):
        with pytest.raises(ValueError, match="a cap finite in float32"):
            reference(q, k, k, tree, 0.25, cap)


def test_the_grouped_reference_writes_only_an_out_like_q():
    """copy_ broadcast a one-query result over every row of a larger out, and rounded to another dtype silently.
    A float32 out is taken for any q: it holds the fp32 result as computed (the kernel check's, on fp16 models)."""
    tree = one_node_tree([0, 1, 2])
    q, k = torch.randn(2, 4, 16), torch.randn(3, 2, 16)
    for out in (torch.full((4, 4, 16), 7.0), torch.full((4, 2, 4, 16), 7.0), torch.empty(2, 4, 16, dtype=torch.float16)):
        with pytest.raises(ValueError, match="out must be like q"):
            tree_decode_reference(q, k, k, tree, 0.25, out=out)
    out = torch.full((2, 4, 16), 7.0)
    assert tree_decode_reference(q, k, k, tree, 0.25, out=out) is out
    torch.testing.assert_close(out, attention_reference(q, k, k, tree, 0.25))
    wide = torch.full((2, 4, 16), 7.0)
    assert tree_decode_reference(q.half(), k.half(), k.half(), tree, 0.25, out=wide) is wide
    torch.testing.assert_close(wide, attention_reference(q.half(), k.half(), k.half(), tree, 0.25))


def test_the_references_cap_scores_as_sglang_defines_it():
    """Both PyTorch references (the tests' ground truth and SGLang's CPU decode path) share one soft-cap helper, so
    a wrong cap there would move the kernels' expected values with it: checked here against the definition,
    cap * tanh(score / cap), on one query over two tokens."""
    tree = one_node_tree([0, 1])  # two queries on it, each given the same q
    q = torch.tensor([[[3.0, 0.0]]] * 2)  # one head of dim 2
    k = torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]])  # scores 3 and -3 at sm_scale 1
    v = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    cap = 2.0
    capped = cap * torch.tanh(torch.tensor([3.0, -3.0]) / cap)
    want = torch.softmax(capped, 0)  # out = p0 * v0 + p1 * v1 = (p0, p1)
    for name, got in [("attention_reference", attention_reference(q, k, v, tree, 1.0, cap)),
                      ("tree_decode_reference", tree_decode_reference(q, k, v, tree, 1.0, cap))]:
        torch.testing.assert_close(got[:, 0].float(), want.expand(2, 2), atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv,large_rows", [(64, 1, 64), (16, 1, 16)], ids=["mqa64_rows64", "gqa16_rows16"])
def test_a_gqa_group_as_large_as_the_large_tile(hq, hkv, large_rows, dtype):
    """A group that fills the large tile exactly (one query per tile, and none fits the small tile)
    is served, not refused: only a group larger than the tile is. (Head dim 128 on a GPU: the Hopper
    kernel's, in bf16/fp16.)"""
    d = 128 if CUDA else 32
    out, ref, _ = run_case(TREES["odd_lengths"], hq, hkv, d, dtype, large_rows=large_rows)
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=0)
    with pytest.raises(ValueError, match="do not fit a tile"):
        plan_tree_decode(TREES["odd_lengths"], 2 * large_rows, 1, 32, device=DEVICE, large_rows=large_rows)


@pytest.mark.parametrize("large_rows", [16, 32])
def test_groups_split_into_query_tiles(large_rows):
    # 24 queries x GQA 4 = 96 rows: several large tiles over one shared node.
    tree = make_tree([-1] + [0] * 24, [150] + [3] * 24, list(range(1, 25)))
    out, ref, _ = run_case(tree, 8, 2, 64, torch.float32, large_rows=large_rows)
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float32], rtol=0)


def test_matches_grouped_pytorch_path():
    out, _, (q, k, v, plan, scale, cap) = run_case(TREES["random_forest"], 8, 2, 64, torch.float32)
    grouped = tree_decode_reference(q, k, v, TREES["random_forest"], scale, cap)
    torch.testing.assert_close(out, grouped, atol=ATOL[torch.float32], rtol=0)
    # a padded batch's extra rows get zeros, as from tree_decode; a q short of the plan's queries is refused
    padded = tree_decode_reference(torch.cat([q, q[:2]]), k, v, TREES["random_forest"], scale, cap)
    torch.testing.assert_close(padded[:len(q)], grouped, atol=0, rtol=0)
    assert not padded[len(q):].any()
    with pytest.raises(ValueError, match=f"q has {len(q) - 1} rows for a plan of {len(q)} queries"):
        tree_decode_reference(q[1:], k, v, TREES["random_forest"], scale, cap)
    with pytest.raises(ValueError, match=f"q has {len(q) - 1} rows for a tree of {len(q)} queries"):
        attention_reference(q[1:], k, v, TREES["random_forest"], scale, cap)  # (was a bare IndexError)


def test_a_nan_score_stays_nan_in_every_path():
    """The grouped reference (SGLang's CPU decode path) gave zeros to every query whose softmax sum was not above 0,
    NaN included: a layer that blew up kept decoding plausible tokens, and the kernel check blamed the kernel."""
    tree = TREES["random_forest"]
    out, _, (q, k, v, plan, scale, cap) = run_case(tree, 8, 2, 64, torch.float32)
    q = q.clone()
    q[1, 0, 0] = float("nan")
    for name, result in [("tree_decode", tree_decode(q, k, v, plan, scale, cap)),
                         ("attention_reference", attention_reference(q, k, v, tree, scale, cap)),
                         ("tree_decode_reference", tree_decode_reference(q, k, v, tree, scale, cap))]:
        assert result[1, 0].isnan().all(), name
        assert not result[0].isnan().any(), name


# fanout_256 takes ~30 s per call in the interpreter, and its 256-query case is in test_tree_shapes;
# random_forest has large and small tiles and up to 7 partials per query.
BIG_TREE = "fanout_256" if CUDA else "random_forest"


def test_deterministic_bitwise():
    out, _, (q, k, v, plan, scale, cap) = run_case(TREES[BIG_TREE], 8, 2, 64, torch.float16)
    again = tree_decode(q, k, v, plan, scale, cap)
    assert torch.equal(out, again)


def test_queries_without_kv_get_zeros_whatever_out_held():
    tree = TREES["empty_paths"]
    out, _, (q, k, v, plan, scale, cap) = run_case(tree, 8, 2, 64, torch.float32)
    again = torch.full_like(out, float("nan"))
    tree_decode(q, k, v, plan, scale, cap, out=again)
    assert torch.equal(again, out)
    assert torch.all(out[[0, 2, 3, 5]] == 0) and torch.all(out[[1, 4, 6]] != 0)


# on the H200, 96, 128 and 256 run the Hopper stage-1 kernel (96 padded to 128), 32 the Triton one
@pytest.mark.parametrize("d", [32, 80, 128] + ([96, 256] if CUDA else []))  # 80 and 96: padded to 128, masked
@pytest.mark.parametrize("name", ["random_forest", "odd_lengths", "empty_paths", "inner_queries"]
                         + (["fanout_256"] if CUDA else []))  # see BIG_TREE
def test_kernels_write_nothing_but_the_output_and_the_partials(name, d):
    """Every buffer the kernels may write sits between canaries, and every one they only read is
    compared after the call: a stray store would corrupt another tensor of the server silently."""
    tree, hq, hkv, pad = TREES[name], 8, 2, 64
    _, ref, (q, k, v, plan, scale, cap) = run_case(tree, hq, hkv, d, torch.float16)
    fill = 1234.5

    def fenced(rows, *shape, dtype):
        whole = torch.full((rows + 2 * pad, *shape), fill, dtype=dtype, device=DEVICE)
        return whole, whole[pad:pad + rows]

    po_whole, po = fenced(plan.partial_out.shape[0], hq, d, dtype=torch.float32)
    lse_whole, lse = fenced(plan.partial_lse.shape[0], hq, dtype=torch.float32)
    out_whole, out = fenced(tree.num_queries, hq, d, dtype=torch.float16)
    plan = dataclasses.replace(plan, partial_out=po, partial_lse=lse)
    read_only = [t.clone() for t in (q, k, v, plan.meta, plan.kv_indices)]
    tree_decode(q, k, v, plan, scale, cap, out=out)
    torch.testing.assert_close(out.float(), ref, atol=ATOL[torch.float16], rtol=0)
    for whole in (po_whole, lse_whole, out_whole):
        assert torch.all(whole[:pad] == fill) and torch.all(whole[-pad:] == fill)
    for before, after in zip(read_only, (q, k, v, plan.meta, plan.kv_indices)):
        assert torch.equal(before, after)


def test_fixed_capacity_plan_replays_with_new_tree():
    """A plan written into fixed buffers serves a later, different tree through the same launch."""
    cap = PlanCapacity(max_queries=16, max_kv_tokens=512, max_items=64, max_partials=256, max_merge=256)
    first = random_forest(12, 10, 30, seed=1)
    second = random_forest(9, 7, 25, seed=2)
    hq, hkv, d = 8, 2, 32
    plan1 = plan_tree_decode(first, hq, hkv, d, device=DEVICE, kv_dtype=torch.float32, capacity=cap)
    plan2 = plan_tree_decode(second, hq, hkv, d, device=DEVICE, kv_dtype=torch.float32, reuse=plan1)
    assert plan2.meta.data_ptr() == plan1.meta.data_ptr()
    assert plan2.kv_indices.data_ptr() == plan1.kv_indices.data_ptr()
    assert (plan2.grid_items, plan2.grid_queries) == (64, 16)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(16, hq, d, generator=g).to(DEVICE)  # padded to capacity, like a CUDA graph
    k = torch.randn(600, hkv, d, generator=g).to(DEVICE)
    v = torch.randn(600, hkv, d, generator=g).to(DEVICE)
    out = torch.full_like(q, 7.0)
    tree_decode(q, k, v, plan2, 0.3, out=out)
    ref = attention_reference(q[:7], k, v, second, 0.3)
    torch.testing.assert_close(out[:7], ref, atol=ATOL[torch.float32], rtol=0)
    assert torch.all(out[7:] == 7.0)  # programs past the device-side count exit untouched


def test_capacity_too_small_is_refused():
    cap = PlanCapacity(max_queries=2, max_kv_tokens=512, max_items=64, max_partials=256, max_merge=256)
    with pytest.raises(ValueError, match="queries"):
        plan_tree_decode(TREES["odd_lengths"], 8, 2, 32, device=DEVICE, capacity=cap)


def test_bad_shapes_are_refused():
    """Each check on its own input (one input failing two checks let either go unnoticed): a q of another head dim
    beside matching K/V was read past its rows (the process died of heap corruption), K/V of twice the plan's heads
    gave finite wrong numbers, and a strided q's every other element was read as its row."""
    tree = TREES["one_node"]
    plan = plan_tree_decode(tree, 8, 2, 32, device=DEVICE)
    kv = torch.randn(128, 2, 32, device=DEVICE)
    q = torch.randn(tree.num_queries, 8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="q has shape .* 8 heads of dim 32"):
        tree_decode(torch.randn(tree.num_queries, 8, 64, device=DEVICE), torch.randn(128, 2, 64, device=DEVICE),
                    torch.randn(128, 2, 64, device=DEVICE), plan, 0.1)
    wide = torch.randn(128, 4, 32, device=DEVICE)
    for k, v in ((wide, wide), (kv, wide), (wide, kv)):
        with pytest.raises(ValueError, match="do not match the plan's 2 KV heads of dim 32"):
            tree_decode(q, k, v, plan, 0.1)
    with pytest.raises(ValueError, match="multiple"):
        plan_tree_decode(tree, 6, 4, 32)
    with pytest.raises(ValueError, match="k/v buffers of 128 and 100 slots: a KV slot indexes both"):
        tree_decode(q, kv, kv[:100], plan, 0.1)
    strided = torch.randn(tree.num_queries, 8, 64, device=DEVICE)[..., ::2]
    skv = torch.randn(128, 2, 64, device=DEVICE)[..., ::2]
    for args in ((strided, kv, kv), (q, skv, kv), (q, kv, skv)):
        with pytest.raises(ValueError, match="need a contiguous last dimension"):
            tree_decode(*args, plan, 0.1)
    tree_decode(q, kv, kv, plan, 0.1)  # the same inputs, well formed, are taken


def test_arguments_the_kernels_cannot_take_are_refused():
    """Each failed inside Triton (an interpreter assertion, a launcher TypeError, a compile error on the GPU) or,
    for an out whose rows share memory, returned every query the last writer's result."""
    import numpy as np

    tree = one_node_tree([0, 1, 2])
    plan = plan_tree_decode(tree, np.int64(8), np.int64(2), np.int64(16), DEVICE, kv_dtype=torch.float32)
    assert type(plan.num_qo_heads) is int
    with pytest.raises(TypeError):
        plan_tree_decode(tree, 8.0, 2, 16, DEVICE)
    q = torch.randn(2, 8, 16, device=DEVICE)
    kv = torch.randn(3, 2, 16, device=DEVICE)
    ref = attention_reference(q, kv, kv, tree, 0.25, 30.0)
    # numpy scalars (SGLang's layers hold floats, but a config may hold numpy's) are taken as Python floats
    out = tree_decode(q, kv, kv, plan, np.float32(0.25), np.float32(30.0))
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float32], rtol=0)
    for cap in (float("inf"), float("nan"), 1e39):  # 1e39 is finite in Python, inf in the kernels' fp32
        with pytest.raises(ValueError, match=re.escape(f"logit_cap {cap}: a cap finite in float32")):
            tree_decode(q, kv, kv, plan, 0.25, cap)
    with pytest.raises(ValueError, match="Stage1Config.kernel 'Hopper': 'triton' or 'hopper'"):
        Stage1Config(32, 32, 4, 2, kernel="Hopper")  # a misspelt kernel ran the Triton one
    for n in (0, 8, 24):  # failed inside Triton (arange's power of two; tl.dot's least dim on a GPU)
        with pytest.raises(ValueError, match=f"Stage1Config.block_n_small {n}: a power of two >= 16"):
            Stage1Config(32, n, 4, 2)
    # The Hopper kernel masks past-the-end tokens to -inf before it scales: a scale of 0 made them NaN, a negative
    # one +inf; scales past fp32's range failed to compile
    # 2.5e38 is finite in fp32, but not times log2(e), as the kernels scale (the interpreter failed on fp64 x fp32)
    for scale in (0.0, -0.25, float("nan"), float("inf"), 1e-45, 1e39, 2.5e38):
        with pytest.raises(ValueError, match=re.escape(f"sm_scale {scale} (x k_scale 1.0) and v_scale 1.0: positive")):
            tree_decode(q, kv, kv, plan, scale)
    with pytest.raises(ValueError, match="and v_scale 0.0: positive"):
        tree_decode(q, kv, kv, plan, 0.25, v_scale=0.0)
    with pytest.raises(TypeError):  # a float size reached schedule.c's ctypes call ("wrong type")
        PlanCapacity(4.0, 64, 32, 64, 64)
    assert PlanCapacity(np.int64(4), 64, 32, 64, 64).max_queries == 4
    with pytest.raises(TypeError, match="sm_scale must be a Python number, not a tensor"):
        tree_decode(q, kv, kv, plan, torch.tensor(0.25, device=DEVICE))
    for dtype in (torch.int32, torch.float64):
        with pytest.raises(ValueError, match=f"q in {dtype}: the kernels compute in"):
            tree_decode(q.to(dtype), kv.to(dtype), kv.to(dtype), plan, 0.25)
    with pytest.raises(ValueError, match=r"q must be \[queries, heads, head_dim\]"):
        tree_decode(q.view(2, 128), kv, kv, plan, 0.25)
    # expanded; row 1 starting inside row 0 (torch's own overlap check cannot tell that one); heads overlapping
    flat = torch.zeros(4096, device=DEVICE)
    for bad in (flat[:128].view(1, 8, 16).expand(2, 8, 16), flat.as_strided((2, 8, 16), (64, 16, 1)),
                flat.as_strided((2, 8, 16), (128, 1, 1))):
        with pytest.raises(ValueError, match="may let .query, head. rows share memory"):
            tree_decode(q, kv, kv, plan, 0.25, out=bad)
    # padded rows and a slice of a wider head dim are valid non-contiguous outs
    for good in (flat.as_strided((2, 8, 16), (256, 16, 1)), torch.zeros(2, 8, 32, device=DEVICE)[..., 8:24],
                 torch.zeros(8, 2, 16, device=DEVICE).transpose(0, 1)):
        torch.testing.assert_close(tree_decode(q, kv, kv, plan, 0.25, 30.0, out=good), ref,
                                   atol=ATOL[torch.float32], rtol=0)


@pytest.mark.skipif(CUDA, reason="the interpreter's limits, on CPU tensors")
def test_what_the_interpreter_cannot_compute_is_refused(monkeypatch):
    """bf16 under Triton's interpreter came back off by orders of magnitude, with no error; CPU tensors without the
    interpreter died in Triton with '0 active drivers'."""
    module = importlib.import_module("sglang_deft.kernels.tree_decode")  # the package's name is the function's
    tree = one_node_tree([0, 1, 2])
    plan = plan_tree_decode(tree, 8, 2, 16, DEVICE, kv_dtype=torch.bfloat16)
    q = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    kv = torch.randn(3, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="interpreter computes a bf16 tl.dot wrongly; use float16 or float32"):
        tree_decode(q, kv, kv, plan, 0.25)
    # GPU tensors under the interpreter (TRITON_INTERPRET=1 left set on a GPU host) run on host copies, as wrong.
    gpu = torch.device("cuda", 0)
    assert "cuda:0 tensors under TRITON_INTERPRET=1" in module.interpreter_refusal(gpu, torch.bfloat16)
    assert module.interpreter_refusal(gpu, torch.float16) is None
    monkeypatch.setattr(module, "interpreted", lambda: False)
    assert module.interpreter_refusal(gpu, torch.bfloat16) is None
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1 before importing sglang_deft"):
        tree_decode(q.float(), kv.float(), kv.float(), plan, 0.25)


def one_node_tree(slots: list[int]) -> KVTree:
    return KVTree(torch.tensor(slots, dtype=torch.int32), torch.tensor([0, len(slots)], dtype=torch.int32),
                  torch.tensor([-1], dtype=torch.int32), torch.tensor([0, 0], dtype=torch.int32))


def test_kv_slot_ids_outside_the_buffers_are_refused():
    """The kernels gather K/V at the slot ids unchecked: ids that came on the host are checked by the plan
    (negative ones) and by tree_decode against the buffers (too large), without a sync; before, slot 11 of
    an 8-slot buffer was read past its end and the result returned."""
    bad = one_node_tree([0, 1, 11])
    plan = plan_tree_decode(bad, 8, 2, 16, DEVICE, kv_dtype=torch.float32)
    assert plan.max_kv_slot == 11
    q = torch.randn(2, 8, 16, device=DEVICE)
    kv = torch.randn(8, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="kv_indices holds slot 11, outside the KV buffers' 8 slots"):
        tree_decode(q, kv, kv, plan, 0.25)
    kv = torch.randn(12, 2, 16, device=DEVICE)
    torch.testing.assert_close(tree_decode(q, kv, kv, plan, 0.25), attention_reference(q, kv, kv, bad, 0.25),
                               atol=ATOL[torch.float32], rtol=0)
    with pytest.raises(ValueError, match="kv_indices holds slot -1: KV slot ids must be >= 0"):
        plan_tree_decode(one_node_tree([0, -1, 2]), 8, 2, 16, DEVICE, kv_dtype=torch.float32)
    # Fixed buffers: the check follows the step they hold, whichever plan object tree_decode is given.
    cap = PlanCapacity(max_queries=4, max_kv_tokens=16, max_items=32, max_partials=64, max_merge=64)
    old = plan_tree_decode(one_node_tree([0, 1, 2]), 8, 2, 16, DEVICE, kv_dtype=torch.float32, capacity=cap)
    plan_tree_decode(one_node_tree([0, 1, 11]), 8, 2, 16, kv_dtype=torch.float32, reuse=old)
    with pytest.raises(ValueError, match="holds slot 11"):
        tree_decode(q, kv[:8], kv[:8], old, 0.25)
    if CUDA:  # ids already on the device are not checked: that would need a sync on every layer
        assert plan_tree_decode(dataclasses.replace(bad, kv_indices=bad.kv_indices.cuda()), 8, 2, 16,
                                kv_dtype=torch.float32).max_kv_slot is None


@pytest.mark.parametrize("with_capacity", [False, True])
def test_host_kv_indices_are_copied_when_planned(with_capacity):
    """Host slot ids are the plan's own once planned: a CPU plan held the caller's tensor (its slot bound, checked at
    plan time, then covered ids the caller wrote later: slot 10**6 was gathered from a 12-slot buffer), and a CUDA
    plan copied them later than plan() returned (non_blocking from the caller's memory) or with a wait for the device."""
    tree = one_node_tree([0, 1, 11])
    original = tree.kv_indices.clone()
    cap = PlanCapacity(max_queries=4, max_kv_tokens=16, max_items=32, max_partials=64, max_merge=64)
    plan = plan_tree_decode(tree, 8, 2, 16, DEVICE, kv_dtype=torch.float32, capacity=cap if with_capacity else None)
    tree.kv_indices[2] = 10**6  # the caller reuses its tensor for the next step at once
    assert plan.kv_indices.untyped_storage().data_ptr() != tree.kv_indices.untyped_storage().data_ptr()
    assert plan.kv_indices[:3].tolist() == original.tolist()
    q = torch.randn(2, 8, 16, device=DEVICE)
    kv = torch.randn(12, 2, 16, device=DEVICE)
    expected = attention_reference(q, kv, kv, one_node_tree(original.tolist()), 0.25)
    torch.testing.assert_close(tree_decode(q, kv, kv, plan, 0.25), expected, atol=ATOL[torch.float32], rtol=0)


def test_head_offsets_past_int32_are_refused():
    """A head's offset (head x head stride) is int32 in the kernels: a head-major view of a buffer past 2^31
    elements would wrap it. Meta tensors stand for such buffers (8 GiB each) without their memory."""
    from sglang_deft.kernels.tree_decode import _check_head_offsets
    q = torch.empty(4, 8, 128, device="meta")
    kv = torch.empty(1 << 22, 8, 128, device="meta")
    _check_head_offsets(q, kv, kv, q)  # SGLang's [S, H, D] layout, 2^32 elements: the head stride is D
    head_major = torch.empty(8, 1 << 22, 128, device="meta").transpose(0, 1)
    with pytest.raises(ValueError, match=r"v_buffer has head stride 536870912 over 8 heads"):
        _check_head_offsets(q, kv, head_major, q)


def test_rows_past_the_step_are_zeros_in_an_out_made_by_tree_decode():
    cap = PlanCapacity(max_queries=8, max_kv_tokens=16, max_items=32, max_partials=64, max_merge=64)
    tree = one_node_tree([0, 1, 2, 3])
    plan = plan_tree_decode(tree, 8, 2, 16, DEVICE, kv_dtype=torch.float32, capacity=cap)
    q = torch.randn(5, 8, 16, device=DEVICE)  # a graph's padded batch: 2 queries of the step, 3 rows past it
    kv = torch.randn(4, 2, 16, device=DEVICE)
    out = tree_decode(q, kv, kv, plan, 0.25)
    torch.testing.assert_close(out[:2], attention_reference(q[:2], kv, kv, tree, 0.25), atol=ATOL[torch.float32],
                               rtol=0)
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))


def test_strided_kv_indices_are_read_as_given():
    """kv_indices as a view with stride 2 (every other slot of a bigger tensor): the plan takes a
    contiguous copy, since the kernels index it as contiguous (before, it kept the view: error 1.8)."""
    strided = torch.arange(0, 80, dtype=torch.int32)[::2]
    tree = KVTree(strided, torch.tensor([0, 12, 40], dtype=torch.int32), torch.tensor([-1, 0], dtype=torch.int32),
                  torch.tensor([1, 0], dtype=torch.int32))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, 32, generator=g).to(DEVICE) for n, h in ((2, 8), (80, 2), (80, 2)))
    plan = plan_tree_decode(tree, 8, 2, 32, device=DEVICE, kv_dtype=torch.float32)
    torch.testing.assert_close(tree_decode(q, k, v, plan, 0.2), attention_reference(q, k, v, tree, 0.2),
                               atol=ATOL[torch.float32], rtol=0)


def test_a_plan_is_checked_against_the_step_its_buffers_hold():
    """After reuse=, the earlier plan object's host fields (num_queries) describe a step its buffers no
    longer hold: tree_decode sized its checks of q and out by them while the kernels read the new device
    counts, and wrote rows past out. The checks now use the step the buffers hold; a captured graph's plan
    still runs a later step of its own size (what a replay computes)."""
    small = KVTree(torch.arange(6, dtype=torch.int32), torch.tensor([0, 4, 6], dtype=torch.int32),
                   torch.tensor([-1, 0], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32))
    big = KVTree(torch.arange(10, dtype=torch.int32), torch.tensor([0, 4, 10], dtype=torch.int32),
                 torch.tensor([-1, 0], dtype=torch.int32), torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.int32))
    same_size = KVTree(torch.arange(9, dtype=torch.int32), torch.tensor([0, 5, 9], dtype=torch.int32),
                       torch.tensor([-1, 0], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32))
    cap = PlanCapacity(max_queries=8, max_kv_tokens=16, max_items=32, max_partials=64, max_merge=64)
    old = plan_tree_decode(small, 8, 2, 16, DEVICE, kv_dtype=torch.float32, capacity=cap)
    new = plan_tree_decode(big, 8, 2, 16, kv_dtype=torch.float32, reuse=old)
    assert new.meta.data_ptr() == old.meta.data_ptr() and old.buffered_queries == new.buffered_queries == 6
    kv = torch.randn(10, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="the plan's buffers hold a step of 6 queries"):
        tree_decode(torch.randn(2, 8, 16, device=DEVICE), kv, kv, old, 0.25)
    q = torch.randn(6, 8, 16, device=DEVICE)
    torch.testing.assert_close(tree_decode(q, kv, kv, new, 0.25), attention_reference(q, kv, kv, big, 0.25),
                               atol=ATOL[torch.float32], rtol=0)
    # A plan whose stage 2 covers fewer queries than the buffers hold (plan_graph_step's grid: a graph of 4)
    # would leave the last rows of out unwritten.
    with pytest.raises(ValueError, match="hold a step of 6 queries, but this plan launches stage 2 for 4"):
        tree_decode(q, kv, kv, dataclasses.replace(new, grid_queries=4), 0.25)
    # A refused reuse (here: a tree past the capacity) writes nothing: the buffers keep their step.
    with pytest.raises(ValueError, match="more than the plan capacity"):
        plan_tree_decode(KVTree(torch.arange(20, dtype=torch.int32), torch.tensor([0, 20], dtype=torch.int32),
                                torch.tensor([-1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)),
                         8, 2, 16, kv_dtype=torch.float32, reuse=new)
    assert new.buffered_queries == 6
    # A later step of the first plan's size: the first plan computes it, as a graph captured with it would.
    plan_tree_decode(same_size, 8, 2, 16, kv_dtype=torch.float32, reuse=new)
    q = torch.randn(2, 8, 16, device=DEVICE)
    torch.testing.assert_close(tree_decode(q, kv, kv, old, 0.25), attention_reference(q, kv, kv, same_size, 0.25),
                               atol=ATOL[torch.float32], rtol=0)


def test_a_tree_given_as_a_view_of_the_plan_buffers_is_read_as_given(monkeypatch):
    """reuse= with kv_indices that are a strided (or shifted) view of the reused buffers: only their address was
    compared, so a strided view was taken as the tree built in place and the kernels read the buffer's first T
    entries (error 0.79); a shifted one failed in copy_ after the buffers were marked as holding the new step, and
    tree_decode then returned rows nobody wrote. A write that fails half-way now leaves the buffers refused."""
    cap = PlanCapacity(max_queries=4, max_kv_tokens=64, max_items=32, max_partials=64, max_merge=64)
    first_tree = one_node_tree(list(range(40)))
    first = plan_tree_decode(first_tree, 8, 2, 16, DEVICE, kv_dtype=torch.float32, capacity=cap)
    kv = torch.randn(64, 2, 16, device=DEVICE)
    q = torch.randn(2, 8, 16, device=DEVICE)
    planner = kernel_plan.TreeDecodePlanner(8, 2, 16, kv_dtype=torch.float32)
    for view in (first.kv_indices[:40:2], first.kv_indices[1:33]):  # host-side trees: their values as given
        tree = KVTree(view.clone().cpu(), torch.tensor([0, view.numel()], dtype=torch.int32),
                      torch.tensor([-1], dtype=torch.int32), torch.tensor([0, 0], dtype=torch.int32))
        want = attention_reference(q, kv, kv, tree, 0.25)
        planner.plan(dataclasses.replace(tree, kv_indices=view), first.meta.device, reuse=first)
        torch.testing.assert_close(tree_decode(q, kv, kv, first, 0.25), want, atol=ATOL[torch.float32], rtol=0)
        planner.plan(first_tree, first.meta.device, reuse=first)  # the buffers as the next view expects them
    monkeypatch.setattr(planner, "_upload", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("copy failed")))
    with pytest.raises(RuntimeError, match="copy failed"):
        planner.plan(one_node_tree([5, 6, 7]), first.meta.device, reuse=first)
    with pytest.raises(ValueError, match="the plan's buffers hold no step: the last plan written into them failed"):
        tree_decode(q, kv, kv, first, 0.25)


def test_q_and_out_are_checked_against_the_plan():
    """Stage 1 reads q's rows of the plan's queries and stage 2 writes out's: too few rows, or an out
    of another shape, layout or dtype, would read or write past them or truncate into it (before, all were
    accepted)."""
    tree = TREES["odd_lengths"]  # 4 queries
    plan = plan_tree_decode(tree, 8, 2, 32, device=DEVICE, kv_dtype=torch.float32)
    q = torch.randn(4, 8, 32, device=DEVICE)
    kv = torch.randn(512, 2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="the plan's buffers hold a step of 4 queries"):
        tree_decode(q[:1], kv, kv, plan, 0.1)
    for out in (torch.empty(1, 8, 32, device=DEVICE), torch.empty(4, 16, 32, device=DEVICE),
                torch.empty(4, 32, 8, device=DEVICE).transpose(1, 2),
                torch.empty(4, 8, 32, dtype=torch.int32, device=DEVICE)):  # was truncated into
        with pytest.raises(ValueError, match="out must be like q"):
            tree_decode(q, kv, kv, plan, 0.1, out=out)


@pytest.mark.parametrize("name", sorted({"random_forest", BIG_TREE}))
def test_separate_launches_compute_the_same(name):
    """Large and small tiles in two launches give bitwise the unified launch's output."""
    _, _, (q, k, v, plan, scale, cap) = run_case(TREES[name], 8, 2, 64, torch.float16)
    assert plan.counts[0] > 0 and plan.counts[1] > 0  # both launches have work
    cfg = stage1_config(64, plan.large_rows)  # without dtype and device: the Triton kernel
    assert cfg.kernel == "triton"
    unified = tree_decode(q, k, v, plan, scale, cap, config=cfg)
    split = tree_decode(q, k, v, plan, scale, cap, config=dataclasses.replace(cfg, separate_launches=True))
    assert torch.equal(unified, split)


@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128, 160, 192, 256])
def test_triton_kv_blocks_fit_the_padded_head_dim(head_dim):
    """The Triton kernel loads rows padded to a power of two: its K/V blocks hold no more elements at any head
    dim than at 128 (32 tokens x 128), so head dim 192 (256-wide rows) stages what 256 does, not twice that."""
    for large_rows in (64, 128):
        cfg = stage1_config(head_dim, large_rows)
        for block_n in (cfg.block_n_large, cfg.block_n_small):
            assert block_n >= 16 and block_n * triton.next_power_of_2(head_dim) <= 32 * 128


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_both_stage2_shapes_merge_long_paths(dtype):
    """Stage 2 runs 32 partials per load on 4 warps when the step has at most one merge per SM, else 8 on
    one warp; on the deep chain (up to 64 partials per query, several loads either way) both shapes
    match the reference, each is repeatable bitwise, and the rule picks by the launch grid."""
    out, ref, (q, k, v, plan, scale, cap) = run_case(TREES["deep_chain_64"], 8, 2, 64, dtype)
    outs = {}
    for threshold in (plan.grid_queries - 1, plan.grid_queries):
        p = dataclasses.replace(plan, few_merges_max_queries=threshold)
        outs[stage2_shape(p)] = [tree_decode(q, k, v, p, scale, cap) for _ in range(2)]
    assert set(outs) == {STAGE2_SHAPE, STAGE2_SHAPE_FEW_MERGES}
    for first, again in outs.values():
        torch.testing.assert_close(first.float(), ref, atol=ATOL[dtype], rtol=0)
        assert torch.equal(first, again)
    assert int(plan.merge_indptr.diff().max()) > STAGE2_SHAPE_FEW_MERGES[0]  # more than one load per merge


HOPPER = CUDA and stage1_config(128, 64, torch.bfloat16, torch.device(DEVICE)).kernel == "hopper"


def test_h200_runs_the_hopper_kernel():
    """On an H200 with a Triton it was built for, the default path must be the Gluon kernel, so
    that the GPU run of this file tests it rather than silently the Triton one."""
    if not CUDA or torch.cuda.get_device_capability() != (9, 0) or not triton.__version__.startswith(("3.5.", "3.6.")):
        pytest.skip("needs sm_90 and Triton 3.5 or 3.6")
    assert HOPPER


@pytest.mark.skipif(not HOPPER, reason="needs the Hopper stage-1 kernel (sm_90, Triton 3.5 or 3.6)")
@pytest.mark.parametrize("small_wgmma", [False, True], ids=["mma_sync", "wgmma"])
@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float16, None), (torch.bfloat16, None),
                                            (torch.bfloat16, torch.float8_e4m3fn)], ids=["fp16", "bf16", "bf16_e4m3"])
@pytest.mark.parametrize("name,hq,hkv,d,cap", [("random_forest", 8, 2, 128, 0.0), ("odd_lengths", 16, 2, 128, 2.0),
                                               ("inner_queries", 4, 4, 64, 0.0), ("fanout_256", 28, 4, 128, 0.0),
                                               ("random_forest", 8, 4, 256, 0.0), ("odd_lengths", 32, 32, 96, 0.0)])
def test_hopper_small_tiles_on_either_mma(name, hq, hkv, d, cap, dtype, kv_dtype, small_wgmma):
    """The Hopper kernel's small tiles (16 rows) run on mma.sync where Gluon has it (Triton 3.6) and, where it
    has not (Triton 3.5, what ``pip install sglang==0.5.10.post1`` brings), as a large tile's wgmma with the rows
    past the item's queries masked. Both paths, wherever this Triton compiles them, against the fp32 reference."""
    from sglang_deft.kernels import stage1_hopper
    from sglang_deft.kernels.tree_decode import launch_stage2
    if not small_wgmma and stage1_hopper.SMALL_TILES_ON_WGMMA:
        pytest.skip(f"Triton {triton.__version__}'s Gluon has no mma.sync")
    tree = TREES[name]
    if kv_dtype is None:
        _, ref, (q, k, v, plan, scale, cap) = run_case(tree, hq, hkv, d, dtype, logit_cap=cap, seed=7)
    else:
        q, k, v, plan = fp8_case(tree, hq, hkv, d, dtype, kv_dtype, seed=7)
        scale = d ** -0.5
        ref = attention_reference(q, k, v, tree, scale, cap)
    assert int(plan.counts[1]) > 0  # the tree has small items
    out = torch.full_like(q, float("nan"))
    stage1_hopper.launch(q, k, v, plan, scale, cap, 16, small_wgmma=small_wgmma)
    launch_stage2(plan, out)
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=0)


@pytest.mark.skipif(not HOPPER, reason="needs the Hopper stage-1 kernel (sm_90, Triton 3.5 or 3.6)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,hq,hkv,d,cap", [("random_forest", 8, 2, 128, 0.0), ("fanout_256", 32, 8, 128, 0.0),
                                               ("deep_chain_64", 16, 2, 64, 0.0), ("inner_queries", 4, 4, 128, 2.0),
                                               ("odd_lengths", 16, 2, 128, 0.0), ("random_forest", 8, 4, 256, 0.0),
                                               ("inner_queries", 4, 4, 256, 2.0), ("fanout_256", 16, 8, 256, 0.0),
                                               ("random_forest", 32, 32, 96, 0.0), ("inner_queries", 8, 2, 80, 2.0),
                                               ("fanout_256", 32, 8, 96, 0.0),
                                               # GQA groups that do not divide the tiles: 7 (Qwen2.5-7B's 28 / 4
                                               # heads), 5 (40 / 8), and 64 (large tiles only: above 16 rows)
                                               ("random_forest", 28, 4, 128, 0.0), ("odd_lengths", 40, 8, 128, 2.0),
                                               ("fanout_256", 64, 1, 64, 0.0),
                                               # a cap far above the scores: tanh by its series
                                               ("inner_queries", 8, 2, 128, 1e6)])
def test_hopper_kernel_matches_triton_kernel(name, hq, hkv, d, cap, dtype):
    hopper, ref, (q, k, v, plan, scale, cap) = run_case(TREES[name], hq, hkv, d, dtype, logit_cap=cap)
    assert stage1_config(d, plan.large_rows, dtype, q.device).kernel == "hopper"
    portable = tree_decode(q, k, v, plan, scale, cap, config=stage1_config(d, plan.large_rows))
    torch.testing.assert_close(hopper.float(), ref, atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(hopper.float(), portable.float(), atol=ATOL[dtype], rtol=0)


def test_hopper_kernel_refuses_what_it_does_not_serve():
    """Asked for explicitly where it cannot run, the Hopper kernel says why instead of falling back."""
    _, _, (q, k, v, plan, scale, cap) = run_case(TREES["one_node"], 8, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="Hopper stage-1 kernel does not serve"):
        tree_decode(q, k, v, plan, scale, cap, config=HOPPER_CONFIG)
    with pytest.raises(ValueError, match="K and V need one dtype, q's or an fp8 one"):
        tree_decode(q.half(), k, v, plan, scale, cap, config=HOPPER_CONFIG)
    fp8 = k.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="K and V need one dtype"):
        tree_decode(q.half(), fp8, v.to(torch.float8_e5m2), plan, scale, cap)
    if HOPPER:  # on the H200 an fp8 cache goes to the Hopper kernel too
        assert stage1_config(64, plan.large_rows, torch.float16, q.device, fp8.dtype).kernel == "hopper"


@pytest.mark.skipif(not HOPPER, reason="needs the Hopper stage-1 kernel (sm_90, Triton 3.5 or 3.6)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("name,hq,hkv,d,cap,scales", [("random_forest", 8, 2, 128, 0.0, (1.0, 1.0)),
                                                      ("fanout_256", 32, 8, 128, 0.0, (0.5, 2.0)),
                                                      ("deep_chain_64", 16, 2, 64, 0.0, (2.0, 0.25)),
                                                      ("inner_queries", 4, 4, 128, 2.0, (1.0, 1.0)),
                                                      ("odd_lengths", 16, 2, 128, 0.0, (0.5, 2.0)),
                                                      ("random_forest", 8, 4, 256, 0.0, (2.0, 0.25)),
                                                      ("fanout_256", 16, 8, 256, 0.0, (1.0, 1.0)),
                                                      ("random_forest", 32, 32, 96, 0.0, (0.5, 2.0)),
                                                      ("inner_queries", 8, 2, 80, 2.0, (1.0, 1.0))])
def test_hopper_kernel_reads_an_fp8_kv_cache(name, hq, hkv, d, cap, scales, kv_dtype, dtype):
    """The Hopper kernel converts an fp8 cache's blocks to q's dtype (large tiles in shared memory, small
    tiles in registers): against the fp32 reference and the portable Triton kernel on both tile kinds, head
    dims 64-256 (96 and 80 padded), with the layer's scales."""
    tree = TREES[name]
    q, k, v, plan = fp8_case(tree, hq, hkv, d, dtype, kv_dtype, seed=5)
    k_scale, v_scale = scales
    assert stage1_config(d, plan.large_rows, dtype, q.device, kv_dtype).kernel == "hopper"
    out = tree_decode(q, k, v, plan, d ** -0.5, cap, k_scale=k_scale, v_scale=v_scale)
    portable = tree_decode(q, k, v, plan, d ** -0.5, cap, config=stage1_config(d, plan.large_rows),
                           k_scale=k_scale, v_scale=v_scale)
    ref = attention_reference(q, k, v, tree, d ** -0.5, cap, k_scale=k_scale, v_scale=v_scale)
    atol = ATOL[dtype] * max(1.0, v_scale)
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)
    torch.testing.assert_close(out.float(), portable.float(), atol=atol, rtol=0)
    assert torch.equal(out, tree_decode(q, k, v, plan, d ** -0.5, cap, k_scale=k_scale, v_scale=v_scale))


def test_e4m3_is_refused_before_sm_89(monkeypatch):
    """tree_decode names the reason instead of Triton failing to compile fp8e4nv at the first launch."""
    module = importlib.import_module("sglang_deft.kernels.tree_decode")  # the package exports the function
    tree = TREES["odd_lengths"]
    q, k, v, plan = fp8_case(tree, 8, 2, 64, torch.float16, torch.float8_e4m3fn, seed=3)
    monkeypatch.setattr(module, "kv_dtype_unsupported_on", lambda kv_dtype, device: "a float8_e4m3fn KV cache on X")
    with pytest.raises(ValueError, match="tree_decode cannot read a float8_e4m3fn KV cache on X"):
        tree_decode(q, k, v, plan, 64 ** -0.5)


@pytest.mark.parametrize("capability, refused", [((8, 0), True), ((8, 6), True), ((8, 9), False), ((9, 0), False)])
def test_the_e4m3_rule_follows_the_gpus_capability(monkeypatch, capability, refused):
    """The sm_89 rule itself (the test above replaces it), with the capability torch would report."""
    module = importlib.import_module("sglang_deft.kernels.tree_decode")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    rule = module.kv_dtype_unsupported_on.__wrapped__  # (past its per-process cache, which the mocks would fill)
    why = rule(torch.float8_e4m3fn, torch.device("cuda", 0))
    assert (why is not None) == refused
    if refused:
        assert f"GPU X (sm_{capability[0]}{capability[1]})" in why
    assert rule(torch.float8_e5m2, torch.device("cuda", 0)) is None


def test_both_kernel_modules_take_the_same_fp8_caches():
    from sglang_deft.kernels import stage1_hopper
    from sglang_deft.kernels.tree_decode import FP8_KV_DTYPES
    assert stage1_hopper.FP8_KV_DTYPES == FP8_KV_DTYPES


def test_both_kernels_take_the_caps_float32_can_hold():
    """Each kernel's cap scalars reach it as normal float32 numbers (or 0: no cap), for every cap and scale
    tree_decode lets through; the Hopper kernel's refusal is tree_decode's (``cap_scale_refusal``)."""
    import importlib

    from sglang_deft.kernels import stage1_hopper
    portable = importlib.import_module("sglang_deft.kernels.tree_decode")  # the module: the package's name is the call
    fp32_max, tiny = portable._FP32_MAX, 2.0 ** -126
    refused = 0
    for cap in (1e-30, 0.5, 50.0, 1e8, 2.0 ** 126, 3e38, fp32_max):
        for sm_scale in (1e-30, 0.088, 1.0, 10.0, 1e30):
            if portable.cap_scale_refusal(cap, sm_scale) is not None:
                refused += 1
                with pytest.raises(ValueError, match="logit_cap .* with sm_scale .*: .* in float32"):
                    stage1_hopper._cap_scalars(cap, sm_scale)
                continue
            cap_scale, cap_clamp = portable.soft_cap_scalars(cap, sm_scale)
            assert cap_scale == 0.0 or tiny <= cap_scale <= fp32_max
            assert tiny <= cap_clamp <= fp32_max
            scale, mul = stage1_hopper._cap_scalars(cap, sm_scale)
            if sm_scale / cap < tiny:
                assert (scale, mul) == (0.0, 0.0)  # launched uncapped
            else:
                assert (scale, mul) == (sm_scale / cap, cap * 1.4426950408889634) and mul <= fp32_max
    assert refused == 5  # past float32: sm_scale / cap (1e30 / 1e-30) or cap x log2(e) (3e38, max; at 10 and 1e30)
    assert portable.soft_cap_scalars(0.0, 0.088) == stage1_hopper._cap_scalars(0.0, 0.088) == (0.0, 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("name,hq,hkv,d,cap,scales", [("odd_lengths", 8, 2, 64, 0.0, (1.0, 1.0)),
                                                      ("inner_queries", 8, 2, 128, 0.0, (0.5, 2.0)),
                                                      ("forest", 16, 2, 64, 5.0, (2.0, 0.25))])
def test_fp8_kv_cache(name, hq, hkv, d, cap, scales, kv_dtype, dtype):
    """An fp8 KV cache (SGLang's --kv-cache-dtype fp8_e4m3 / fp8_e5m2): K and V read as stored, standing
    for their values times the layer's scales, computed in q's dtype (exact: fp8 converts to fp16 and bf16
    without rounding), so the error is that of the dtype's own path."""
    if kv_dtype == torch.float8_e4m3fn and CUDA and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("Triton compiles float8_e4m3fn for sm_89+ only (tree_decode refuses it here: "
                    "test_e4m3_is_refused_before_sm_89)")
    tree = TREES[name]
    q, k, v, plan = fp8_case(tree, hq, hkv, d, dtype, kv_dtype, seed=3)
    k_scale, v_scale = scales
    out = tree_decode(q, k, v, plan, d ** -0.5, cap, k_scale=k_scale, v_scale=v_scale)
    ref = attention_reference(q, k, v, tree, d ** -0.5, cap, k_scale=k_scale, v_scale=v_scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype] * max(1.0, v_scale), rtol=0)
    grouped = tree_decode_reference(q, k, v, tree, d ** -0.5, cap, k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(grouped.float(), ref, atol=ATOL[dtype] * max(1.0, v_scale), rtol=0)
    with pytest.raises(ValueError, match="apply to an fp8 KV cache"):
        tree_decode(q, k.to(dtype), v.to(dtype), plan, d ** -0.5, cap, k_scale=k_scale, v_scale=2 * v_scale)


@pytest.mark.parametrize("capability,version,dtype,d,rows,why", [
    ((9, 0), "3.6.0", torch.bfloat16, 128, 64, None),
    ((9, 0), "3.6.0", (torch.bfloat16, torch.float8_e4m3fn), 128, 64, None),
    ((9, 0), "3.6.0", (torch.float16, torch.float8_e5m2), 64, 64, None),
    ((9, 0), "3.6.0", (torch.bfloat16, torch.float16), 128, 64, "float16 KV cache for torch.bfloat16 queries"),
    ((9, 0), "3.6.0", (torch.float32, torch.float8_e4m3fn), 128, 64, "float16 or bfloat16"),
    ((9, 0), "3.6.1", torch.float16, 64, 64, None),
    ((9, 0), "3.5.1", torch.bfloat16, 128, 64, None),  # pip's sglang==0.5.10.post1 (torch 2.9.1)
    ((9, 0), "3.4.0", torch.bfloat16, 128, 64, "Triton 3.4.0"),
    ((9, 0), "3.9.0", torch.bfloat16, 128, 64, "Triton 3.9.0"),
    ((8, 0), "3.6.0", torch.bfloat16, 128, 64, "needs sm_90"),
    ((10, 0), "3.6.0", torch.bfloat16, 128, 64, "needs sm_90"),
    ((9, 0), "3.6.0", torch.float32, 128, 64, "float16 or bfloat16"),
    ((9, 0), "3.6.0", torch.bfloat16, 256, 64, None),
    ((9, 0), "3.6.0", torch.float16, 96, 64, None),
    ((9, 0), "3.6.0", torch.bfloat16, 32, 64, "head_dim 32"),
    ((9, 0), "3.6.0", torch.bfloat16, 128, 32, "32 rows"),
])
def test_hopper_kernel_serves_only_what_it_was_built_for(monkeypatch, capability, version, dtype, d, rows, why):
    from sglang_deft.kernels import stage1_hopper
    monkeypatch.setattr(stage1_hopper.triton, "__version__", version)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dtype, kv_dtype = dtype if isinstance(dtype, tuple) else (dtype, None)
    reason = stage1_hopper.unsupported_reason(torch.device("cuda", 0), dtype, d, rows, kv_dtype)
    assert reason is None if why is None else why in reason
    assert stage1_hopper.unsupported_reason(torch.device("cpu"), dtype, d, rows, kv_dtype) == "not a CUDA device"
    # ROCm's torch calls its devices "cuda" too, and an MI200 reports capability (9, 0)
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    assert "a ROCm device" in stage1_hopper.unsupported_reason(torch.device("cuda", 0), dtype, d, rows, kv_dtype)


class ShortOfSharedMemory:
    """Stands in for the Triton stage-1 kernel on a GPU whose shared memory holds the kernel's shape with at most
    ``fits_stages`` pipeline stages (0: none), as fp32 at head_dim 256 on sm_86/sm_89 (100.3 KB of their 99 KB with
    the default 3 stages, 86.2 KB with one: benchmarks/results/stage1_shared_memory_triton36.md); launches that fit
    run the real kernel."""

    def __init__(self, kernel, fits_stages: int):
        self.kernel, self.fits_stages, self.stages = kernel, fits_stages, []

    def __getitem__(self, grid):
        from triton.runtime.errors import OutOfResources

        def launch(*args, **kwargs):
            self.stages.append(kwargs["num_stages"])
            if kwargs["num_stages"] > self.fits_stages:
                raise OutOfResources(102720, 101376, "shared memory")
            return self.kernel[grid](*args, **kwargs)
        return launch


def short_of_shared_memory(monkeypatch, fits_stages: int):
    """(the tree_decode module, its stage-1 kernel replaced by a ShortOfSharedMemory), with no shape yet known to
    need one stage."""
    module = importlib.import_module("sglang_deft.kernels.tree_decode")  # the package's name is the function's
    short = ShortOfSharedMemory(module._tree_decode_stage1, fits_stages)
    monkeypatch.setattr(module, "_tree_decode_stage1", short)
    monkeypatch.setattr(module, "_SHALLOW_STAGES", {})
    return module, short


def test_a_gpu_short_of_shared_memory_for_the_pipeline_runs_one_stage(monkeypatch, caplog):
    """The Triton kernel's shape comes from the head dim and tiles, not from the GPU: fp32 at head_dim 256 failed at
    its first launch on a GPU with 99 KB of shared memory per block. One stage fits there, once per shape."""
    module, short = short_of_shared_memory(monkeypatch, fits_stages=1)
    tree = one_node_tree([0, 1, 2])
    plan = plan_tree_decode(tree, 8, 2, 16, DEVICE, kv_dtype=torch.float32)
    q, kv = torch.randn(2, 8, 16, device=DEVICE), torch.randn(3, 2, 16, device=DEVICE)
    config = module.Stage1Config(32, 16, 4, 3)
    with caplog.at_level("WARNING", logger=module.__name__):
        out = tree_decode(q, kv, kv, plan, 0.25, config=config)
        again = tree_decode(q, kv, kv, plan, 0.25, config=config)
    assert short.stages == [3, 1, 1]  # tried once as configured; then one stage for this shape
    assert caplog.text.count("runs with one pipeline stage instead of 3") == 1
    assert "needs 102720 of shared memory, more than this GPU's 101376" in caplog.text
    torch.testing.assert_close(out, attention_reference(q, kv, kv, tree, 0.25), rtol=1e-5, atol=1e-5)
    assert torch.equal(out, again)


@pytest.mark.skipif(not CUDA, reason="CUDA devices")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [128, 256])
def test_one_pipeline_stage_gives_the_same_output(dtype, head_dim):
    """What the warning above says: the one-stage kernel a GPU short of shared memory runs computes what the
    configured pipeline does, bitwise (the stages only move the loads)."""
    module = importlib.import_module("sglang_deft.kernels.tree_decode")
    # a 700-token prefix under 24 queries (large tiles) and their tails of 1-47 tokens (small ones)
    tree = make_tree([-1] + [0] * 24, [700] + [1 + 2 * i for i in range(24)], list(range(1, 25)))
    plan = plan_tree_decode(tree, 16, 4, head_dim, DEVICE, kv_dtype=dtype)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    S = int(tree.kv_indices.max()) + 1
    q = torch.randn(tree.num_queries, 16, head_dim, device=DEVICE, generator=g).to(dtype)
    k = torch.randn(S, 4, head_dim, device=DEVICE, generator=g).to(dtype)
    v = torch.randn(S, 4, head_dim, device=DEVICE, generator=g).to(dtype)
    base = module.stage1_config(head_dim, plan.large_rows)
    outs = [tree_decode(q, k, v, plan, head_dim ** -0.5, config=dataclasses.replace(base, num_stages=n))
            for n in (base.num_stages, 1)]
    assert base.num_stages > 1 and torch.equal(outs[0], outs[1])


def test_a_gpu_short_of_shared_memory_even_for_one_stage_is_named_with_what_to_do(monkeypatch):
    """Triton's bare 'out of resource' reached SGLang's graph capture."""
    module, short = short_of_shared_memory(monkeypatch, fits_stages=0)
    plan = plan_tree_decode(one_node_tree([0, 1, 2]), 8, 2, 16, DEVICE, kv_dtype=torch.float32)
    q, kv = torch.randn(2, 8, 16, device=DEVICE), torch.randn(3, 2, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"needs 102720 of shared memory, more than this GPU's 101376 even with "
                                           r"one pipeline stage: serve the model in float16/bfloat16"):
        tree_decode(q, kv, kv, plan, 0.25, config=module.Stage1Config(32, 16, 4, 2))
    assert short.stages == [2, 1]


def test_an_fp8_e4m3_cache_on_rocm_is_refused(monkeypatch):
    """An MI200 reports capability (9, 0), which passed the sm_89 test, without fp8 of NVIDIA's kind."""
    from sglang_deft.kernels.tree_decode import kv_dtype_unsupported_on
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    kv_dtype_unsupported_on.cache_clear()
    try:
        assert "on a ROCm device" in kv_dtype_unsupported_on(torch.float8_e4m3fn, torch.device("cuda", 0))
    finally:
        kv_dtype_unsupported_on.cache_clear()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("few_merges", [False, True], ids=["8_per_load", "32_per_load"])
@pytest.mark.parametrize("high", ["first_block", "second_block", "last_node"])
def test_scores_far_apart_along_a_path(high, few_merges, dtype):
    """Online softmax must rescale by the running maximum: a query whose KV scores ~+58 in one place and ~-58
    everywhere else (base e; 2^167 apart in base 2, past fp32's range) still gets the softmax over its whole
    path. Stage 1 folds two 32-token blocks of the root, stage 2 more than one load of partials on the chain
    below it. With the high scores in the root's first block the maximum never grows, which checks only that
    nothing overflows; in its second block stage 1's rescale of what it folded before must bring that to ~0,
    and on the last node stage 2's rescale of every earlier partial must (a kernel without the rescale passed
    the first placement alone). (Head dim 128 on a GPU: the Hopper kernel's, in bf16/fp16.)"""
    d, depth = (128 if CUDA else 32), 40
    tree = make_tree([-1] + list(range(depth - 1)), [64] + [3] * (depth - 1), [depth - 1])
    slots = int(tree.kv_indices.max()) + 1
    g = torch.Generator().manual_seed(0)
    c = (58.0 / d ** 0.5) ** 0.5  # q . k * d^-0.5 = +-58
    q = torch.full((1, 8, d), c)
    k = torch.full((slots, 2, d), -c)
    high_slots = {"first_block": tree.kv_indices[:32], "second_block": tree.kv_indices[32:64],
                  "last_node": tree.kv_indices[-3:]}[high]
    k[high_slots.long()] = c
    v = torch.randn(slots, 2, d, generator=g)
    q, k, v = (t.to(DEVICE, dtype) for t in (q, k, v))
    plan = plan_tree_decode(tree, 8, 2, d, device=DEVICE, kv_dtype=dtype)
    plan = dataclasses.replace(plan, few_merges_max_queries=plan.grid_queries if few_merges else 0)
    assert int(plan.merge_indptr[1]) > STAGE2_SHAPE_FEW_MERGES[0]  # several loads in either shape
    out = tree_decode(q, k, v, plan, d ** -0.5)
    ref = attention_reference(q, k, v, tree, d ** -0.5)
    assert out.isfinite().all()
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[dtype], rtol=0)
