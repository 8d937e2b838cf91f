#!/usr/bin/env bash
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
source "$REPO/.kit/bootstrap.sh" >/dev/null 2>&1
OV=$(cd "$REPO" && python3 scripts/gpu_e2e.py --make-overlay /tmp/ov)
export PYTHONUNBUFFERED=1 PYTHONPATH=$OV:${PYTHONPATH:-}
cd /tmp
for cv in one:B one:API p4k:B p4k:API; do echo "--- $cv"; CASE=${cv%%:*} VARIANT=${cv##*:} N=20 timeout 40 python3 "$REPO/benchmarks/experiments/overlap_graph_probe.py" 2>&1 | grep -v "^\s*$" | tail -3; echo "rc=${PIPESTATUS[0]}"; done
