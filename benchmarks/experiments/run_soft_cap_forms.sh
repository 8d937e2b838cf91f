#!/usr/bin/env bash
# soft_cap_forms.py's tanh forms on the GPU host, one call (carry .kit):
#   source .kit/bootstrap.sh; OUT=$OUT bash benchmarks/experiments/run_soft_cap_forms.sh
# Writes $OUT/soft_cap_accuracy.json (each form against float64's tanh), $OUT/ab_soft_cap.json (ab_stage1.py with
# CAP=50: main's ex2s against the three variants and the portable Triton stage 1, each checked against the capped
# reference), $OUT/ab_soft_cap_q8.json (the same with q x 8), $OUT/ab_uncapped.json (main and the portable stage 1
# without a cap, for the cap's cost) and,
# with TESTS=1, the capped GPU tests.
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:?set OUT}
say() { echo "[soft_cap_forms $(date +%T)] $*" | tee -a "$OUT/soft_cap_forms.log"; }
OVERLAY=$(python3 scripts/gpu_e2e.py --make-overlay /tmp/sglang_deft_overlay) || exit 2
export PYTHONPATH="$OVERLAY:${PYTHONPATH:-}"
python3 benchmarks/experiments/soft_cap_forms.py variants /tmp/cap_forms >> "$OUT/soft_cap_forms.log" 2>&1
say "$(nvidia-smi --query-gpu=name --format=csv,noheader)"
timeout -k 10 "${ACC_S:-120}" python3 benchmarks/experiments/soft_cap_forms.py accuracy "$OUT/soft_cap_accuracy.json" \
  >> "$OUT/soft_cap_forms.log" 2>&1
say "accuracy rc=$?"
V="ex2s=main:64:4"
for f in rational approx ex2; do V="$V,$f=/tmp/cap_forms/stage1_hopper_$f.py:64:4"; done
V="$V,triton=triton:64:4"  # the portable Triton stage 1 (off-Hopper GPUs, fp32): its cap's cost too
mkdir -p /tmp/ab_cap /tmp/ab_cap_q8 /tmp/ab_uncapped
(cd "$OVERLAY" && CAP=50 OUT=/tmp/ab_cap VARIANTS="$V" timeout -k 10 "${AB_S:-200}" \
  python3 "$REPO/benchmarks/experiments/ab_stage1.py") >> "$OUT/soft_cap_forms.log" 2>&1
say "ab capped rc=$?"
cp /tmp/ab_cap/ab_stage1.json "$OUT/ab_soft_cap.json"
# q x 8: scores near the cap, where the forms' errors show in the output
(cd "$OVERLAY" && CAP=50 QSCALE=8 OUT=/tmp/ab_cap_q8 VARIANTS="$V" timeout -k 10 "${AB_S:-200}" \
  python3 "$REPO/benchmarks/experiments/ab_stage1.py") >> "$OUT/soft_cap_forms.log" 2>&1
say "ab capped, q x 8, rc=$?"
cp /tmp/ab_cap_q8/ab_stage1.json "$OUT/ab_soft_cap_q8.json"
(cd "$OVERLAY" && OUT=/tmp/ab_uncapped VARIANTS="uncapped=main:64:4,triton=triton:64:4" timeout -k 10 "${AB_S:-200}" \
  python3 "$REPO/benchmarks/experiments/ab_stage1.py") >> "$OUT/soft_cap_forms.log" 2>&1
say "ab uncapped rc=$?"
cp /tmp/ab_uncapped/ab_stage1.json "$OUT/ab_uncapped.json"
if [ -n "${TESTS:-}" ]; then  # TESTS=1
  K="cap or nan or refus or own_strides or matches_triton"
  (cd "$OVERLAY" && timeout -s INT -k 10 "${PYTEST_S:-200}" python3 -m pytest "$REPO/tests/test_kernels.py" \
    -k "$K" -q -rfEs -p no:cacheprovider) > "$OUT/pytest_cap.log" 2>&1
  say "pytest -k '$K' rc=$?: $(tail -1 "$OUT/pytest_cap.log")"
fi
