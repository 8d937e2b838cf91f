"""Checking the Triton kernels against the fp32 PyTorch reference inside a running server.

``SGLANG_DEFT_VERIFY_EVERY=N`` (default 0: off) makes every N-th eager decode step compute the first attention
layer's attention (and, in a model with sliding-window layers, the first of the other kind's too) twice, with
the Triton kernels (whose output the model uses) and with ``tree_decode_reference`` (fp32, grouped PyTorch) on the
same q and KV pool, and log

    DeFT kernel check: step=120 layer=0 rank=0 queries=64 max_abs_diff=0.0039 max_abs_out=0.93 max_row_rel_diff=0.0061 max_abs_score=21.4 dtype=bfloat16

The reference reads each request's KV on its own, straight from SGLang's ``req_to_token`` and ``seq_lens``
(:func:`request_tree`; a window layer's last ``window`` tokens of it), not through the radix tree or deft's tree
builder: a KV tree that drops, repeats or borrows a token is caught as a kernel error is.
``max_abs_diff`` is the kernels' error against the fp32 reference in the model's dtype: expect
bf16/fp16 rounding of the output (a few 1e-3 at |out| ~ 1 in bf16), where a wrong tree, slot or
mask gives O(|out|). Each (query, head) row is also judged at its own magnitude: ``max_row_rel_diff`` is the largest
row's difference over that row's largest |out| (rows ``ROW_FLOOR`` below the batch's largest |out| taken at that
floor), since one batch-wide |out| let a long request's output, far smaller than a short one's, be 40% wrong unseen.
``max_abs_score`` is the step's largest |score| (scaled, capped), which float32's rounding grows with (:func:`roundoff`).
A difference past ``2 x roundoff x max_abs_out``, or a row's past ``ROW_FACTOR x roundoff`` of its own,
is also logged as a warning that says what to do. The check reads the result on the host (a device synchronisation) and costs a
reference attention, so it is a diagnostic, not a serving mode; CUDA-graph replays are not checked
(run with ``--disable-cuda-graph`` to check every N-th step). Tools read the lines back with
:func:`parse_kernel_check_lines`.
"""
from __future__ import annotations

import logging
import math
import re

import torch

from sglang_deft.env_numbers import env_number
from sglang_deft.kernels import KVTree, max_abs_score, plan_reference, tree_decode_reference

logger = logging.getLogger(__name__)
# One rounding of the output in each dtype (its unit roundoff): the kernels' error against the fp32 reference is a
# few of these times |out|, a wrong tree, slot or mask's is O(|out|). float32's is looser than its unit roundoff
# (2^-24): there the output's one rounding is below what the kernels' and the reference's sums over many tokens, in
# different orders, differ by. scripts/gpu_e2e.py judges its runs by it too.
ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 2.0 ** -20}
# Per unit of the step's largest |score| (``max_abs_score``), added to the roundoff: the kernels and the reference
# round each score s in float32, which moves its softmax weight by about |s| float32 roundoffs (2^-24), and real
# models' scores reach 30-60. 4 roundoffs per unit: a float32 layer with scores to 48 differed from the reference by
# 13 x 2^-20 of |out| (the reference off the float64 truth by 7x the kernels); the half-precision bounds hardly move.
SCORE_ROUNDOFF = 2.0 ** -22
# A row's own bound, relative to its largest |out|: the output's rounding (one roundoff) plus stage 1's P rounded to the
# dtype for the P x V product, whose error over a near-uniform row's tokens is about another roundoff of |out| (random
# V's sums cancel as the output's do); 8 leaves 4x that. A token missing from a 4k-token row (~1.6% of its output) stays
# under it in bf16 (3.1%) but not in fp16 (0.4%); a wrong slot range or mask is far over it in both.
ROW_FACTOR = 8
# Rows whose largest |out| is below the batch's times this are judged at that floor (a padding row's zeros, a row
# whose values all but cancel): their rounding is the larger rows' in absolute terms, not relative to their own.
ROW_FLOOR = 2.0 ** -10


def roundoff(dtype: str, max_abs_score: float = 0.0) -> float:
    """One rounding of a check's output, relative to |out|: the dtype's roundoff plus ``SCORE_ROUNDOFF`` per unit of
    the step's largest |score| (0 for lines from servers before it: their bound as it was). A dtype other than the
    kernels' three is an error, not bf16's looser bound (a line cut inside ``dtype=float16`` read as ``float``
    passed an fp16 check 2x past its rounding); a NaN score makes no bound (NaN: the check fails)."""
    if dtype not in ROUNDOFF:
        raise ValueError(f"kernel check of dtype {dtype!r}: the kernels compute in {', '.join(ROUNDOFF)}")
    return ROUNDOFF[dtype] + SCORE_ROUNDOFF * max_abs_score


def allowed_diff(dtype: str, max_abs_out: float, max_abs_score: float = 0.0) -> float:
    """The largest kernel-vs-reference difference that is rounding: twice ``roundoff`` times |out|."""
    return 2 * roundoff(dtype, max_abs_score) * max_abs_out


def tolerance_ratio(row: dict) -> float:
    """A check's difference over what rounding allows, the larger of the batch's (``allowed_diff``) and its worst
    row's (``ROW_FACTOR``; lines without ``max_row_rel_diff``, from servers before it, by the batch's alone); NaN: inf."""
    score = row.get("max_abs_score", 0.0)
    allowed = allowed_diff(row["dtype"], row["max_abs_out"], score)
    ratios = [row["max_abs_diff"] / allowed if allowed > 0 else (0.0 if row["max_abs_diff"] == 0 else math.inf)]
    if "max_row_rel_diff" in row:
        ratios.append(row["max_row_rel_diff"] / (ROW_FACTOR * roundoff(row["dtype"], score)))
    return math.inf if any(r != r for r in ratios) else max(ratios)


def within_tolerance(row: dict) -> bool:
    """Whether a check's difference is rounding, the batch's at its |out| and each row's at its own (NaN: False): the
    server's verdict, which tools reading the logged lines back apply as it did."""
    return tolerance_ratio(row) <= 1

ENV = "SGLANG_DEFT_VERIFY_EVERY"
LOG_PREFIX = "DeFT kernel check:"
_FIELD = re.compile(r"(\w+)=([0-9.e+-]+|\w+)")


def verify_every() -> int:
    """Decode steps between two checks (0: never), from ``SGLANG_DEFT_VERIFY_EVERY``."""
    return env_number(ENV, "0", int, lambda every: every >= 0, "a number of decode steps >= 0 (0 turns the check off)")


def request_tree(req_to_token: torch.Tensor, pool_indices: list[int], seq_lens: list[int], rows: int,
                 window_tokens: int | None = None) -> KVTree:
    """The check's ground truth: one root per request holding its KV slots as SGLang's ``req_to_token`` row has them
    (its last ``window_tokens`` with a window), and an empty root for the ``rows`` past the requests (a padded batch's
    rows, which attend nothing). Nothing shared, nothing from the radix tree."""
    starts = [0 if window_tokens is None else max(0, n - window_tokens) for n in seq_lens]
    lens = [n - s for s, n in zip(starts, seq_lens)]
    B = len(seq_lens)
    kv = (torch.cat([req_to_token[i, s:n] for i, s, n in zip(pool_indices, starts, seq_lens)]) if B else
          torch.zeros(0, dtype=torch.int32, device=req_to_token.device))
    indptr = [0]
    for n in lens + ([0] if rows > B else []):
        indptr.append(indptr[-1] + n)
    nodes = len(indptr) - 1
    return KVTree(kv.to(torch.int32), torch.tensor(indptr, dtype=torch.int32),
                  torch.full((nodes,), -1, dtype=torch.int32),
                  torch.tensor(list(range(B)) + [B] * (rows - B), dtype=torch.int32))


def check_layer(out: torch.Tensor, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                tree: KVTree, sm_scale: float, logit_cap: float, step: int, layer_id: int,
                k_scale: float = 1.0, v_scale: float = 1.0, rank: int = 0) -> dict:
    """Compare the kernels' ``out`` [B, Hq, D] with the fp32 reference on the same inputs; logs and
    returns the figures. ``rank``: the TP rank (each checks its own heads, so each logs its line)."""
    plan = plan_reference(tree, q.device)
    reference = tree_decode_reference(q, k_buffer, v_buffer, plan, sm_scale, logit_cap,
                                      out=torch.empty(out.shape, dtype=torch.float32, device=out.device),
                                      k_scale=k_scale, v_scale=v_scale)
    row = {"step": step, "layer": layer_id, "rank": rank, "queries": out.shape[0], "max_abs_diff": 0.0,
           "max_abs_out": 0.0, "max_row_rel_diff": 0.0, "max_abs_score": 0.0,
           "dtype": str(out.dtype).removeprefix("torch.")}
    if out.numel():
        diff = (out.float() - reference).abs().amax(dim=-1)  # [B, Hq]: each (query, head) row's largest difference
        size = reference.abs().amax(dim=-1)
        batch_diff, batch_out = diff.max(), size.max()
        floor = (batch_out * ROW_FLOOR).clamp_min(torch.finfo(torch.float32).tiny)
        # NaN propagates through max (a NaN output fails the check); 0 / floor = 0 for rows that are exactly right.
        row_rel = (diff / torch.maximum(size, floor)).max()
        score = max_abs_score(q, k_buffer, plan, sm_scale, logit_cap, k_scale)
        # One device-to-host copy for the four figures (the check is a diagnostic, but one sync, not four).
        row["max_abs_diff"], row["max_abs_out"], row["max_row_rel_diff"], row["max_abs_score"] = torch.stack(
            [batch_diff, batch_out, row_rel, score]).tolist()
    logger.info("%s step=%d layer=%d rank=%d queries=%d max_abs_diff=%.6g max_abs_out=%.6g max_row_rel_diff=%.6g "
                "max_abs_score=%.6g dtype=%s", LOG_PREFIX, row["step"], row["layer"], row["rank"], row["queries"],
                row["max_abs_diff"], row["max_abs_out"], row["max_row_rel_diff"], row["max_abs_score"], row["dtype"])
    row["within_tolerance"] = within_tolerance(row)
    if not row["within_tolerance"]:
        allowed = allowed_diff(row["dtype"], row["max_abs_out"], row["max_abs_score"])
        logger.warning("deft: the kernels' output of layer %d at step %d (rank %d) differs from the fp32 reference by "
                       "%.4g (at |out| %.4g; %.4g allowed), and by %.4g of its own |out| in its worst (query, head) "
                       "row (%.4g allowed): more than %s rounding allows. A wrong plan or kernel for this batch. Serve "
                       "with SGLANG_DEFT_DECODE_IMPL=reference --disable-cuda-graph to decode by the reference "
                       "meanwhile, and report the log's 'tree decode stage 1' and kernel-check lines",
                       layer_id, step, rank, row["max_abs_diff"], row["max_abs_out"], allowed, row["max_row_rel_diff"],
                       ROW_FACTOR * roundoff(row["dtype"], row["max_abs_score"]), row["dtype"])
    return row


def parse_kernel_check_lines(text: str) -> list[dict]:
    """Every kernel-check line in a log, as dicts (numbers as int/float, dtype as str). A line cut short (a log read
    while the server writes it) is left out, as ``parse_sharing_lines`` leaves it: one cut before its last field
    had no dtype, and ``within_tolerance`` raised KeyError on it; one cut inside it has no dtype the kernels know."""
    rows = []
    for line in text.splitlines():
        if LOG_PREFIX not in line:
            continue
        row = {}
        try:
            for key, value in _FIELD.findall(line.split(LOG_PREFIX, 1)[1]):
                if key == "dtype":
                    row[key] = value
                else:
                    row[key] = int(value) if key in ("step", "layer", "rank", "queries") else float(value)
        except ValueError:  # cut inside a number ("3.8147e"): a cut line, left out as the others are
            continue
        if row.get("dtype") in ROUNDOFF:
            rows.append(row)
    return rows
