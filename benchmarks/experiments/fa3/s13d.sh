#!/usr/bin/env bash
# Session 13, call D: fa3dyn2 (the producer's per-unit loads a unit ahead): smoke, large tiles alone
# against main / fa3pp / fa3dyn, the whole step, and the two-launch hybrid (ab_split.py).
source .kit/bootstrap.sh >/dev/null 2>&1
OV=$(python3 scripts/gpu_e2e.py --make-overlay /tmp/ov)
export PYTHONPATH=$OV:$PYTHONPATH
D=benchmarks/experiments/fa3
timeout 100 python3 $D/smoke.py $D/stage1_fa3dyn2.py 2 p4k_16 spec p16k_64 tree3 nosharing 2>&1 | grep -v Warn | tail -6 | tee -a $OUT/smoke.txt
echo "stage1_fa3dyn2 rc=${PIPESTATUS[0]}" | tee -a $OUT/smoke.txt
grep -q "fa3dyn2 rc=0" $OUT/smoke.txt || exit 1
V="main=main:64:4,pp1=$D/stage1_fa3pp.py:128:1,pp4=$D/stage1_fa3pp.py:128:4,dyn4=$D/stage1_fa3dyn.py:128:4,dyn2_1=$D/stage1_fa3dyn2.py:128:1,dyn2_2=$D/stage1_fa3dyn2.py:128:2,dyn2_4=$D/stage1_fa3dyn2.py:128:4,dyn2_8=$D/stage1_fa3dyn2.py:128:8"
LARGE_ONLY=1 CASES=p16k_64,p4k_64,p1k_256,tree3 AB_JSON=ab_large.json VARIANTS=$V OUT=$OUT timeout 200 python3 benchmarks/experiments/ab_stage1.py 2>&1 | grep -v Warn | tail -4
AB_JSON=ab_step.json VARIANTS=$V OUT=$OUT timeout 200 python3 benchmarks/experiments/ab_stage1.py 2>&1 | grep -v Warn | tail -7
VARIANTS="pp4=$D/stage1_fa3pp.py:4,dyn2_2=$D/stage1_fa3dyn2.py:2,dyn2_4=$D/stage1_fa3dyn2.py:4,dyn2_8=$D/stage1_fa3dyn2.py:8" OUT=$OUT timeout 150 python3 $D/ab_split.py 2>&1 | grep -v Warn | tail -7
