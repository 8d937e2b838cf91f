#!/usr/bin/env bash
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
source "$REPO/.kit/bootstrap.sh" >/dev/null 2>&1
OV=$(cd "$REPO" && python3 scripts/gpu_e2e.py --make-overlay /tmp/ov)
cd /tmp && PYTHONPATH=$OV:${PYTHONPATH:-} timeout ${T:-400} python3 "$REPO/benchmarks/experiments/gluon_bench.py" 2>&1 | grep -v "^\s*$" | tail -${TAILN:-60}
