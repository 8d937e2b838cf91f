#!/usr/bin/env bash
# Session 13, call C: the FA3-shaped stage 1 with a dynamic work queue and producer-loaded Q (smoke
# under timeout, then the large-tile items alone and the whole step against main).
source .kit/bootstrap.sh >/dev/null 2>&1
OV=$(python3 scripts/gpu_e2e.py --make-overlay /tmp/ov)
export PYTHONPATH=$OV:$PYTHONPATH
D=benchmarks/experiments/fa3
timeout 100 python3 $D/smoke.py $D/stage1_fa3dyn.py 2 p4k_16 spec p16k_64 tree3 nosharing 2>&1 | grep -v Warn | tail -6 | tee -a $OUT/smoke.txt
echo "stage1_fa3dyn rc=${PIPESTATUS[0]}" | tee -a $OUT/smoke.txt
V="main=main:64:4,pp1=$D/stage1_fa3pp.py:128:1"
grep -q "fa3dyn rc=0" $OUT/smoke.txt && V="$V,dyn1=$D/stage1_fa3dyn.py:128:1,dyn2=$D/stage1_fa3dyn.py:128:2,dyn4=$D/stage1_fa3dyn.py:128:4,dyn8=$D/stage1_fa3dyn.py:128:8"
LARGE_ONLY=1 CASES=p16k_64,p4k_64,p1k_256,tree3 AB_JSON=ab_large.json VARIANTS=$V OUT=$OUT timeout 200 python3 benchmarks/experiments/ab_stage1.py 2>&1 | grep -v Warn | tail -4
AB_JSON=ab_step.json VARIANTS=$V OUT=$OUT timeout 240 python3 benchmarks/experiments/ab_stage1.py 2>&1 | grep -v Warn | tail -8
