#!/usr/bin/env bash
# Session 15, call B: fa3co's ring depth and two small programs beside each CTA (small kernel at 64
# registers, ring 3), p16k_64 at 112 and 128 large units; then timelines of two configurations.
source .kit/bootstrap.sh >/dev/null 2>&1
OV=$(python3 scripts/gpu_e2e.py --make-overlay /tmp/ov)
export PYTHONPATH=$OV:$PYTHONPATH
D=benchmarks/experiments/fa3
for cfg in "4 -" "3 -" "3 64" "2 64" "3 80"; do
  set -- $cfg
  export FA3CO_RING=$1
  if [ "$2" = "-" ]; then unset SMALL_MAXNREG; else export SMALL_MAXNREG=$2; fi
  echo "== ring $1 small maxnreg $2"
  SPECS=152:1,176:1 MODES=coq_u,large_u CASES=${CASES:-p16k_64} OUT=$OUT timeout 100 python3 $D/ab_coresident.py 2>&1 | grep -v Warn | tail -2
  mv $OUT/ab_coresident.json $OUT/ab_ring$1_small$2.json
done
for cfg in "4 -" "3 64"; do
  set -- $cfg
  export FA3CO_RING=$1
  if [ "$2" = "-" ]; then unset SMALL_MAXNREG; else export SMALL_MAXNREG=$2; fi
  echo "== timeline ring $1 small maxnreg $2"
  SPECS=152:1,176:1 CASES=p16k_64 OUT=$OUT timeout 100 python3 $D/timeline_coresident.py 2>&1 | grep -v Warn | grep " co " | tail -2
  mv $OUT/timeline_coresident.json $OUT/timeline_ring$1_small$2.json
done
