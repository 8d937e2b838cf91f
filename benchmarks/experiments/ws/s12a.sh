#!/usr/bin/env bash
# Session 12, call A: warp-specialized stage 1 (smoke under timeout, then A/B against main).
source .kit/bootstrap.sh >/dev/null 2>&1
OV=$(python3 scripts/gpu_e2e.py --make-overlay /tmp/ov)
export PYTHONPATH=$OV:$PYTHONPATH
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv | tee $OUT/gpu.txt
for f in stage1_ws ws_r4; do
  timeout 120 python3 benchmarks/experiments/ws/smoke.py benchmarks/experiments/ws/$f.py p4k_16 spec p16k_64 2>&1 | tail -5 | tee -a $OUT/smoke.txt
  echo "$f rc=${PIPESTATUS[0]}" | tee -a $OUT/smoke.txt
done
if grep -q "stage1_ws rc=0" $OUT/smoke.txt; then
  V="main=main:64:4,ws2=benchmarks/experiments/ws/stage1_ws.py:64:4,ws2p2=benchmarks/experiments/ws/stage1_ws.py:64:2"
  grep -q "ws_r4 rc=0" $OUT/smoke.txt && V="$V,ws4p2=benchmarks/experiments/ws/ws_r4.py:64:2"
  VARIANTS=$V OUT=$OUT timeout 420 python3 benchmarks/experiments/ab_stage1.py 2>&1 | grep -v Warning | tail -12
fi
