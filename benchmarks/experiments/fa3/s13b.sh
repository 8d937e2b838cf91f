#!/usr/bin/env bash
# Session 13, call B: the FA3-shaped stage 1 with its two consumers as separate partitions (smoke under
# timeout, then the large-tile items alone and the whole step against main).
source .kit/bootstrap.sh >/dev/null 2>&1
OV=$(python3 scripts/gpu_e2e.py --make-overlay /tmp/ov)
export PYTHONPATH=$OV:$PYTHONPATH
D=benchmarks/experiments/fa3
for f in stage1_fa3pp stage1_fa3pp_b64; do
  timeout 100 python3 $D/smoke.py $D/$f.py 2 p4k_16 spec p16k_64 tree3 2>&1 | grep -v Warn | tail -5 | tee -a $OUT/smoke.txt
  echo "$f rc=${PIPESTATUS[0]}" | tee -a $OUT/smoke.txt
done
V="main=main:64:4,fa3p1=$D/stage1_fa3.py:128:1"
for f in stage1_fa3pp stage1_fa3pp_b64; do
  grep -q "$f rc=0" $OUT/smoke.txt && V="$V,${f#stage1_}p1=$D/$f.py:128:1,${f#stage1_}p2=$D/$f.py:128:2,${f#stage1_}p4=$D/$f.py:128:4"
done
LARGE_ONLY=1 CASES=p16k_64,p4k_64,p1k_256,tree3 AB_JSON=ab_large.json VARIANTS=$V OUT=$OUT timeout 200 python3 benchmarks/experiments/ab_stage1.py 2>&1 | grep -v Warn | tail -4
AB_JSON=ab_step.json VARIANTS=$V OUT=$OUT timeout 240 python3 benchmarks/experiments/ab_stage1.py 2>&1 | grep -v Warn | tail -8
