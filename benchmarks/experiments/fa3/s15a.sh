#!/usr/bin/env bash
# Session 15: large units in fa3co beside the small units (PDL): smoke on p16k_64, then the A/B (ab_coresident.py).
source .kit/bootstrap.sh >/dev/null 2>&1
OV=$(python3 scripts/gpu_e2e.py --make-overlay /tmp/ov)
export PYTHONPATH=$OV:$PYTHONPATH
D=benchmarks/experiments/fa3
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
CASES=p16k_64 SPECS=176:1 MODES=coq OUT=/tmp timeout 120 python3 $D/ab_coresident.py 2>&1 | grep -v Warn | tail -5 | tee $OUT/smoke.txt
echo "smoke rc=${PIPESTATUS[0]}" | tee -a $OUT/smoke.txt
grep -q "smoke rc=0" $OUT/smoke.txt || exit 1
SPECS=${SPECS:-132:1,176:1,132:4} CASES=${CASES:-p16k_64,p4k_64,p1k_256,tree3,p4k_16,spec,nosharing} OUT=$OUT \
  timeout ${AB_S:-380} python3 $D/ab_coresident.py 2>&1 | grep -v Warn | tail -12
