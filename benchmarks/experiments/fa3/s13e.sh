#!/usr/bin/env bash
# Session 13, call E: stage1_fa3mix (FA3-shaped large units beside a small-unit worker warpgroup):
# smoke under timeout, then the whole step against main and fa3pp.
source .kit/bootstrap.sh >/dev/null 2>&1
OV=$(python3 scripts/gpu_e2e.py --make-overlay /tmp/ov)
export PYTHONPATH=$OV:$PYTHONPATH
D=benchmarks/experiments/fa3
timeout 120 python3 $D/smoke.py $D/stage1_fa3mix.py 2 p4k_16 spec p16k_64 tree3 nosharing p1k_256 2>&1 | grep -v Warn | tail -7 | tee -a $OUT/smoke.txt
echo "stage1_fa3mix rc=${PIPESTATUS[0]}" | tee -a $OUT/smoke.txt
grep -q "fa3mix rc=0" $OUT/smoke.txt || exit 1
V="main=main:64:4,pp1=$D/stage1_fa3pp.py:128:1,mix1=$D/stage1_fa3mix.py:128:1,mix2=$D/stage1_fa3mix.py:128:2,mix4=$D/stage1_fa3mix.py:128:4"
AB_JSON=ab_step.json VARIANTS=$V OUT=$OUT timeout 240 python3 benchmarks/experiments/ab_stage1.py 2>&1 | grep -v Warn | tail -7
LARGE_ONLY=1 CASES=p16k_64,p1k_256 AB_JSON=ab_large.json VARIANTS=$V OUT=$OUT timeout 100 python3 benchmarks/experiments/ab_stage1.py 2>&1 | grep -v Warn | tail -2
