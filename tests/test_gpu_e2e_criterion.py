"""The GPU end-to-end criterion (scripts/gpu_e2e.py) on synthetic logprob lists: deft must differ from
SGLang's triton decode no more than k x SGLang's flashinfer decode does (the measured noise floor)."""
from __future__ import annotations

import importlib.util
import math
import random
import os
import sys
from types import SimpleNamespace

import pytest

from repo_modules import REPO, load_module

g = load_module("gpu_e2e", REPO / "scripts" / "gpu_e2e.py")

CRIT = g.Criterion()  # k 2, floor 0.01, divergence floor max(1, ceil(requests / 8)), tie factor 2, pooled


def seq(ids, lps, runner_up=None, gap=0.3):
    """A sequence whose top-k holds the chosen token and, per step, one runner-up ``gap`` below it
    (``runner_up[t]``, default token 999)."""
    tops = []
    for t, (i, lp) in enumerate(zip(ids, lps)):
        other = runner_up[t] if runner_up else 999
        tops.append({i: lp, other: lp - gap})
    return g.Seq(list(ids), list(lps), tops)


def reference(n_requests=8, steps=32, seed=0):
    rng = random.Random(seed)
    return [seq([rng.randrange(3, 300) for _ in range(steps)], [-rng.uniform(0.2, 2.0) for _ in range(steps)])
            for _ in range(n_requests)]


def jitter(ref, scale, seed):
    """Same tokens, every logprob moved by up to ``scale`` (what another correct kernel does)."""
    rng = random.Random(seed)
    return [seq(r.ids, [lp + rng.uniform(-scale, scale) for lp in r.lps]) for r in ref]


def diverge(s: g.Seq, ref: g.Seq, t: int, gap: float) -> g.Seq:
    """``s`` picks token 7 at step ``t`` where ``ref`` picked ref.ids[t]; in both servers the two tokens are
    ``gap`` apart (ref's top-k gets token 7 at ``gap`` below its choice, and the other way round)."""
    ids = s.ids[:t] + [7] + [8] * (len(s.ids) - t - 1)
    out = seq(ids, s.lps)
    out.tops[t][ref.ids[t]] = s.lps[t] - gap
    ref.tops[t][7] = ref.lps[t] - gap
    return out


def test_parse_response_reads_sglang_logprob_fields():
    resp = {"output_ids": [5, 6], "meta_info": {
        "output_token_logprobs": [[-0.5, 5, None], [-1.0, 6, None]],
        "output_top_logprobs": [[[-0.5, 5, None], [-1.2, 9, None]], [[-1.0, 6, None], [-1.1, 4, None]]]}}
    s = g.parse_response(resp)
    assert s.ids == [5, 6] and s.lps == [-0.5, -1.0]
    assert s.tops == [{5: -0.5, 9: -1.2}, {6: -1.0, 4: -1.1}]


def test_identical_outputs_pass_on_the_floor():
    ref = reference()
    entry = g.judge_workload(ref, ref, ref, CRIT, atol=0.02, tie_tol=0.1)
    assert entry["ok"] and entry["criterion"] == "relative"
    assert entry["max_abs_logprob_diff"] == 0 and entry["relative"]["allowed_logprob_diff"] == CRIT.lp_floor


def test_deft_as_noisy_as_flashinfer_passes_and_keeps_the_absolute_fields():
    ref = reference()
    deft, noise = jitter(ref, 0.015, seed=1), jitter(ref, 0.012, seed=2)
    entry = g.judge_workload(deft, ref, noise, CRIT, atol=0.02, tie_tol=0.1)
    assert entry["ok"], entry["failures"]
    for key in ("requests", "steps", "steps_compared", "divergences", "max_abs_logprob_diff", "absolute_ok",
                "absolute_failures", "noise", "common_horizon"):
        assert key in entry
    assert entry["steps"] == entry["steps_compared"] == 8 * 32
    assert 0.01 < entry["max_abs_logprob_diff"] <= 0.015
    assert entry["relative"]["allowed_logprob_diff"] == pytest.approx(2 * entry["noise"]["max_abs_logprob_diff"])


def test_bf16_sized_noise_passes_when_flashinfer_is_as_noisy_though_the_absolute_check_fails():
    """Today's bf16 tiny run: deft-vs-triton up to ~0.1 at agreeing steps (atol 0.05 failed)."""
    ref = reference()
    deft, noise = jitter(ref, 0.10, seed=3), jitter(ref, 0.09, seed=4)
    entry = g.judge_workload(deft, ref, noise, CRIT, atol=0.05, tie_tol=0.1)
    assert entry["ok"], entry["failures"]
    assert not entry["absolute_ok"]


def test_logprob_error_beyond_k_times_the_noise_fails():
    ref = reference()
    noise = jitter(ref, 0.012, seed=5)
    deft = jitter(ref, 0.012, seed=6)
    deft[3].lps[10] += 0.08  # one wrong step, 3x what two correct kernels differ by
    entry = g.judge_workload(deft, ref, noise, CRIT, atol=0.02, tie_tol=0.1)
    assert not entry["ok"]
    assert "logprob diff" in entry["failures"][0]


def test_a_wrong_attention_on_the_tiny_model_fails():
    """Attention over the wrong KV: logprobs off by O(0.3) and tokens that are no near-tie."""
    ref = reference()
    noise = jitter(ref, 0.015, seed=7)
    rng = random.Random(8)
    deft = [diverge(jitter([r], 0.3, seed=i)[0], r, t=rng.randrange(1, 6), gap=0.8) for i, r in enumerate(ref)]
    entry = g.judge_workload(deft, ref, noise, CRIT, atol=0.02, tie_tol=0.1)
    assert not entry["ok"]
    text = " ".join(entry["failures"])
    assert "divergences" in text and "not a near-tie" in text


def test_divergence_counts_use_k_times_noise_plus_a_floor():
    ref = reference(n_requests=16)
    noise = jitter(ref, 0.02, seed=9)
    deft = jitter(ref, 0.02, seed=10)
    # noise: 1 near-tie divergence; allowed for deft: 2 * 1 + max(1, ceil(16 / 8)) = 4
    noise[0] = diverge(noise[0], ref[0], t=5, gap=0.01)
    for i in range(4):
        deft[i + 1] = diverge(deft[i + 1], ref[i + 1], t=3 + i, gap=0.01)
    entry = g.judge_workload(deft, ref, noise, CRIT, atol=0.05, tie_tol=0.1)
    assert entry["relative"]["allowed_divergences"] == 4
    assert entry["ok"], entry["failures"]
    assert [CRIT.div_floor(n) for n in (4, 8, 12, 17)] == [1, 1, 2, 3]  # max(1, ceil(requests / 8))
    deft[6] = diverge(deft[6], ref[6], t=9, gap=0.01)
    entry = g.judge_workload(deft, ref, noise, CRIT, atol=0.05, tie_tol=0.1)
    assert not entry["ok"] and "5 divergences > allowed 4" in entry["failures"][0]


def test_a_divergence_must_be_a_near_tie_at_the_noise_scale():
    ref = reference()
    noise = jitter(ref, 0.015, seed=11)  # allowed diff ~0.03, allowed tie gap ~0.06
    deft = jitter(ref, 0.015, seed=12)
    deft[2] = diverge(deft[2], ref[2], t=4, gap=0.04)
    ok = g.judge_workload(deft, ref, noise, CRIT, atol=0.05, tie_tol=0.1)
    assert ok["ok"], ok["failures"]
    deft[2] = diverge(deft[2], ref[2], t=4, gap=0.2)
    bad = g.judge_workload(deft, ref, noise, CRIT, atol=0.05, tie_tol=0.1)
    assert not bad["ok"] and "request 2 step 4: not a near-tie" in bad["failures"][0]


def test_a_token_outside_the_top_k_counts_with_its_smallest_possible_gap():
    ref = seq([1, 2, 3], [-0.5, -0.6, -0.7], gap=0.3)
    x = seq([1, 2, 4], [-0.5, -0.6, -0.7], gap=0.3)
    stats = g.compare_pair(x, ref)
    assert stats.diverged_at == 2 and stats.tie_in_top_k is False
    assert stats.tie_gap == pytest.approx(0.3)  # at least down to the k-th entry in both servers
    empty = g.Seq([4], [-0.5], [{}])
    assert math.isinf(g.compare_pair(empty, g.Seq([1], [-0.5], [{}])).tie_gap)


def test_a_divergence_to_a_token_outside_the_top_k_is_no_near_tie():
    """Its gap is only known to be at least the k-th logprob's: in a flat top-k (dummy weights) any token would
    pass, however far below the chosen one it is."""
    ref = reference()
    noise = jitter(ref, 0.015, seed=11)
    deft = jitter(ref, 0.015, seed=12)
    flat = seq(deft[2].ids[:4] + [7] * 28, deft[2].lps, gap=0.001)  # token 7: in no top-k of the reference
    deft[2] = flat
    entry = g.judge_workload(deft, ref, noise, CRIT, atol=0.05, tie_tol=0.1)
    assert entry["divergences_outside_top_k"] == 1
    assert not entry["ok"] and "request 2 step 4: not a near-tie (a token outside the top-k" in entry["failures"][0]
    # the absolute check too, which alone decides where no noise server runs (the window models): it took the
    # gap's lower bound (0.3 here, the reference's k-th entry) for the gap, within a tie_tol of 0.5
    entry = g.judge_workload(deft, ref, None, CRIT, atol=0.05, tie_tol=0.5)
    assert entry["criterion"] == "absolute" and not entry["ok"]
    assert entry["failures"] == ["request 2 step 4: not a near-tie (a token outside the top-k: its gap is at least "
                                 "0.3000, not known; tie_tol 0.5)"]


def test_a_divergence_whose_tokens_the_servers_score_apart_is_no_near_tie():
    """At a divergence only the gap between its two tokens was checked: a server whose whole distribution was off at
    that step (the reference's token 2.5 nats lower in it) passed, its own two tokens being 0.01 apart. The same
    context leads there, so each token's logprob must agree between the servers as a near-tie's gap does."""
    ref = reference()
    noise = jitter(ref, 0.015, seed=11)
    deft = jitter(ref, 0.015, seed=12)
    deft[2] = diverge(deft[2], ref[2], t=4, gap=0.01)
    entry = g.judge_workload(deft, ref, noise, CRIT, atol=0.05, tie_tol=0.1)
    assert entry["ok"] and 0 <= entry["max_tie_logprob_diff"] < 0.1, entry
    lp = ref[2].lps[4] - 2.5  # deft's own choice 0.01 above the reference's token, both far below the reference's
    deft[2].lps[4] = lp
    deft[2].tops[4] = {7: lp, ref[2].ids[4]: lp - 0.01}
    for noise_run, tie_tol in ((noise, 0.1), (None, 0.1)):
        entry = g.judge_workload(deft, ref, noise_run, CRIT, atol=0.05, tie_tol=tie_tol)
        assert not entry["ok"] and entry["max_tie_logprob_diff"] > 2.4, entry
        assert any("request 2 step 4: not a near-tie (the servers' logprobs of its two tokens differ by" in f
                   for f in entry["failures"]), entry["failures"]


def test_a_logprob_that_is_not_a_number_fails():
    """Every check is 'diff > limit', which NaN passed, and max() kept a NaN that came first and hid the rest: an
    all-NaN deft passed, a NaN in the noise server made any difference allowed. None is JSON's null, which SGLang's
    responses hold for a NaN."""
    ref = reference()
    noise = jitter(ref, 0.015, seed=11)
    for bad in (math.nan, None):
        deft = jitter(ref, 0.015, seed=12)
        deft[0].lps[0] = bad
        entry = g.judge_workload(deft, ref, noise, CRIT, atol=0.05, tie_tol=0.1)
        assert not entry["ok"] and "logprob diff inf > allowed" in entry["failures"][0], entry["failures"]
        deft = jitter(ref, 0.015, seed=12)
        broken_noise = jitter(ref, 0.015, seed=11)
        broken_noise[0].lps[0] = bad
        entry = g.judge_workload(deft, ref, broken_noise, CRIT, atol=0.05, tie_tol=0.1)
        assert not entry["ok"] and "noise floor unusable" in entry["failures"][0], entry["failures"]


def test_a_noise_server_that_is_itself_wrong_sets_no_band():
    """A broken noise backend would widen the band to its own error: its divergences must be near-ties at its own
    scale and its logprob difference within what two correct backends show (0.3)."""
    ref = reference()
    noise = jitter(ref, 0.2, seed=11)  # the band would allow ~0.4
    for i in (1, 3, 5):
        noise[i] = diverge(noise[i], ref[i], t=6, gap=1.5)  # three divergences, none a near-tie
    deft = jitter(ref, 0.2, seed=12)
    entry = g.judge_workload(deft, ref, noise, CRIT, atol=0.05, tie_tol=0.1)
    assert not entry["ok"] and sum("noise floor unusable" in f for f in entry["failures"]) == 3
    noise = jitter(ref, 0.5, seed=11)  # no divergence, but as far off as a wrong attention
    entry = g.judge_workload(jitter(ref, 0.4, seed=12), ref, noise, CRIT, atol=0.05, tie_tol=0.1)
    assert not entry["ok"] and "noise floor unusable: the noise server's logprob diff" in entry["failures"][0]


def test_without_a_noise_server_the_absolute_check_decides():
    ref = reference()
    deft = jitter(ref, 0.03, seed=13)
    entry = g.judge_workload(deft, ref, None, CRIT, atol=0.02, tie_tol=0.1)
    assert entry["criterion"] == "absolute" and not entry["ok"]
    assert entry["failures"] == entry["absolute_failures"]


def test_without_a_noise_server_the_divergences_are_counted_too():
    """The absolute verdict (a windowed model, no usable noise server) checked each divergence for a near-tie but not
    their number: every request of 8 flipping at a near-tie passed. k x the relative floor now: 2 of 8."""
    ref = reference()
    deft = jitter(ref, 0.001, seed=80)
    for n_flipped, ok in ((2, True), (3, False), (8, False)):
        flipped = [diverge(x, r, t=6, gap=0.01) if i < n_flipped else x for i, (x, r) in enumerate(zip(deft, ref))]
        entry = g.judge_workload(flipped, ref, None, CRIT, atol=0.02, tie_tol=0.1)
        assert entry["criterion"] == "absolute" and entry["allowed_divergences"] == 2
        assert entry["ok"] is ok and entry["absolute_failures"] == [], entry
        assert entry["distinct_divergences"] == n_flipped and f"(distinct {n_flipped}) | allowed 2" in g._line(entry)
        if not ok:
            assert entry["failures"] == [f"{n_flipped} divergences > allowed 2 without a noise server"]
    # n > 1 samples of one prompt are one request, as in the relative verdict: 16 copies flipping alike are one
    # divergence of one request (allowed 2), where counting rows allowed 2 x ceil(16 / 8) = 4 for one prompt
    copies = reference(n_requests=1, seed=81) * 16
    same = [diverge(jitter(copies[:1], 0.001, seed=82)[0], copies[0], t=6, gap=0.01)] * 16
    entry = g.judge_workload(same, copies, None, CRIT, atol=0.02, tie_tol=0.1)
    assert entry["ok"] and entry["distinct_divergences"] == 1 and entry["allowed_divergences"] == 2, entry


def test_common_horizon_stops_at_the_first_divergence_of_either_pair():
    ref = reference(n_requests=1, steps=6)
    deft = [seq(ref[0].ids, [lp + 0.01 * t for t, lp in enumerate(ref[0].lps)])]
    noise = [diverge(seq(ref[0].ids, ref[0].lps), ref[0], t=3, gap=0.01)]
    h = g.common_horizon([g.compare_pair(deft[0], ref[0])], [g.compare_pair(noise[0], ref[0])])
    assert h["steps"] == 3 and h["deft_max_abs_logprob_diff"] == pytest.approx(0.02)


def test_defaults_and_overlay_layout(tmp_path):
    args = g.parse_args(["--out", str(tmp_path)])
    assert args.tiny_dtype == "float16" and args.noise_backends == "flashinfer,torch_native"
    assert args.criterion == g.Criterion(2.0, 0.01, 0.125, 2.0, "model")
    assert g.parse_args(["--device", "cpu"]).noise_backends == "torch_native"
    base = g.model_base_args("tiny", g.MODELS["tiny"], args)
    assert base[base.index("--dtype") + 1] == "float16" and "--max-total-tokens" in base
    assert g.role_args(base, "noise", "flashinfer")[-2:] == ["--decode-attention-backend", "flashinfer"]
    assert g.role_args(base, "triton", "triton") == base
    tp2 = g.parse_args(["--out", str(tmp_path), "--deft-args=--tp 2"]).deft_args  # only the deft server gets it
    assert g.role_args(base, "deft", "deft", g.shlex.split(tp2))[-4:] == ["--decode-attention-backend", "deft",
                                                                         "--tp", "2"]
    assert "--tp" not in g.role_args(base, "noise", "flashinfer", g.shlex.split(tp2))
    assert g.role_args(base, "noise", "triton", (), ["--tp", "2"])[-4:] == ["--decode-attention-backend", "triton",
                                                                          "--tp", "2"]
    assert "--tp" not in g.role_args(base, "deft", "deft", (), ["--tp", "2"])
    graphs = g.parse_args(["--out", str(tmp_path), "--cuda-graph", "--server-args=--tp 2"])
    base_graphs = g.model_base_args("8b", g.MODELS["8b"], graphs)  # every server gets --server-args
    assert "--disable-cuda-graph" not in base_graphs and base_graphs[base_graphs.index("--tp") + 1] == "2"
    assert "--disable-cuda-graph" in g.role_args(base_graphs, "noise", "torch_native")  # it has no graphs
    assert "--disable-cuda-graph" not in g.role_args(base_graphs, "noise", "flashinfer")
    # --server-args override the script's defaults (before, argparse kept the defaults that came after them)
    raised = g.model_base_args("tiny", g.MODELS["tiny"], g.parse_args(["--server-args=--max-running-requests 256"]))
    assert raised[-2:] == ["--max-running-requests", "256"]
    for flag in ("--server-args", "--deft-args", "--noise-args"):  # the report's tolerances follow --tiny-dtype
        with pytest.raises(SystemExit):
            g.parse_args([f"{flag}=--dtype=bfloat16"])
    overlay = g.make_overlay(tmp_path / "overlay")
    pkg = overlay / "sglang_deft"
    assert (pkg / "kernels").resolve() == REPO / "kernels" and (pkg / "patches").resolve() == REPO / "patches"
    assert (pkg / "__init__.py").resolve() == REPO / "sglang_deft" / "__init__.py"
    g.make_overlay(tmp_path / "overlay")  # idempotent


def test_model_wide_noise_raises_a_quiet_workloads_band_but_never_tightens_it():
    """Workload A: flashinfer happened to flip little (0.006); workload B, same model: 0.02. deft's 0.018
    on A is within 2 x the model's noise, not within 2 x A's own."""
    ref_a, ref_b = reference(seed=20), reference(n_requests=16, seed=21)
    noise_a, deft_a = jitter(ref_a, 0.006, seed=22), jitter(ref_a, 0.006, seed=23)
    deft_a[0].lps[5] = ref_a[0].lps[5] + 0.018
    noise_b, deft_b = jitter(ref_b, 0.02, seed=24), jitter(ref_b, 0.02, seed=25)
    noise_b[3] = diverge(noise_b[3], ref_b[3], t=6, gap=0.01)  # 1 divergence in 16 requests: rate 1/16
    workloads = {"a": (deft_a, ref_a, noise_a), "b": (deft_b, ref_b, noise_b)}
    own, pooled = g.judge_model(workloads, g.Criterion(noise_pool="workload"), atol=0.05, tie_tol=0.1)
    assert pooled is None and not own["a"]["ok"] and own["b"]["ok"]
    entries, pooled = g.judge_model(workloads, CRIT, atol=0.05, tie_tol=0.1)
    assert pooled["requests"] == 24 and pooled["divergences"] == 1
    assert entries["a"]["ok"], entries["a"]["failures"]
    rel_a, rel_b = entries["a"]["relative"], entries["b"]["relative"]
    assert rel_a["noise_level_used"]["max_abs_logprob_diff"] == pytest.approx(pooled["max_abs_logprob_diff"])
    assert rel_a["allowed_divergences"] == pytest.approx(2 * 8 / 24 + 1, abs=1e-3)  # the rate, scaled to 8 requests
    assert rel_b["allowed_divergences"] == 2 * 1 + 2  # its own count is higher than the rate: kept
    assert rel_b["allowed_logprob_diff"] == own["b"]["relative"]["allowed_logprob_diff"]


def test_without_a_noise_server_nothing_is_pooled():
    ref = reference()
    entries, pooled = g.judge_model({"a": (jitter(ref, 0.005, seed=30), ref, None)}, CRIT, atol=0.02, tie_tol=0.1)
    assert pooled is None and entries["a"]["criterion"] == "absolute" and entries["a"]["ok"]


def test_kernel_check_summary_states_its_tolerance():
    line = "[x] DeFT kernel check: step={} layer=0 queries=8 max_abs_diff={} max_abs_out=2.0 dtype=bfloat16"
    ok = g.kernel_check_summary("\n".join([line.format(16, 0.004), "unrelated", line.format(32, 0.01)]))
    assert ok["checks"] == 2 and ok["max_abs_diff"] == 0.01 and ok["dtype"] == "bfloat16"
    assert (ok["checked_steps"], ok["ranks"]) == (2, 1)  # lines without a rank: rank 0's (before it was logged)
    tp2 = line.replace("layer=0", "layer=0 rank={}")
    both = g.kernel_check_summary("\n".join(tp2.format(step, rank, 0.004) for step in (16, 32) for rank in (0, 1)))
    assert (both["checks"], both["checked_steps"], both["ranks"]) == (4, 2, 2)
    assert ok["allowed"] == pytest.approx(2 * 2 ** -8 * 2.0) and ok["within_tolerance"]
    assert not g.kernel_check_summary(line.format(16, 0.5))["within_tolerance"]  # a wrong attention
    assert g.kernel_check_summary("no check lines") is None
    # A float32 check's allowance grows with the step's largest |score| (its rounding moves the weights by |s|
    # roundoffs): 3x past 2^-20 of |out| alone, within it at scores to 60.
    fp32 = "DeFT kernel check: step=1 layer=0 queries=4 max_abs_diff=1.2e-5 max_abs_out=2.0 {}dtype=float32"
    assert not g.kernel_check_summary(fp32.format(""))["within_tolerance"]
    scored = g.kernel_check_summary(fp32.format("max_abs_score=60 "))
    assert scored["within_tolerance"] and scored["worst"]["max_abs_score"] == 60
    assert scored["allowed"] == pytest.approx(2 * (2 ** -20 + 60 * 2 ** -22) * 2.0)


def test_stage1_kernels_reads_the_kernels_own_log_line(caplog, monkeypatch):
    """The report names the stage-1 kernel that served (Hopper's Gluon kernel or the Triton one), from the
    line kernels.tree_decode logs on a GPU; the lines here are the ones it logs (with the Hopper module's
    answer faked, as this machine has no GPU), not copies of its format."""
    import importlib
    import logging
    import types

    import torch

    tree_decode = importlib.import_module("sglang_deft.kernels.tree_decode")  # the package exports the function
    kernels = importlib.import_module("sglang_deft.kernels")

    class Cuda:  # hashable, as the lru_cache needs
        type = "cuda"

        def __str__(self):
            return "cuda:0"

    fake = types.ModuleType("sglang_deft.kernels.stage1_hopper")
    fake.unsupported_reason = lambda device, dtype, head_dim, *rest: None if head_dim == 128 else f"head_dim {head_dim}"
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setattr(kernels, "stage1_hopper", fake, raising=False)
    tree_decode._hopper_unsupported.cache_clear()  # logged once per configuration
    with caplog.at_level(logging.INFO, logger=tree_decode.logger.name):
        tree_decode._hopper_unsupported(Cuda(), torch.bfloat16, 128, 64)
        tree_decode._hopper_unsupported(Cuda(), torch.float16, 72, 64)
    tree_decode._hopper_unsupported.cache_clear()
    log = "\n".join(["unrelated"] + [f"[2026-12-03 10:00:0{i}] {r.getMessage()}" for i, r in enumerate(caplog.records)])
    assert g.stage1_kernels(log) == [
        {"device": "cuda:0", "configuration": "torch.bfloat16, head_dim 128, 64-row large tiles",
         "kernel": "Gluon kernel for Hopper"},
        {"device": "cuda:0", "configuration": "torch.float16, head_dim 72, 64-row large tiles",
         "kernel": "Triton kernel: the Hopper kernel does not serve head_dim 72"}]
    assert g.stage1_kernels("no kernel line") == []


def test_tiny_variants_are_generated_and_judged_like_tiny(tmp_path, monkeypatch):
    args = g.parse_args(["--out", str(tmp_path)])
    for name, heads in g.TINY_VARIANTS.items():
        spec = g.MODELS[name]
        assert spec["sharp"] and spec["heads"] == heads and spec["path"] is None
        base = g.model_base_args(name, dict(spec, path=tmp_path), args)
        assert base[base.index("--dtype") + 1] == "float16"  # as tiny: the narrower noise band
    assert not g.MODELS["8b"].get("sharp")
    monkeypatch.setattr(g, "variant_dir", lambda name: tmp_path / name)
    path = g.materialize_model("tiny-gqa7", g.MODELS["tiny-gqa7"])
    cfg = g.json.loads((path / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["hidden_size"]) == \
        (28, 4, 128, 112)
    assert (path / "model.safetensors").stat().st_size > 0 and (path / "tokenizer.json").exists()
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"))  # drawn for the variant's heads, not the bundled ones
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (28 * 128, 112)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (4 * 128, 112)
    assert g.materialize_model("tiny", g.MODELS["tiny"]) == g.MODELS["tiny"]["path"]
    assert g.main(["--out", str(tmp_path / "out"), "--models", "tiny,nope"]) == 2


def test_family_variants_are_generated_under_their_model_code(tmp_path, monkeypatch):
    """tiny-qwen3-moe and the other family variants: a sharp tiny variant whose config names the family's
    architecture, so that SGLang runs that family's model code around deft's decode."""
    monkeypatch.setattr(g, "variant_dir", lambda name: tmp_path / name)
    architectures = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                     "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM", "phi3": "Phi3ForCausalLM"}
    assert {family for family, _ in g.FAMILY_VARIANTS.values()} == set(architectures)
    for name, (family, heads) in g.FAMILY_VARIANTS.items():
        path = g.materialize_model(name, g.MODELS[name])
        cfg = g.json.loads((path / "config.json").read_text())
        assert cfg["architectures"] == [architectures[family]], name
        assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == heads[:3], name
        assert g.MODELS[name]["sharp"]  # judged as tiny: float16, the context-sensitivity check
    assert g.json.loads((tmp_path / "tiny-qwen3-moe" / "config.json").read_text())["num_experts"] == 4


def test_window_variants_are_generated_with_their_windows(tmp_path, monkeypatch):
    """The Gemma variants' windows as their configs give them to SGLang: windowed layers 0 and 2 (Gemma-2's even
    layers; Gemma-3's layer_types), a window no prompt reaches in the -full controls, no window in
    tiny-gemma3-global."""
    monkeypatch.setattr(g, "variant_dir", lambda name: tmp_path / name)
    sliding = ["sliding_attention", "full_attention", "sliding_attention"]
    expected = {"tiny-gemma2": ("Gemma2ForCausalLM", 64, None), "tiny-gemma2-full": ("Gemma2ForCausalLM", 4096, None),
                "tiny-gemma3": ("Gemma3ForCausalLM", 64, sliding), "tiny-gemma3-full": ("Gemma3ForCausalLM", 4096, sliding),
                "tiny-gemma3-global": ("Gemma3ForCausalLM", 64, ["full_attention"] * 3)}
    for name, (architecture, window, layer_types) in expected.items():
        cfg = g.json.loads((g.materialize_model(name, g.MODELS[name]) / "config.json").read_text())
        assert (cfg["architectures"], cfg["sliding_window"], cfg.get("layer_types")) == ([architecture], window,
                                                                                        layer_types), name
        assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (16, 8, 256), name


def test_a_noise_backend_that_cannot_serve_a_model_is_not_queued(tmp_path):
    """FlashInfer cannot merge head_dim 96 (Phi-3's heads): tiny-phi3's noise server is torch_native."""
    args = g.parse_args(["--out", str(tmp_path)])
    args.noise_backends = "flashinfer,torch_native"  # main's GPU default
    runs = {name: g.ModelRun(name, dict(g.MODELS[name], path=tmp_path), None, args, {})
            for name in ("tiny-phi3", "tiny-qwen3")}
    assert {name: run.noise_queue for name, run in runs.items()} == {
        "tiny-phi3": ["torch_native"], "tiny-qwen3": ["flashinfer", "torch_native"]}
    assert runs["tiny-phi3"].result["noise_not_queued"] == ["flashinfer"]  # the report says what was left out
    assert "noise_not_queued" not in runs["tiny-qwen3"].result


def test_the_tie_gap_is_the_larger_of_the_two_servers_gaps():
    """At a divergence, a near-tie must hold in *both* servers: ref's token 2 is 0.05 below deft's choice in
    deft's top-k, but deft's token 4 is 0.5 below ref's choice in ref's: gap 0.5, not a near-tie."""
    ref = g.Seq([1, 2], [-0.5, -0.6], [{1: -0.5}, {2: -0.6, 4: -1.1}])
    x = g.Seq([1, 4], [-0.5, -0.7], [{1: -0.5}, {4: -0.7, 2: -0.75, 9: -2.0}])
    stats = g.compare_pair(x, ref)
    assert stats.diverged_at == 1 and stats.tie_gap == pytest.approx(0.5) and stats.tie_in_top_k is True
    # ref's token outside deft's top-k: a lower bound, said so
    x.tops[1] = {4: -0.7, 9: -0.72}
    stats = g.compare_pair(x, ref)
    assert stats.tie_in_top_k is False and stats.tie_gap == pytest.approx(0.5)


def test_kernel_check_summary_needs_every_check_within_the_tolerance():
    line = "[x] DeFT kernel check: step={} layer=0 queries=8 max_abs_diff={} max_abs_out={} dtype=float16"
    log = "\n".join([line.format(16, 0.0001, 4.0), line.format(32, 0.01, 4.0), line.format(48, 0.0002, 1.0)])
    s = g.kernel_check_summary(log)
    assert s["checks"] == 3 and s["max_abs_out"] == 4.0 and s["dtype"] == "float16"
    assert s["allowed"] == pytest.approx(2 * 2 ** -11 * 4.0)  # the worst check's, at its own |out|
    assert s["worst"]["step"] == 32 and s["outside_tolerance"] == 1
    assert not s["within_tolerance"]  # the second check is 2.5x over


def test_kernel_check_summary_judges_each_check_at_its_own_magnitude():
    """A window layer's small outputs over their own allowance (the server warned) passed the summary, which
    judged every check at the largest |out| of all of them."""
    line = "[x] DeFT kernel check: step=16 layer={} queries=8 max_abs_diff={} max_abs_out={} dtype=float16"
    s = g.kernel_check_summary("\n".join([line.format(0, 0.0005, 4.0), line.format(1, 0.0015, 0.25)]))
    assert not s["within_tolerance"] and s["outside_tolerance"] == 1 and s["worst"]["layer"] == 1
    assert s["allowed"] == pytest.approx(2 * 2 ** -11 * 0.25)
    nan = g.kernel_check_summary("\n".join([line.format(0, 0.0005, 4.0), line.format(1, "nan", "nan")]))
    assert not nan["within_tolerance"] and nan["worst"]["layer"] == 1


class FakeModelServer:
    """A decode server over token ids: request p decodes ids that depend on its whole prompt (or only on its
    last tokens: ``sensitive=False``), logprobs shifted by ``shift``, each step's top-2."""

    def __init__(self, shift=0.0, sensitive=True, log=""):
        self.shift, self.sensitive, self._log, self.payloads = shift, sensitive, log, []

    def _one(self, prompt, n):
        seed = sum(prompt) if self.sensitive else sum(prompt[-4:])
        ids = [(seed * 31 + 17 * j) % 290 + 3 for j in range(n)]
        lps = [-0.4 - 0.05 * j + self.shift for j in range(n)]
        tops = [[[lp, i, None], [lp - 0.5, 2, None]] for i, lp in zip(ids, lps)]
        return {"output_ids": ids, "meta_info": {"output_token_logprobs": [[lp, i, None] for i, lp in zip(ids, lps)],
                                                 "output_top_logprobs": tops}}

    def generate(self, payload, timeout_s=None):
        self.payloads.append(payload)
        ids, sp = payload["input_ids"], payload["sampling_params"]
        if ids and isinstance(ids[0], list):
            return [self._one(p, sp["max_new_tokens"]) for p in ids]
        if "n" in sp:
            return [self._one(ids, sp["max_new_tokens"]) for _ in range(sp["n"])]
        return self._one(ids, sp["max_new_tokens"])

    def log(self):
        return self._log


SMALL = dict(g.MODELS["tiny"], prefix=24, branches=4, new_tokens=6, nested_tokens=3, tokenizer=False)


def workloads(deft, noise=None, ref=None):
    servers = {"triton": ref or FakeModelServer(), "noise": noise or FakeModelServer(shift=0.004), "deft": deft}
    return g.run_workloads(servers, SMALL, CRIT, 0.02, 0.1, g.Clock(), "tiny", lambda partial: None), servers


def test_run_workloads_judges_deft_against_the_reference_with_the_noise_server():
    report, servers = workloads(FakeModelServer(shift=0.006))
    assert set(report["workloads"]) == {"fork", "nested_fork", "n_gt_1"}
    for name, entry in report["workloads"].items():
        assert entry["ok"] and entry["criterion"] == "relative", (name, entry["failures"])
        assert entry["max_abs_logprob_diff"] == pytest.approx(0.006)
        assert entry["noise"]["max_abs_logprob_diff"] == pytest.approx(0.004)
    assert report["workloads"]["nested_fork"]["requests"] == 8 and report["workloads"]["n_gt_1"]["requests"] == 4
    assert report["context_sensitivity"] == 1.0
    # every server got the same requests
    assert servers["deft"].payloads == servers["noise"].payloads == servers["triton"].payloads[:-1]
    bad, _ = workloads(FakeModelServer(shift=0.3))  # deft far off while the two built-in backends agree
    assert not any(e["ok"] for e in bad["workloads"].values())
    assert all("logprob diff 0.3000 > allowed 0.0100" in e["failures"][0] for e in bad["workloads"].values())


def test_decode_context_sensitivity_counts_branches_that_part_after_their_first_token():
    out = lambda *ids: {"output_ids": list(ids)}  # noqa: E731
    base = [out(1, 2, 3), out(4, 5, 6), out(7, 8, 9), out(1, 1, 1)]
    changed = [out(1, 2, 3), out(4, 0, 6), out(0, 8, 9), out(1, 1, 2)]  # same; parted at 1; first changed; at 2
    assert g.decode_context_sensitivity(changed, base) == {"same_first_token": 3, "parted_later": 2,
                                                           "fraction": 2 / 3}
    assert g.decode_context_sensitivity([out(0, 2)], [out(1, 2)])["fraction"] is None


def test_run_workloads_context_sensitivity_of_a_model_that_ignores_its_prefix():
    report, _ = workloads(FakeModelServer(sensitive=False), FakeModelServer(sensitive=False),
                          FakeModelServer(sensitive=False))
    assert report["context_sensitivity"] == 0.0


STAGE1 = "[x] tree decode stage 1 on cuda:0, torch.float16, head_dim 32, 64-row large tiles: Triton kernel (head_dim)\n"
SHARING = ("[x] DeFT decode sharing: steps=8 attended_kv_tokens=800 unique_kv_tokens=200 ratio=4.000 "
           "plan_host_us=10.0 total_steps=24 total_attended_kv_tokens=3000 total_unique_kv_tokens=1000\n" + STAGE1)


class FakeFleet:
    def __init__(self):
        self.clock, self.stopped = g.Clock(), []

    def stop(self, items):
        self.stopped.extend(items)


def model_run(tmp_path, deft, ref=None, noise=True, argv=(), deadline_s=600, sharp=True):
    """ModelRun.run over servers that are already up (what run() does after the startup waits); ``noise``: the
    default noise server (True), none (False) or this one; ``sharp``: a model whose tokens follow its attention."""
    args = g.parse_args(["--out", str(tmp_path), *argv])
    if args.noise_backends is None:
        args.noise_backends = "flashinfer,torch_native"  # main's default on a GPU
    fleet, result = FakeFleet(), {}
    run = g.ModelRun("tiny", dict(SMALL, sharp=sharp), fleet, args, result)
    servers = {"triton": ref or FakeModelServer(), "deft": deft}
    if noise:
        servers["noise"] = FakeModelServer(shift=0.004) if noise is True else noise
    run.launched = {role: g.Launched(role, role, s, t0=0.0, ready_s=1.0) for role, s in servers.items()}
    run.run(deadline=g.time.monotonic() + deadline_s, save=lambda: None)
    assert len(fleet.stopped) == len(servers)  # every server stopped
    return result


def test_a_model_interrupted_mid_workload_is_saved_as_such_before_its_servers_stop(tmp_path):
    """SIGTERM (gpu_session.sh's timeout) mid-model: the report was marked interrupted only by main's handler, after
    this model's servers had stopped (up to 30 s, past the caller's 15 s grace before SIGKILL), so a killed run's
    JSON said nothing of it."""
    class Terminated(FakeModelServer):
        def generate(self, payload, timeout_s=None):
            raise SystemExit(143)

    events, report = [], {}

    class Fleet(FakeFleet):
        def stop(self, items):
            events.append("stop")
            super().stop(items)

    def save(interrupted=None):
        events.append(("save", type(interrupted).__name__ if interrupted else None))
        report.update(result)

    args = g.parse_args(["--out", str(tmp_path)])
    result = {}
    run = g.ModelRun("tiny", SMALL, Fleet(), args, result)
    run.launched = {role: g.Launched(role, role, Terminated() if role == "deft" else FakeModelServer(), t0=0.0,
                                     ready_s=1.0) for role in ("triton", "noise", "deft")}
    with pytest.raises(SystemExit):
        run.run(deadline=g.time.monotonic() + 600, save=save)
    assert events[-2:] == [("save", "SystemExit"), "stop"]
    assert report["ok"] is False and report["interrupted"] == "SystemExit: 143"


def test_a_model_whose_servers_are_still_starting_when_the_budget_ends_is_skipped_for_it(tmp_path):
    """With --parallel all no model was skipped for the budget: a late one got waits of 1 s, its noise server failed
    "not ready after 1s", the next noise backend was started past the deadline, and the model failed as "no noise
    server served", the budget unnamed. Now it is skipped (the run incomplete), its servers stopped, none started."""
    class Starting(FakeModelServer):
        def wait_ready(self, timeout_s):
            raise AssertionError("waited on a server with the budget spent")

    args = g.parse_args(["--out", str(tmp_path), "--noise-backends", "flashinfer,torch_native"])
    fleet, result = FakeFleet(), {}
    fleet.launch = lambda *a, **k: pytest.fail("a server started past the deadline")
    run = g.ModelRun("tiny", SMALL, fleet, args, result)
    run.launched = {role: g.Launched(role, role, Starting(), t0=0.0) for role in ("triton", "noise", "deft")}
    run.run(deadline=g.time.monotonic() + 10, save=lambda interrupted=None: None)
    assert result["ok"] is False and "budget left with its triton server still starting" in result["skipped"]
    assert len(fleet.stopped) == 3 and "workloads" not in result


def test_no_fallback_noise_server_starts_once_the_wait_is_spent(tmp_path):
    class Failing(FakeModelServer):
        name = "tiny-noise-flashinfer"

        def port_taken(self):
            return False

    args = g.parse_args(["--out", str(tmp_path), "--noise-backends", "flashinfer,torch_native"])
    fleet, result = FakeFleet(), {}
    fleet.wait = lambda launched, timeout_s: (_ for _ in ()).throw(TimeoutError("not ready after 1s"))
    fleet.launch = lambda *a, **k: pytest.fail("a fallback noise server started past the deadline")
    run = g.ModelRun("tiny", SMALL, fleet, args, result)
    run.launched = {"noise": g.Launched("noise", "flashinfer", Failing(), t0=0.0)}
    assert run.wait_role("noise", 0.5) is False
    assert result["server_errors"][-1]["budget_spent"] is True


def test_model_run_verdict(tmp_path):
    good = model_run(tmp_path, FakeModelServer(shift=0.006, log=SHARING))
    assert good["ok"], good.get("error") or good["workloads"]
    assert good["criterion_mode"] == "relative" and good["noise_backend"] == "noise"
    assert good["sharing"] == {"decode_steps": 24, "attended_kv_tokens": 3000, "unique_kv_tokens": 1000, "ratio": 3.0}
    # deft logged no sharing line: the backend did not run
    assert not model_run(tmp_path, FakeModelServer(shift=0.006))["ok"]
    # a tiny model whose tokens ignore the prefix cannot catch a wrong attention: not ok
    flat = model_run(tmp_path, FakeModelServer(shift=0.006, sensitive=False, log=SHARING),
                     ref=FakeModelServer(sensitive=False), noise=FakeModelServer(shift=0.004, sensitive=False))
    assert flat["context_sensitivity"] == 0.0 and all(w["ok"] for w in flat["workloads"].values())
    assert not flat["ok"]
    assert not model_run(tmp_path, FakeModelServer(shift=0.3, log=SHARING))["ok"]
    # No noise server served though one was asked for (a slow JIT past its timeout, say): the run fell back to
    # the absolute check and passed; now it is not ok. Without one asked for (--noise-backends ''), it may be.
    alone = model_run(tmp_path, FakeModelServer(shift=0.006, log=SHARING), noise=False)
    assert alone["criterion_mode"] == "absolute" and not alone["ok"] and "no noise server" in alone["not_ok_because"]
    assert model_run(tmp_path, FakeModelServer(shift=0.006, log=SHARING), noise=False,
                     argv=["--noise-backends", ""])["ok"]
    # On a GPU the Triton kernels must have decoded: SGLANG_DEFT_DECODE_IMPL=reference in the caller's environment
    # had the servers decode by the reference, checked against itself, and pass
    unkerneled = model_run(tmp_path, FakeModelServer(shift=0.006, log=SHARING.replace(STAGE1, "")))
    assert not unkerneled["ok"] and "logged no stage-1 kernel" in unkerneled["not_ok_because"]


def test_a_model_whose_tokens_cannot_tell_is_judged_by_its_kernel_check(tmp_path):
    """The 8b shape's dummy weights give attention outputs of ~1e-7: every logprob is the same whatever deft attends,
    so its workloads passed a deft returning zeros. Its kernel check (relative to |out|) decides."""
    check = "[x] DeFT kernel check: step=16 layer=0 rank=0 queries=4 max_abs_diff={} max_abs_out=3.7e-07 dtype=bfloat16\n"
    run = lambda log: model_run(tmp_path, FakeModelServer(shift=0.006, log=SHARING + log), sharp=False)  # noqa: E731
    assert run(check.format("9.0e-10"))["ok"]
    for log, why in ((check.format("3.0e-07"), "found a difference past rounding"), ("", "logged nothing")):
        result = run(log)
        assert all(w["ok"] for w in result["workloads"].values()) and not result["ok"]
        assert why in result["not_ok_because"], result["not_ok_because"]


def test_a_kernel_check_past_rounding_fails_a_model_whose_tokens_passed(tmp_path):
    """A sharp model's tokens can stay inside the logprob band with one token missing from a long prefix; the
    server's kernel check cannot miss it, and its warning used to leave the verdict ok."""
    check = "[x] DeFT kernel check: step=16 layer=0 rank=0 queries=4 max_abs_diff={} max_abs_out=2.0 dtype=bfloat16\n"
    assert model_run(tmp_path, FakeModelServer(shift=0.006, log=SHARING + check.format("0.001")))["ok"]
    result = model_run(tmp_path, FakeModelServer(shift=0.006, log=SHARING + check.format("0.5")))
    assert all(w["ok"] for w in result["workloads"].values()) and not result["ok"]
    assert "kernel check found 1 checks past rounding" in result["not_ok_because"], result["not_ok_because"]


class FlakyOnPrompt(FakeModelServer):
    """deft's tokens part from the reference's on every prompt whose first token is ``bad_first`` (one seed's
    prompts), at a step no near-tie could explain."""

    def __init__(self, bad_first, **kw):
        super().__init__(**kw)
        self.bad_first = bad_first

    def _one(self, prompt, n):
        out = super()._one(prompt, n)
        if prompt[0] == self.bad_first and n > 1:
            out["output_ids"][1] = out["output_ids"][1] % 290 + 4
        return out


def test_model_run_workload_seeds(tmp_path):
    import random

    two = model_run(tmp_path, FakeModelServer(shift=0.006, log=SHARING), argv=["--workload-seeds", "1234,7"])
    assert two["ok"] and two["workload_seed"] == 1234 and set(two["extra_seeds"]) == {"7"}
    seven = two["extra_seeds"]["7"]
    assert set(seven["workloads"]) == set(two["workloads"]) and seven["context_sensitivity"] == 1.0
    totals = two["seed_totals"]["fork"]
    assert totals == {"seeds": 2, "seeds_ok": 2, "requests": 8, "deft_divergences": 0, "noise_divergences": 0,
                      "failed_seeds": []}
    # a wrong answer on the second seed's prompts alone fails the model, and the totals say which seed
    first_of_7 = random.Random(7).randrange(3, SMALL["vocab"])
    bad = model_run(tmp_path, FlakyOnPrompt(first_of_7, shift=0.006, log=SHARING), argv=["--workload-seeds", "1234,7"])
    assert all(w["ok"] for w in bad["workloads"].values()) and not bad["ok"] and "error" not in bad, bad.get("error")
    assert bad["seed_totals"]["fork"]["failed_seeds"] == ["7"] and bad["seed_totals"]["fork"]["deft_divergences"] == 4
    # past the budget, the remaining seeds are skipped, said so, and the model is not ok
    late = model_run(tmp_path, FakeModelServer(shift=0.006, log=SHARING), argv=["--workload-seeds", "1234,7,8"],
                     deadline_s=g.SEED_MIN_S - 1)
    assert late["seeds_skipped"] == [7, 8] and "extra_seeds" in late and not late["extra_seeds"] and not late["ok"]
    for argv in (["--workload-seeds", "1,x"], ["--workload-seeds", "3,3"], ["--workload-seeds", ""]):
        with pytest.raises(SystemExit):
            g.parse_args(argv)


def test_a_run_that_checks_no_model_is_not_ok(tmp_path, monkeypatch, capsys):
    """A run with no model to check must not pass; --device cpu runs the tiny models only, and a GPU-sized one asked
    for there is refused by name (it was left out without a word, and tiny,8b reported ok and complete)."""
    monkeypatch.setattr(g.signal, "signal", lambda *a: None)  # main's SIGTERM handler: not in pytest's process
    monkeypatch.setattr(g, "importable_package_env", lambda: (dict(g.os.environ), tmp_path))
    assert g.main(["--out", str(tmp_path), "--device", "cpu", "--models", ","]) == 1
    report = g.json.loads((tmp_path / "gpu_e2e.json").read_text())
    assert report["models"] == {} and report["complete"] is False and report["ok"] is False
    (tmp_path / "gpu_e2e.json").unlink()
    assert g.main(["--out", str(tmp_path), "--device", "cpu", "--models", "tiny,8b"]) == 2
    assert "--device cpu runs the tiny models only, not 8b" in capsys.readouterr().err
    assert not (tmp_path / "gpu_e2e.json").exists()


@pytest.mark.parametrize("with_noise", [True, False], ids=["relative", "absolute"])
def test_a_deft_answer_shorter_than_the_reference_fails(with_noise):
    """compare_pair compares up to the shorter sequence and the requests are zipped: the counts are
    checked on their own (before, 2 tokens of 32, or 1 request of 8, passed)."""
    ref = reference()
    noise = jitter(ref, 0.01, seed=40) if with_noise else None
    truncated = [seq(r.ids[:2], r.lps[:2]) for r in ref]  # 2 of 32 tokens per request
    entry = g.judge_workload(truncated, ref, noise, CRIT, atol=0.02, tie_tol=0.1)
    assert not entry["ok"] and not entry["absolute_ok"] and "request 0: 2 tokens, the reference" in entry["failures"][0]
    entry = g.judge_workload(jitter(ref, 0.01, seed=41)[:1], ref, noise, CRIT, atol=0.02, tie_tol=0.1)
    assert not entry["ok"] and entry["failures"][0] == f"1 requests answered, the reference {len(ref)}"
    assert g.judge_workload(jitter(ref, 0.01, seed=41), ref, noise, CRIT, atol=0.02, tie_tol=0.1)["ok"]


def test_repeated_requests_count_once_in_the_model_wide_noise():
    """n > 1 greedy samples of one prompt are the same request k times: a divergence of the noise server there
    counted k times in the model-wide rate, and gave every other workload k times the allowance."""
    ref_a, ref_b = reference(seed=40), reference(n_requests=1, seed=41) * 8  # b: 8 identical samples
    noise_a, deft_a = jitter(ref_a, 0.01, seed=42), jitter(ref_a, 0.01, seed=43)
    noise_b = [diverge(jitter(ref_b[:1], 0.01, seed=44)[0], ref_b[0], t=6, gap=0.01)] * 8
    deft_b = jitter(ref_b[:1], 0.01, seed=45) * 8
    entries, pooled = g.judge_model({"a": (deft_a, ref_a, noise_a), "b": (deft_b, ref_b, noise_b)}, CRIT,
                                    atol=0.05, tie_tol=0.1)
    assert pooled["requests"] == 9 and pooled["divergences"] == 1  # not 16 and 8
    assert entries["a"]["relative"]["allowed_divergences"] == pytest.approx(2 * 8 / 9 + 1, abs=1e-3)
    assert entries["b"]["relative"]["noise_divergences"] == 1  # the workload's own count: its repeats once too
    # deft's repeats too: one near-tie flip on the one prompt, 8 times over, was 8 divergences against 1 allowed
    flipped = [diverge(jitter(ref_b[:1], 0.01, seed=46)[0], ref_b[0], t=6, gap=0.01)] * 8
    clean = jitter(ref_b[:1], 0.01, seed=47) * 8
    entry = g.judge_workload(flipped, ref_b, clean, CRIT, atol=0.05, tie_tol=0.1)
    assert entry["ok"] and entry["relative"]["deft_divergences"] == 1 and entry["divergences"] == 8, entry["failures"]
    # and the noise server's: its one flip, 8 times over, allowed deft 8 times 2 + 1 divergences, so 7 different
    # ones (each copy its own step) passed
    scattered = [diverge(jitter(ref_b[:1], 0.01, seed=48 + i)[0], ref_b[0], t=4 + i, gap=0.01) for i in range(7)]
    entry = g.judge_workload(scattered + clean[:1], ref_b, noise_b, CRIT, atol=0.05, tie_tol=0.1)
    assert entry["relative"]["deft_divergences"] == 7 and entry["relative"]["allowed_divergences"] == 3
    assert not entry["ok"] and "7 divergences > allowed 3" in entry["failures"][0], entry["failures"]


def test_repeats_merge_at_their_worst_not_at_their_first():
    """Counting repeats once kept only the first copy, so the copies after it went unchecked: deft 0.002 off on its
    first of 4 samples and 0.5 off on the other 3 passed (allowed 0.01), and so did a copy's divergence that no
    near-tie explains behind a first copy's that one does."""
    ref = reference(n_requests=1, seed=60) * 4
    clean = jitter(ref[:1], 0.001, seed=61) * 4
    first_close = jitter(ref[:1], 0.002, seed=62) + jitter(ref[:1], 0.5, seed=63) * 3
    entry = g.judge_workload(first_close, ref, clean, CRIT, atol=0.02, tie_tol=0.1)
    assert not entry["ok"] and entry["relative"]["deft_max_abs_logprob_diff"] > 0.4, entry["relative"]
    assert any(f.startswith("logprob diff 0.") for f in entry["failures"]), entry["failures"]
    near = diverge(jitter(ref[:1], 0.001, seed=64)[0], ref[0], t=6, gap=0.001)
    far = g.Seq(near.ids, near.lps, [dict(t) for t in near.tops])
    far.tops[6][ref[0].ids[6]] = near.lps[6] - 0.9  # the same tokens, but deft's own gap is no near-tie
    entry = g.judge_workload([near, far, near, near], ref, clean, CRIT, atol=0.02, tie_tol=0.1)
    assert entry["relative"]["deft_divergences"] == 1  # still one request
    assert not entry["ok"] and any("not a near-tie" in f for f in entry["failures"]), entry["failures"]
    merged = g.distinct_stats([near, far], ref[:2])
    assert len(merged) == 1 and merged[0].tie_gap == pytest.approx(0.9)
    # a copy whose other token is outside its top-k (the gap only a lower bound) keeps the merged pair unknown
    outside = g.Seq(near.ids, near.lps, [dict(t) for t in near.tops])
    del outside.tops[6][ref[0].ids[6]]
    merged, = g.distinct_stats([near, outside], ref[:2])
    assert merged.tie_in_top_k is False
    entry = g.judge_workload([near, outside, near, near], ref, clean, CRIT, atol=0.02, tie_tol=0.1)
    assert not entry["ok"] and any("outside the top-k" in f for f in entry["failures"]), entry["failures"]
    # the same tokens against two different references are two pairs
    other_ref = reference(n_requests=1, seed=65)[0]
    assert len(g.distinct_stats([clean[0], clean[0]], [ref[0], other_ref])) == 2
    assert g.judge_workload([near] * 4, ref, clean, CRIT, atol=0.02, tie_tol=0.1)["ok"]


def test_two_prompts_that_answer_alike_are_two_requests():
    """Repeats were merged by their tokens alone: two fork branches (different prompts) that answered alike, as a dummy
    model's repeated token does, and flipped alike counted as one divergence. Keyed by the prompt as well they are
    two; the n > 1 samples of one prompt stay one."""
    ref = reference(n_requests=1, seed=70) * 2
    flipped = [diverge(jitter(ref[:1], 0.001, seed=71)[0], ref[0], t=6, gap=0.001)] * 2
    assert len(g.distinct_stats(flipped, ref)) == 1  # prompts unknown: merged by tokens, as before
    payload = g.logprob_request([[5, 6, 7], [5, 6, 8]], 4)
    prompts = g.request_prompts(payload)
    assert prompts == [(5, 6, 7), (5, 6, 8)]
    tagged = [g.Seq(x.ids, x.lps, x.tops, prompt=p) for x, p in zip(flipped, prompts)]
    tagged_ref = [g.Seq(r.ids, r.lps, r.tops, prompt=p) for r, p in zip(ref, prompts)]
    assert len(g.distinct_stats(tagged, tagged_ref)) == 2
    entry = g.judge_workload(tagged, tagged_ref, jitter(ref, 0.001, seed=72), CRIT, atol=0.02, tie_tol=0.1)
    assert entry["relative"]["deft_divergences"] == 2
    one = g.request_prompts(g.logprob_request([5, 6, 7], 4, n=3))
    assert one == [(5, 6, 7)] * 3
    same = [g.Seq(x.ids, x.lps, x.tops, prompt=p) for x, p in zip(flipped + flipped[:1], one)]
    assert len(g.distinct_stats(same, [g.Seq(r.ids, r.lps, r.tops, prompt=p) for r, p in zip(ref * 2, one)])) == 1
    with pytest.raises(ValueError, match="a batch of prompts with n > 1"):
        g.request_prompts(g.logprob_request([[5], [6]], 4, n=2))
    resp = {"output_ids": [1], "meta_info": {"output_token_logprobs": [[-0.1, 1, None]],
                                             "output_top_logprobs": [[[-0.1, 1, None]]]}}
    assert g.parse_response(resp, (5, 6)).prompt == (5, 6)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="SGLang's Triton index kernel on CPU needs "
                    "TRITON_INTERPRET=1 (make test sets it)")
def test_reference_window_patch_gives_triton_decode_the_prefills_window(monkeypatch):
    """The reference server of a sliding-window model (gpu_e2e.py REFERENCE_WINDOW_PATCH, its sitecustomize) reads
    w + 1 tokens a request in decode steps, as its triton prefill masks in and deft attends, and SGLang's w in
    everything else (its extend steps' prefix windows)."""
    import torch
    import sglang.srt.layers.attention.triton_backend as triton_backend

    # the patch replaces these two attributes; monkeypatch puts SGLang's back afterwards
    monkeypatch.setattr(triton_backend, "update_sliding_window_buffer", triton_backend.update_sliding_window_buffer)
    monkeypatch.setattr(triton_backend.TritonAttnBackend, "init_forward_metadata",
                        triton_backend.TritonAttnBackend.init_forward_metadata)
    spec = importlib.util.spec_from_file_location("reference_window", g.REFERENCE_WINDOW_PATCH / "sitecustomize.py")
    patch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(patch)
    req_to_token = torch.arange(200, dtype=torch.int32).view(2, 100)
    seq_lens, rows = torch.tensor([80, 30]), torch.tensor([0, 1])

    def window(decoding: bool):
        patch._decoding.on = decoding
        try:
            _, indices, lens, start = triton_backend.update_sliding_window_buffer(
                torch.zeros(3, dtype=torch.int32), req_to_token, 63, seq_lens, rows, 2, "cpu")
        finally:
            patch._decoding.on = False
        return lens.tolist(), start.tolist(), indices[:lens[0]].tolist()

    assert window(decoding=False) == ([63, 30], [17, 0], list(range(17, 80)))
    assert window(decoding=True) == ([64, 30], [16, 0], list(range(16, 80)))
    batch = SimpleNamespace(forward_mode=SimpleNamespace(is_decode=lambda: True))
    seen = []
    monkeypatch.setattr(patch, "_init", lambda self, fb: seen.append(patch._decoding.on))
    triton_backend.TritonAttnBackend.init_forward_metadata(None, batch)
    assert seen == [True] and not patch._decoding.on  # set for a decode batch's metadata only


def test_a_windowed_models_reference_runs_eagerly_with_the_patch_and_alone(tmp_path):
    """tiny-gemma2's reference server gets the window patch on its PYTHONPATH and --disable-cuda-graph (its graph
    buffers hold w tokens a request); under --cuda-graph the deft server keeps its graphs (the reference's flag once
    leaked into the base arguments every role starts from)."""
    launched = {}

    class Fleet:
        def launch(self, model, role, backend, args, pythonpath=None):
            launched[role] = (backend, args, pythonpath)
            return SimpleNamespace(role=role)

    args = g.parse_args(["--out", str(tmp_path), "--cuda-graph"])
    run = g.ModelRun("tiny-gemma2", g.MODELS["tiny-gemma2"], Fleet(), args, {})
    run.launch_all()
    assert set(launched) == {"triton", "deft"}  # no noise server: none computes the same windows
    backend, ref_args, path = launched["triton"]
    assert backend == "triton" and "--disable-cuda-graph" in ref_args and path == g.REFERENCE_WINDOW_PATCH
    _, deft_args, path = launched["deft"]
    assert "--disable-cuda-graph" not in deft_args and path is None
    assert "--disable-cuda-graph" not in run.base
    launched.clear()
    g.ModelRun("tiny-gemma2-full", g.MODELS["tiny-gemma2-full"], Fleet(), args, {}).launch_all()
    assert launched["noise"][0] == "torch_native" and launched["triton"][2] is None


def test_the_noise_ceiling_follows_the_models_dtype(tmp_path):
    """Two correct backends part by at most ~0.2 in bf16 but ~0.09 in fp16: under one 0.3 ceiling a noise server 0.23
    off in fp16 (FlashInfer on Gemma-2) set a band twice that wide for deft."""
    ref = reference()
    noise, deft = jitter(ref, 0.22, seed=60), jitter(ref, 0.22, seed=61)
    fp16, bf16 = CRIT.for_dtype("float16"), CRIT.for_dtype("bfloat16")
    assert fp16.noise_lp_max == 0.15 and bf16.noise_lp_max == 0.3 and CRIT.for_dtype("float32") == fp16
    assert g.judge_workload(deft, ref, noise, bf16, atol=0.05, tie_tol=0.1)["ok"]
    entry = g.judge_workload(deft, ref, noise, fp16, atol=0.05, tie_tol=0.1)
    assert not entry["ok"] and "noise floor unusable: the noise server's logprob diff" in entry["failures"][0]
    # a model run records the ceiling it judged by, from the dtype its servers ran in
    assert model_run(tmp_path, FakeModelServer(shift=0.006, log=SHARING))["noise_lp_max"] == 0.15
    bf = model_run(tmp_path, FakeModelServer(shift=0.006, log=SHARING), argv=["--tiny-dtype", "bfloat16"])
    assert bf["noise_lp_max"] == 0.3 and bf["dtype"] == "bfloat16"
    assert g.model_dtype(g.MODELS["8b"], g.parse_args([])) == "bfloat16"
    assert g.model_dtype(g.MODELS["tiny"], g.parse_args(["--device", "cpu"])) == "float32"


@pytest.mark.parametrize("argv", [["--noise-backends", "flashinfer,deft"],
                                  ["--server-args=--decode-attention-backend deft"],
                                  ["--server-args=--attention-backend deft"],
                                  ["--server-args=--attention-backend=deft"],
                                  ["--noise-args=--decode-attention-backend=flashinfer"],
                                  ["--noise-args=--attention-backend deft"]])
def test_no_server_that_judges_deft_decodes_with_deft(argv):
    """A noise (or reference) server decoding with deft judges deft by itself: refused, not run."""
    with pytest.raises(SystemExit):
        g.parse_args(argv)


def test_other_backend_arguments_for_every_server_are_taken():
    assert g.parse_args(["--server-args=--attention-backend flashinfer"]).server_args == "--attention-backend flashinfer"
    assert g.parse_args(["--deft-args=--decode-attention-backend deft"]).deft_args


@pytest.mark.parametrize("with_noise", [True, False], ids=["relative", "absolute"])
def test_a_workload_with_no_step_compared_fails(with_noise):
    empty = [seq([], []) for _ in range(8)]
    entry = g.judge_workload(empty, empty, empty if with_noise else None, CRIT, atol=0.05, tie_tol=0.1)
    assert entry["steps_compared"] == 0 and not entry["ok"]
    assert "no step compared" in entry["failures"][0]


@pytest.mark.parametrize("with_noise", [True, False], ids=["relative", "absolute"])
def test_seed_totals_count_repeated_requests_once_on_both_sides(with_noise):
    """n > 1 copies of one prompt are one request in the verdict: the totals counted deft's divergences per copy and
    the noise server's once (8 against 1 for the same behaviour)."""
    ref = reference(n_requests=1, seed=70) * 8
    flipped = [diverge(jitter(ref[:1], 0.01, seed=71)[0], ref[0], t=6, gap=0.01)] * 8
    noise = flipped if with_noise else None
    entry = g.judge_workload(flipped, ref, noise, CRIT, atol=0.05, tie_tol=0.1)
    assert entry["divergences"] == 8  # per copy, as compared
    totals = g.seed_totals({"workload_seed": 1, "workloads": {"n_gt_1": entry}, "extra_seeds": {}})["n_gt_1"]
    assert totals["requests"] == 1 and totals["deft_divergences"] == 1
    assert totals["noise_divergences"] == (1 if with_noise else None)


def test_kernel_check_summary_judges_each_checks_worst_row_too():
    """A check within the batch-wide bound whose worst (query, head) row is off by more than ROW_FACTOR roundings of its
    own |out| (a long request's small outputs next to a short one's) is outside the tolerance."""
    line = ("[x] DeFT kernel check: step=16 layer=0 queries=8 max_abs_diff=0.01 max_abs_out=2.0 max_row_rel_diff={} "
            "dtype=bfloat16")
    ok = g.kernel_check_summary(line.format(0.01))
    assert ok["within_tolerance"] and ok["max_row_rel_diff"] == 0.01
    bad = g.kernel_check_summary(line.format(0.4))
    assert not bad["within_tolerance"] and bad["worst"]["max_row_rel_diff"] == 0.4
    assert bad["worst_tolerance_ratio"] == pytest.approx(0.4 / (8 * 2 ** -8))
    old = g.kernel_check_summary(line.replace(" max_row_rel_diff={}", ""))  # a server from before the row check
    assert old["within_tolerance"] and old["max_row_rel_diff"] is None


def test_the_sglang_lang_program_ends_when_a_server_stops_answering_mid_program():
    """SGLang's interpreter ends its worker thread at a failed request, and the program's next fork then waited for
    that worker forever: a server dying mid-program hung the run until the session's timeout. Here a server answers
    the endpoint's model-info request and closes every generate request unanswered."""
    import json
    import threading
    import time
    import warnings
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Dying(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = json.dumps({"model_path": "tiny"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.close_connection = True

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Dying)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        server = SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_address[1]}")
        start = time.monotonic()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SGLang's "Error in stream_executor" traceback
            with pytest.raises(TimeoutError, match="did not finish within 2 s: a server stopped answering"):
                g.run_lang_program({g.REFERENCE: server, "deft": server}, timeout_s=2)
        assert time.monotonic() - start < 10
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_stopping_a_launcher_that_survives_sigkill_does_not_wait_forever(tmp_path, monkeypatch):
    """Fleet.stop waited on a SIGKILLed launcher without a limit: one stuck in a GPU driver's teardown hung the run
    until the session's timeout, and the models after it never ran. It waits KILLED_WAIT_S, as ServerProcess does."""
    import subprocess

    # A real process group for the signals: a sleep left behind by a shell that has exited (and been reaped), so
    # that the group ends when the sleep does.
    shell = subprocess.Popen(["sh", "-c", "sleep 600 &"], start_new_session=True)
    shell.wait()

    class StuckProc:  # the launcher's Popen, never reaped: SIGTERM and SIGKILL leave it "running"
        pid = shell.pid

        def poll(self):
            return None

        def wait(self, timeout=None):
            if timeout is None:
                raise AssertionError("an unbounded wait on a launcher that survived SIGKILL")
            raise subprocess.TimeoutExpired("launcher", timeout)

    monkeypatch.setattr(g, "KILLED_WAIT_S", 0.1)
    fleet = g.Fleet(env={}, cwd=tmp_path, log_dir=tmp_path, clock=g.Clock())
    fleet.running.append(g.Launched("deft", "deft", SimpleNamespace(name="tiny-deft", proc=StuckProc(),
                                                                    stop=lambda: None), 0.0))
    t0 = g.time.monotonic()
    try:
        fleet.stop_all()
    finally:
        try:
            os.killpg(shell.pid, g.signal.SIGKILL)  # (whatever stop_all did not end)
        except ProcessLookupError:
            pass
    assert fleet.running == [] and g.time.monotonic() - t0 < 10
