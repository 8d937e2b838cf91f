#!/usr/bin/env bash
# The Hopper stage-1 kernel under Triton 3.5.1, the Triton that `pip install sglang==0.5.10.post1` brings (torch
# 2.9.1 pins it), on the GPU host, whose own Triton is 3.6. Gluon 3.5 has no mma.sync, so there the small tiles run
# on the large tiles' wgmma (stage1_hopper.launch's small_wgmma); before that, such an install got the portable Triton kernel.
#
# Needs no devkit: the host's python3 has torch, triton 3.6 and pytest; Triton 3.5.1 travels as .t351/triton351.tar.xz,
# the cp312 wheel's tree with libtriton.so stripped (--strip-unneeded: 401 to 142 MB) and its profiler, CUPTI and
# instrumentation libraries left out (40 MB as tar.xz). Build it on the dev machine:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d /tmp/tw triton==3.5.1
#   unzip the wheel to a folder; strip --strip-unneeded triton/_C/libtriton.so; rm -rf triton/_C/libproton.so \
#     triton/backends/nvidia/lib/cupti triton/instrumentation; tar cf - triton triton-3.5.1.dist-info | xz -9 \
#     > .t351/triton351.tar.xz
# then on the host (carry .t351): OUT=$OUT bash benchmarks/experiments/run_triton35.sh [t351|t36|all]
#
#   t351: Triton 3.5.1 first on the path: the kernel tests (tests/test_kernels.py, test_plan.py) and ab_stage1.py,
#         the portable Triton kernel (what such an install ran) against the Hopper kernel;
#   t36:  the host's Triton 3.6: the small tiles' two paths, mma.sync (main's) against wgmma, by ab_stage1.py and the
#         test that runs both.
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:?set OUT}
WHAT=${1:-all}
OVERLAY=$(python3 scripts/gpu_e2e.py --make-overlay /tmp/sglang_deft_overlay) || exit 2
say() { echo "[run_triton35 $(date +%T)] $*" | tee -a "$OUT/run_triton35.log"; }
xdist=()
if python3 -c "import xdist" 2>/dev/null; then xdist=(-n 4); fi

if [ "$WHAT" = t351 ] || [ "$WHAT" = all ]; then
  mkdir -p /tmp/t351 && tar xJf .t351/triton351.tar.xz -C /tmp/t351 || exit 2
  path351="/tmp/t351:$OVERLAY"
  say "triton $(PYTHONPATH=$path351 python3 -c 'import triton; print(triton.__version__, triton.__file__)')"
  (cd "$OVERLAY" && PYTHONPATH=$path351 timeout -s INT -k 10 "${PYTEST_S:-200}" python3 -m pytest \
      "$REPO/tests/test_kernels.py" "$REPO/tests/test_plan.py" -k "not plan_cpu_time_256_queries" \
      -q -rfEs -p no:cacheprovider "${xdist[@]}" --junitxml="$OUT/pytest_t351.xml") > "$OUT/pytest_t351.log" 2>&1
  say "pytest (Triton 3.5.1) rc=$?: $(tail -1 "$OUT/pytest_t351.log")"
  (cd "$OVERLAY" && PYTHONPATH=$path351 OUT=/tmp VARIANTS="triton=triton:64:4,hopper=main:64:4" \
      timeout -k 10 "${AB_S:-170}" python3 "$REPO/benchmarks/experiments/ab_stage1.py") >> "$OUT/run_triton35.log" 2>&1
  say "ab_stage1 (Triton 3.5.1) rc=$?"
  cp /tmp/ab_stage1.json "$OUT/ab_triton351.json"
fi

if [ "$WHAT" = t36 ] || [ "$WHAT" = all ]; then
  # A copy of the module whose launch puts small tiles on wgmma by default, as under Triton 3.5.
  sed 's/small_wgmma: bool = SMALL_TILES_ON_WGMMA/small_wgmma: bool = True/' kernels/stage1_hopper.py > /tmp/stage1_wgmma.py
  grep -q "small_wgmma: bool = True" /tmp/stage1_wgmma.py || { say "the copy did not change"; exit 2; }
  say "triton $(PYTHONPATH=$OVERLAY python3 -c 'import triton; print(triton.__version__)')"
  (cd "$OVERLAY" && PYTHONPATH=$OVERLAY OUT=/tmp VARIANTS="mma=main:64:4,wgmma=/tmp/stage1_wgmma.py:64:4" \
      timeout -k 10 "${AB_S:-170}" python3 "$REPO/benchmarks/experiments/ab_stage1.py") >> "$OUT/run_triton35.log" 2>&1
  say "ab_stage1 (Triton 3.6) rc=$?"
  cp /tmp/ab_stage1.json "$OUT/ab_triton36_small_wgmma.json"
  (cd "$OVERLAY" && PYTHONPATH=$OVERLAY timeout -s INT -k 10 120 python3 -m pytest "$REPO/tests/test_kernels.py" \
      -k "small_tiles_on_either_mma or runs_the_hopper" -q -rfEs -p no:cacheprovider "${xdist[@]}") \
      > "$OUT/pytest_t36.log" 2>&1
  say "pytest (Triton 3.6) rc=$?: $(tail -1 "$OUT/pytest_t36.log")"
fi
