#!/usr/bin/env bash
# Session 13, call A: the FA3-shaped stage 1 (smoke under timeout, then A/B against main: whole step,
# then the large-tile items alone).
source .kit/bootstrap.sh >/dev/null 2>&1
OV=$(python3 scripts/gpu_e2e.py --make-overlay /tmp/ov)
export PYTHONPATH=$OV:$PYTHONPATH
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv | tee $OUT/gpu.txt
F=benchmarks/experiments/fa3/stage1_fa3.py
timeout 150 python3 benchmarks/experiments/fa3/smoke.py $F 2 p4k_16 spec p16k_64 tree3 2>&1 | grep -v Warn | tail -6 | tee $OUT/smoke.txt
echo "rc=${PIPESTATUS[0]}" | tee -a $OUT/smoke.txt
if grep -q "rc=0" $OUT/smoke.txt; then
  V="main=main:64:4,fa3p1=$F:128:1,fa3p2=$F:128:2,fa3p4=$F:128:4"
  LARGE_ONLY=1 CASES=p16k_64,p4k_64,p1k_256 AB_JSON=ab_large.json VARIANTS=$V OUT=$OUT timeout 150 python3 benchmarks/experiments/ab_stage1.py 2>&1 | grep -v Warn | tail -4
  AB_JSON=ab_step.json VARIANTS=$V OUT=$OUT timeout 240 python3 benchmarks/experiments/ab_stage1.py 2>&1 | grep -v Warn | tail -8
fi
