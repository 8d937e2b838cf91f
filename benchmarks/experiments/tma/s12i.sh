#!/usr/bin/env bash
# Session 12, call I: TMA loads for full KV blocks (upper bound: contiguity assumed; chunks 32-aligned).
source .kit/bootstrap.sh >/dev/null 2>&1
OV=$(python3 scripts/gpu_e2e.py --make-overlay /tmp/ov)
export PYTHONPATH=$OV:$PYTHONPATH
timeout 150 python3 benchmarks/experiments/tma/smoke.py benchmarks/experiments/tma/stage1_tma.py p4k_16 spec p16k_64 nosharing 2>&1 | tail -6 | tee $OUT/smoke.txt
rc=${PIPESTATUS[0]}; echo "tma rc=$rc"
if [ $rc = 0 ]; then
VARIANTS=main=main:64:4,tma=benchmarks/experiments/tma/stage1_tma.py:64:4 OUT=$OUT timeout 300 python3 benchmarks/experiments/ab_stage1.py 2>&1 | grep -v Warning | tail -8
fi
