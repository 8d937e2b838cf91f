#!/usr/bin/env bash
# Session 12, call B: several consumer warpgroups per CTA, each fed by a one-warp producer (1 CTA per SM).
source .kit/bootstrap.sh >/dev/null 2>&1
OV=$(python3 scripts/gpu_e2e.py --make-overlay /tmp/ov)
export PYTHONPATH=$OV:$PYTHONPATH
V="main=main:64:4"
for f in stage1_mc stage1_mc3 stage1_mc3r3; do
  timeout 150 python3 benchmarks/experiments/ws/smoke.py benchmarks/experiments/ws/$f.py p4k_16 spec p16k_64 nosharing 2>&1 | tail -5 | tee -a $OUT/smoke.txt
  rc=${PIPESTATUS[0]}; echo "$f rc=$rc" | tee -a $OUT/smoke.txt
  if [ $rc = 0 ]; then
    case $f in stage1_mc) V="$V,mc4=benchmarks/experiments/ws/$f.py:64:4";; *) V="$V,${f#stage1_}=benchmarks/experiments/ws/$f.py:64:3,${f#stage1_}p4=benchmarks/experiments/ws/$f.py:64:4";; esac
  fi
done
echo "VARIANTS=$V"
VARIANTS=$V OUT=$OUT timeout 400 python3 benchmarks/experiments/ab_stage1.py 2>&1 | grep -v Warning | tail -12
