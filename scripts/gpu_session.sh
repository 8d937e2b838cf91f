#!/usr/bin/env bash
# One GPU-host session step, each well inside a 10-minute device call. From the repo root, with .kit
# carried (the devkit; see ../shared/devkit/README.md), <short sha> being what `git describe --always --dirty` prints
# in the checkout (phases that write results refuse to run without it):
#
#   DEFT_COMMIT=<short sha> bash scripts/gpu_session.sh kernels   # pytest kernels+plan on the GPU, kernel benchmark
#   DEFT_COMMIT=<short sha> bash scripts/gpu_session.sh e2e       # gpu_e2e.py, tiny then 8b
#   DEFT_COMMIT=<short sha> bash scripts/gpu_session.sh e2e-tiny | e2e-8b  # one model (if `e2e` had to skip 8b)
#   DEFT_COMMIT=<short sha> bash scripts/gpu_session.sh e2e-heads # gpu_e2e.py on the tiny model's variants with real
#                                                                 # models' heads (64, 128, 256; GQA 2, 4, 7): the Hopper
#                                                                 # kernel under the context-sensitive check
#                                                                 # (E2E_ARGS=--cuda-graph for SGLang's graphs)
#   DEFT_COMMIT=<short sha> bash scripts/gpu_session.sh e2e-families # the same under Qwen2, Qwen3, Qwen3-MoE,
#                                                                 # Mixtral and Phi-3 model code (gpu_e2e.py FAMILY_VARIANTS;
#                                                                 # E2E_MODELS=tiny-qwen2,... for some of them)
#   DEFT_COMMIT=<short sha> bash scripts/gpu_session.sh e2e-windows # the same for sliding-window layers: Gemma-2's
#                                                                 # and Gemma-3's code (gpu_e2e.py WINDOW_VARIANTS)
#                                                                 # against SGLang's triton decode given its prefill's
#                                                                 # window (E2E_MODELS=tiny-gemma2,... for some of them)
#   DEFT_COMMIT=<short sha> bash scripts/gpu_session.sh sweep     # stage-1 launch-parameter sweep
#   DEFT_COMMIT=<short sha> bash scripts/gpu_session.sh logit-cap # the kernel benchmark's DESIGN.md cases without a cap,
#                                                                 # then with LOGIT_CAP (default 50, Gemma-2's) for every
#                                                                 # provider: what a capped model's soft cap costs
#   DEFT_COMMIT=<short sha> bash scripts/gpu_session.sh low-concurrency  # kernel benchmark on batches of 1-16
#                                                                 # queries, then the planner's knobs on them
#   DEFT_COMMIT=<short sha> bash scripts/gpu_session.sh bench-e2e # end-to-end decode tok/s, benchmarks/bench_e2e.py
#   bash scripts/gpu_session.sh demo                              # `make demo`'s program on the GPU (CUDA graphs on)
#   DEFT_COMMIT=<short sha> bash scripts/gpu_session.sh graphs    # deft with CUDA graphs: whole servers bitwise with/without
#                                                                 # graphs, then gpu_e2e.py --cuda-graph on tiny
#   DEFT_COMMIT=<short sha> bash scripts/gpu_session.sh step-host # per-step host time outside a server
#                                                                 # (benchmarks/bench_step_host.py), then the backend's
#                                                                 # CUDA-graph replays vs eager steps (no servers)
#   bash scripts/gpu_session.sh features                          # the CPU end-to-end tests on the GPU: forks, overlap
#                                                                 # off, chunked prefill, abort, streaming, KV-slot
#                                                                 # accounting, radix off, retraction, priority
#                                                                 # preemption (tiny model, fp16, CUDA graphs;
#                                                                 # SGLANG_DEFT_E2E_HEADS=32,8,128 for its variant with those heads,
#                                                                 # which runs the Hopper kernel)
#   bash scripts/gpu_session.sh engine                            # sglang_deft.Engine and the launcher on the GPU:
#                                                                 # their arguments, refusals (by flag, and by model in
#                                                                 # SGLang's scheduler), and an Engine that generates
#
# Everything lands in $OUT (at most 5 files per phase: the device tool brings back 8). The repo is not
# pip-installed there, so `sglang_deft.kernels` imports through a symlink overlay built by
# `scripts/gpu_e2e.py --make-overlay` (kernels/ and patches/ become subpackages, as pyproject's
# package-dir does); pytest runs from the overlay directory, because `python -m` puts the cwd first on
# sys.path and the repo root's own sglang_deft/ has no kernels/. The .kit bootstrap is sourced here
# (idempotent), so `source .kit/bootstrap.sh &&` in front is optional.
#
# Expected wall time on the H200 (fresh machine; a warm one reuses the FlashInfer/Triton caches in $HOME):
#   kernels  ~4-7 min: bootstrap 10-30 s, pytest 1-3 min (Triton compiles every config; capped at
#            PYTEST_S=240), benchmark 2.5-4 min (145 s measured on 2026-11-29 + FlashInfer JIT; capped by
#            what is left of SESSION_S=565).
#   e2e      ~4-7 min: all 6 servers (per model: triton, flashinfer noise floor, deft) start together
#            (E2E_PARALLEL=all; `model` starts one model's 3 at a time). Startup ~1 min of SGLang per
#            server (measured 57-71 s alone, 2026-11-29) plus FlashInfer's JIT of its decode module in the
#            flashinfer servers (1-2 min on a fresh machine, per model: head_dim 32 fp16 and 128 bf16);
#            then tiny's workloads ~30 s, 8b's ~1 min. gpu_e2e.py gets the rest of SESSION_S as
#            --budget-s; with E2E_PARALLEL=model it skips 8b (JSON says so, exit 1) if under 210 s are
#            left: then run `e2e-8b`.
#   e2e-heads ~2-3 min: 12 servers (4 tiny variants x triton, flashinfer, deft) start together, ~2-2.5 min on a
#            fresh machine, then ~5 s of workloads per model (124-175 s in all, 2026-12-02).
#   e2e-families ~3-4 min: 5 models x 3 servers start together (199-216 s for 4 of them, 2026-12-04), plus
#            the MoE models' Triton fused-MoE compiles.
#   bench-e2e ~4-5 min: 6 servers (8b and tiny x deft/flashinfer/triton) start together: ~1 min of SGLang
#            each, CUDA-graph capture up to batch 256 (flashinfer, triton) and FlashInfer's JIT (1-2 min
#            fresh), so ~2-2.5 min until all are up (107-146 s at 895a55d and a47c255); then each
#            repetition of the 5 cases (one backend at a time) ~1 min; BENCH_E2E_ARGS="--repeats 1" if
#            startup ran long.
#            bench_e2e.py gets the rest of SESSION_S as --budget-s and skips what would not fit (JSON
#            says so, exit 1).
#            On an 80 GB H100 the six servers do not fit together (two failed to start, 2026-12-06,
#            e2e_h100_43154c5.md): bench_e2e.py then starts them in waves (one 8b server at a time, the tiny ones beside
#            the last), which takes longer than one call: run a part per call, e.g.
#            BENCH_E2E_ARGS="--backends deft,flashinfer --cases p16k_64,p4k_64,p1k_256,nosharing_64x2k", each with its
#            own BENCH_E2E_TAG.
#            Gemma-3-12B's shape (sliding windows at a real size) on its own, ~4.5 min (3 servers ready in ~190 s,
#            2026-12-05): BENCH_E2E_TAG="$(python3 benchmarks/card_tag.py)_gemma3" BENCH_E2E_ARGS="--cases p16k_64_gemma3,p4k_64_gemma3,nosharing_gemma3
#            --repeats 1". Three 24 GB servers starting together can leave the last one's KV pool too small for the
#            16k and no-sharing cases (29,562 of 40,960 tokens once): the JSON then says so per case.
# Every command has a timeout under SESSION_S=565 s; server process groups left behind by a killed run
# are ended by their recorded ids.
set -uo pipefail

PHASE=${1:-}
case "$PHASE" in
  kernels|sweep|logit-cap|low-concurrency|e2e|e2e-tiny|e2e-8b|e2e-heads|e2e-families|e2e-windows|bench-e2e|demo|graphs|step-host|features|engine) ;;
  *) echo "usage: bash scripts/gpu_session.sh kernels|sweep|logit-cap|low-concurrency|e2e|e2e-tiny|e2e-8b|e2e-heads|e2e-families|e2e-windows|bench-e2e|demo|graphs|step-host|features|engine" >&2
     exit 2 ;;
esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
: "${OUT:=$REPO/gpu_out}"
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd) || exit 2  # absolute: phases run commands from other directories
: "${SESSION_S:=565}"
export PYTHONUNBUFFERED=1
START=$SECONDS
left() { echo $(( SESSION_S - (SECONDS - START) )); }
# A command's time limit: what is left less $1 seconds, at least 1 (timeout 0 would mean no limit at all, a negative
# one an error, and gpu_e2e.py reads a --budget-s of 0 or less as none).
limit() { local s=$(( $(left) - $1 )); [ "$s" -ge 1 ] || s=1; echo "$s"; }
say() { echo "[session +$((SECONDS - START))s] $*"; }

main() {
  say "phase $PHASE, OUT=$OUT, budget ${SESSION_S}s"
  # Every result names the commit it measured, and only the checkout knows it: the GPU host's copy of the tree can
  # carry a .git of an earlier state (its `git describe --dirty` named the session's first commit, -dirty, for a tree
  # three commits on). So the phases that write results take DEFT_COMMIT as `git describe --always --dirty` prints it
  # in the checkout (uncommitted code is then <sha>-dirty) and do not run without it.
  case "$PHASE" in
    demo|features|engine) COMMIT=${DEFT_COMMIT:-unlabelled} ;;
    *) if [ -z "${DEFT_COMMIT:-}" ]; then
         say "DEFT_COMMIT is not set: pass DEFT_COMMIT=\$(git describe --always --dirty) from your checkout, so that the" \
             "results name what they measured (the GPU host's .git may be older than its tree)"
         return 2
       fi
       COMMIT=$DEFT_COMMIT ;;
  esac
  if [ -z "${SKIP_BOOTSTRAP:-}" ]; then  # SKIP_BOOTSTRAP=1: an environment that has SGLang (CPU dry runs)
    # shellcheck disable=SC1091
    source .kit/bootstrap.sh || { say "bootstrap failed (is .kit carried?)"; return 2; }
    say "bootstrap done"
  fi
  OVERLAY=$(python3 scripts/gpu_e2e.py --make-overlay /tmp/sglang_deft_overlay) || return 2
  export PYTHONPATH="$OVERLAY:${PYTHONPATH:-}"
  export DEFT_COMMIT=$COMMIT
  # The card in result file names (kernels_<tag>.json, e2e_<tag>.json): h200, h100, ... as nvidia-smi names it (the
  # benchmarks' own default; named here for the files this script writes beside theirs).
  GPU_TAG=$(python3 benchmarks/card_tag.py)
  (cd "$OVERLAY" && python3 - <<'EOF') || { say "preflight failed"; return 2; }
import importlib.metadata as md, subprocess, sys
import torch, triton, sglang_deft.kernels, sglang_deft.patches
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.used,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
except (OSError, subprocess.SubprocessError) as e:
    gpu = f"no nvidia-smi ({e})"

def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
print(f"python {sys.version.split()[0]} torch {torch.__version__} triton {triton.__version__} "
      f"sglang {v('sglang')} flashinfer {v('flashinfer_python')} | {gpu}")
print(f"sglang_deft.kernels from {sglang_deft.kernels.__file__}")
EOF
  say "preflight done, commit $COMMIT"
  case "$PHASE" in
    kernels) phase_kernels ;;
    sweep) phase_sweep ;;
    logit-cap) phase_logit_cap ;;
    low-concurrency) phase_low_concurrency ;;
    e2e) phase_e2e tiny,8b ;;
    e2e-tiny) phase_e2e tiny ;;
    e2e-8b) phase_e2e 8b ;;
    e2e-heads) phase_e2e tiny-d128,tiny-d64,tiny-d256,tiny-gqa7 ;;
    e2e-families) phase_e2e "${E2E_MODELS:-tiny-qwen2,tiny-qwen3,tiny-qwen3-moe,tiny-mixtral,tiny-phi3}" ;;
    e2e-windows) phase_e2e "${E2E_MODELS:-tiny-gemma2,tiny-gemma2-full,tiny-gemma3,tiny-gemma3-full}" ;;
    bench-e2e) phase_bench_e2e ;;
    demo) phase_demo ;;
    graphs) phase_graphs ;;
    step-host) phase_step_host ;;
    features) phase_features ;;
    engine) phase_engine ;;
  esac
}

phase_logit_cap() {
  # Both runs in one call, on one machine: the cap's cost is their ratio (timings differ between machines).
  local cap=${LOGIT_CAP:-50} rc_plain rc_cap t each
  each=$(( ($(left) - 20) / 2 ))
  if [ "$each" -lt 60 ]; then say "too little time left for two benchmark runs (${each}s each)"; return 1; fi
  t=$SECONDS
  timeout -k 10 "$each" python3 benchmarks/bench_kernels.py --cases design --out "$OUT" --commit "$COMMIT" \
      --tag "${GPU_TAG}_design"
  rc_plain=$?
  say "bench_kernels (no cap) rc=$rc_plain in $((SECONDS - t))s"
  t=$SECONDS
  timeout -k 10 $(limit 10) python3 benchmarks/bench_kernels.py --cases design --logit-cap "$cap" \
      --out "$OUT" --commit "$COMMIT" --tag "${GPU_TAG}_design_cap${cap}"
  rc_cap=$?
  say "bench_kernels (logit cap $cap) rc=$rc_cap in $((SECONDS - t))s"
  [ "$rc_plain" -eq 0 ] && [ "$rc_cap" -eq 0 ]
}

phase_low_concurrency() {
  local rc_bench rc_sweep t
  t=$SECONDS
  timeout -k 10 $(limit 150) python3 benchmarks/bench_kernels.py --cases low_concurrency \
      --tag "${GPU_TAG}_low_concurrency" --out "$OUT" --commit "$COMMIT"
  rc_bench=$?
  say "bench_kernels rc=$rc_bench in $((SECONDS - t))s"
  t=$SECONDS
  (cd "$OVERLAY" && OUT="$OUT" CASES=low_concurrency COMBOS="${COMBOS:-4:256,4:128,4:64,8:128,8:64,2:256}" \
      timeout -k 10 $(limit 10) python3 "$REPO/benchmarks/experiments/plan_sweep.py")
  rc_sweep=$?
  say "plan_sweep rc=$rc_sweep in $((SECONDS - t))s"
  [ "$rc_bench" -eq 0 ] && [ "$rc_sweep" -eq 0 ]
}

phase_kernels() {
  local xdist=() rc_pytest rc_bench t
  if python3 -c "import xdist" 2>/dev/null; then xdist=(-n "${PYTEST_WORKERS:-4}"); fi
  t=$SECONDS
  # test_cuda_graph_gpu.py: the backend's graph capture/replay against eager steps, bitwise (its
  # server comparison starts four servers: run that one on its own, it is deselected here);
  # test_backend_gpu.py: padded eager batches and SGLang's warm-up batch on the GPU kernels.
  # -rfEs lists skip reasons: a Triton other than the Gluon kernel's (3.5, 3.6) skips every Hopper test, and that
  # must show in the log, not as a count.
  # Every pytest here is stopped by SIGINT (timeout -s INT): pytest then still prints its summary and writes the
  # junit XML, which SIGTERM's default ending loses.
  # test_plan_cpu_time_256_queries_300_nodes bounds the planner's time on the 2-core CI box; here it
  # would time a VM's CPU under the other pytest workers (440 us at 58e450f): bench_kernels.py measures
  # the GPU host's planning time alone instead (plan_300node_256q_us).
  (cd "$OVERLAY" && timeout -s INT -k 10 "${PYTEST_S:-240}" python3 -m pytest "$REPO/tests/test_kernels.py" \
      "$REPO/tests/test_plan.py" "$REPO/tests/test_plan_reference.py" "$REPO/tests/test_schedule_c.py" \
      "$REPO/tests/test_staging.py" "$REPO/tests/test_cuda_graph_gpu.py" "$REPO/tests/test_backend_gpu.py" \
      -k "not servers_with_and_without and not plan_cpu_time_256_queries" \
      -q -rfEs -p no:cacheprovider "${xdist[@]}" --junitxml="$OUT/pytest_kernels.xml")
  rc_pytest=$?
  say "pytest rc=$rc_pytest in $((SECONDS - t))s (124: cut at PYTEST_S; the summary and XML keep what ran)"
  local bench_s=$(limit 20)
  if [ "$bench_s" -lt 60 ]; then say "no time left for the benchmark"; return 1; fi
  t=$SECONDS
  timeout -k 10 "$bench_s" python3 benchmarks/bench_kernels.py --out "$OUT" --commit "$COMMIT" --tag "$GPU_TAG"
  rc_bench=$?
  say "bench_kernels rc=$rc_bench in $((SECONDS - t))s (limit ${bench_s}s; 1: a deft cell failed; 124: cut, JSON keeps what it measured)"
  if [ -f "$OUT/kernels_$GPU_TAG.json" ] && [ "$(left)" -gt 15 ]; then
    timeout 15 python3 benchmarks/plot_kernels.py "$OUT/kernels_$GPU_TAG.json" -o "$OUT/kernels_$GPU_TAG.png" \
      || say "plot skipped"
  fi
  [ "$rc_pytest" -eq 0 ] && [ "$rc_bench" -eq 0 ]
}

phase_sweep() {
  # Stage-1 launch parameters over the benchmark's trees (benchmarks/sweep_stage1.py; SWEEP_ARGS picks
  # grids and cases): ~14 configs x 7 cases, 1-3 min with compiles; the JSON and table are rewritten
  # after every config, so a cut run keeps what it measured.
  local t=$SECONDS
  timeout -k 10 $(limit 10) python3 benchmarks/sweep_stage1.py --out "$OUT" ${SWEEP_ARGS:-}
  local rc=$?
  say "sweep_stage1 rc=$rc in $((SECONDS - t))s"
  return $rc
}

end_servers_and_bundle_logs() {
  # $1: the log directory whose server_pgids.txt gpu_e2e.py / bench_e2e.py wrote as they launched
  # servers; ends those a hard kill left running, then packs the logs into $OUT/$2.
  local logs=$1 tar=$2
  if [ -f "$logs/server_pgids.txt" ]; then
    while read -r pgid name; do
      # still alive, and still ours (an SGLang process; setsid made pgid == session id). Zombies do not count:
      # this host's PID 1 (process_api) does not reap, so a stopped server's exited children stay (python3,
      # sglang::detoken: seen after the demo at ccabf0e) and kill -0 still finds their group. Not grep -q: it exits at
      # its first match, awk then dies of SIGPIPE on a long listing, and pipefail read that as no server left.
      if [ -n "$pgid" ] && ps -o stat=,args= -s "$pgid" | awk '$1 !~ /^Z/' | grep sglang > /dev/null; then
        say "ending leftover server $name (process group $pgid)"
        kill -TERM -- "-$pgid" 2>/dev/null; sleep 3; kill -KILL -- "-$pgid" 2>/dev/null
      fi
    done < "$logs/server_pgids.txt"
  fi
  tar -czf "$OUT/$tar" -C "$(dirname "$logs")" "$(basename "$logs")" && say "logs in $tar"
}

phase_e2e() {
  local models=$1 logs=/tmp/gpu_e2e_logs rc budget
  rm -rf "$logs" && mkdir -p "$logs"
  # An earlier run's JSON in $OUT would be summarised below as this run's if this one stopped before its first save.
  rm -f "$OUT/gpu_e2e.json"
  budget=$(limit 30)  # leaves time for the cleanup and the log bundle
  say "gpu_e2e.py --models $models --budget-s $budget"
  timeout -k 15 $(( budget + 15 )) python3 scripts/gpu_e2e.py --out "$OUT" --log-dir "$logs" --models "$models" \
      --budget-s "$budget" --parallel "${E2E_PARALLEL:-all}" --commit "$COMMIT" ${E2E_ARGS:-}
  rc=$?
  say "gpu_e2e rc=$rc"
  end_servers_and_bundle_logs "$logs" e2e_logs.tar.gz
  if [ -f "$OUT/gpu_e2e.json" ]; then
    python3 - "$OUT/gpu_e2e.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"ok={r.get('ok')} complete={r.get('complete')} wall={r.get('wall_s')}s")
for name, m in r.get("models", {}).items():
    print(f"  {name}: ok={m.get('ok')} noise={m.get('noise_backend')} skipped={m.get('skipped')} "
          f"error={'yes' if m.get('error') else 'no'} context_sensitivity={m.get('context_sensitivity')} "
          f"decode_context_sensitivity={m.get('decode_context_sensitivity')}")
    for w, e in m.get("workloads", {}).items():
        # divergences per distinct request (n > 1 copies of a prompt are one), as the verdict counts them
        rel = e.get("relative", {})
        div = rel.get("deft_divergences", e.get("distinct_divergences"))
        requests = rel.get("distinct_requests", e.get("distinct_requests"))
        allowed = rel.get("allowed_divergences", e.get("allowed_divergences"))
        print(f"    {w}: ok={e['ok']} ({e.get('criterion')}) deft diff {e['max_abs_logprob_diff']:.4f} div {div}/{requests}"
              f" | noise diff {rel.get('noise_max_abs_logprob_diff', float('nan')):.4f}"
              f" div {rel.get('noise_divergences')}"
              f" | allowed {rel.get('allowed_logprob_diff', m.get('atol', float('nan'))):.4f} / {allowed}")
    for w, t in m.get("seed_totals", {}).items():
        print(f"    {w}, {t['seeds']} seeds: {t['seeds_ok']} ok, divergences deft {t['deft_divergences']} /"
              f" noise {t['noise_divergences']} of {t['requests']} requests, failed seeds {t['failed_seeds']}")
EOF
  fi
  return "$rc"
}

phase_bench_e2e() {
  # Files back: e2e_<tag>.json, e2e_<tag>.md, e2e_<tag>.png, bench_e2e_logs.tar.gz, session_bench-e2e.log.
  local logs=/tmp/bench_e2e_logs tag=${BENCH_E2E_TAG:-$GPU_TAG} rc budget t=$SECONDS
  rm -rf "$logs" && mkdir -p "$logs"
  rm -f "$OUT/e2e_$tag.json" "$OUT/e2e_$tag.md" "$OUT/e2e_$tag.png"  # (as phase_e2e's: never an earlier run's)
  budget=$(limit 45)  # leaves time for the cleanup, the plot and the log bundle
  say "bench_e2e.py --budget-s $budget"
  timeout -k 15 $(( budget + 15 )) python3 benchmarks/bench_e2e.py --out "$OUT" --log-dir "$logs" --tag "$tag" \
      --budget-s "$budget" --commit "$COMMIT" ${BENCH_E2E_ARGS:-}
  rc=$?
  say "bench_e2e rc=$rc in $((SECONDS - t))s (124: cut, the JSON keeps what it measured)"
  end_servers_and_bundle_logs "$logs" bench_e2e_logs.tar.gz
  if [ -f "$OUT/e2e_$tag.json" ]; then
    timeout 30 python3 benchmarks/plot_e2e.py "$OUT/e2e_$tag.json" -o "$OUT/e2e_$tag.png" || say "plot skipped"
    python3 - "$OUT/e2e_$tag.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"complete={r.get('complete')} wall={r.get('wall_s')}s interrupted={r.get('interrupted')}")
for name, s in r.get("servers", {}).items():
    print(f"  {name}: ok={s.get('ok')} ready={s.get('ready_s')}s pool={s.get('max_total_num_tokens')} "
          f"cuda_graph={s.get('cuda_graph')}" + (f" error={s['error'][-200:]!r}" if s.get("error") else ""))
for c in r.get("cases", []):
    for b, s in c.get("backends", {}).items():
        errors = [x.get("error") for x in s.get("runs", []) if not x.get("ok")]
        print(f"  {c['key']} {b}: tok/s={s.get('tok_s')} ({s.get('tok_s_source')}) client={s.get('client_tok_s')}"
              f" tpot_ms={s.get('tpot_ms')} sharing={s.get('sharing_ratio')} runs={len(s.get('runs', []))}"
              + (f" errors={errors[-1][-200:]!r}" if errors else ""))
    print(f"  {c['key']} same tokens as the reference: {c.get('same_outputs')}")
    if c.get("skipped"):
        print(f"  {c['key']} skipped: {c['skipped']}")
EOF
  fi
  return "$rc"
}

phase_graphs() {
  # tests/test_cuda_graph_gpu.py: the backend's captures replayed against eager steps, then four tiny
  # servers (deft and triton, each with and without CUDA graphs; ~2-3 min) compared bitwise. Then the
  # e2e criterion with graphs on in every server (tiny: its servers start together, ~2-3 min).
  local rc_pytest rc_e2e t=$SECONDS
  (cd "$OVERLAY" && timeout -s INT -k 10 "${PYTEST_S:-300}" python3 -m pytest "$REPO/tests/test_cuda_graph_gpu.py" -v -rs \
      -p no:cacheprovider --junitxml="$OUT/pytest_cuda_graph.xml")
  rc_pytest=$?
  say "pytest cuda graphs rc=$rc_pytest in $((SECONDS - t))s"
  E2E_ARGS="--cuda-graph ${E2E_ARGS:-}" phase_e2e tiny
  rc_e2e=$?
  [ "$rc_pytest" -eq 0 ] && [ "$rc_e2e" -eq 0 ]
}

phase_step_host() {
  # ~1 min: the backend's per-step planning (DecodeStepPlanner: full plans and steady steps) on
  # bench_e2e's cases, device idle and busy (step_host_<card>.json, step_host_<cases>_<card>.json for some; some steps' plans are read back:
  # each query must read its row once), then test_cuda_graph_gpu's backend-level part (captured
  # graphs replayed vs eager steps, bitwise). STEP_HOST_ARGS="--window 1024": with a sliding-window plan.
  local rc_bench rc_pytest t=$SECONDS
  timeout -k 10 "${STEP_HOST_S:-150}" python3 benchmarks/bench_step_host.py --out "$OUT" ${STEP_HOST_ARGS:-}
  rc_bench=$?
  say "bench_step_host rc=$rc_bench in $((SECONDS - t))s"
  t=$SECONDS
  (cd "$OVERLAY" && timeout -s INT -k 10 $(limit 10) python3 -m pytest "$REPO/tests/test_cuda_graph_gpu.py" \
      -k "not servers_with_and_without" -q -rfE -p no:cacheprovider --junitxml="$OUT/pytest_cuda_graph_backend.xml")
  rc_pytest=$?
  say "pytest cuda graphs (backend) rc=$rc_pytest in $((SECONDS - t))s"
  [ "$rc_bench" -eq 0 ] && [ "$rc_pytest" -eq 0 ]
}

phase_features() {
  # tests/test_e2e_cpu.py, test_e2e_cpu_robustness.py and test_e2e_cpu_preemption.py with their servers on
  # the GPU (SGLANG_DEFT_E2E_DEVICE=cuda: float16 tiny model, triton prefill, CUDA graphs; 3, 2, then 2 servers,
  # ~1-2 min to start each group on a fresh machine, the tests themselves well under a minute).
  # FEATURES_K=<pytest -k expression> runs some of them (FEATURES_K=paged: the --page-size 16 servers only).
  local rc t=$SECONDS tmp=/tmp/deft_features
  rm -rf "$tmp"
  (cd "$OVERLAY" && SGLANG_DEFT_E2E_DEVICE=cuda timeout -s INT -k 10 $(limit 20) python3 -m pytest \
      "$REPO/tests/test_e2e_cpu.py" "$REPO/tests/test_e2e_cpu_robustness.py" "$REPO/tests/test_e2e_cpu_preemption.py" \
      -v -rs -p no:cacheprovider ${FEATURES_K:+-k "$FEATURES_K"} \
      --durations=10 --basetemp="$tmp" --junitxml="$OUT/pytest_features.xml")
  rc=$?
  say "pytest features rc=$rc in $((SECONDS - t))s"
  (cd "$tmp" && find . -name '*.log' | tar -czf "$OUT/features_server_logs.tar.gz" -T -) && say "server logs packed"
  return "$rc"
}

phase_engine() {
  # tests/test_engine_args.py and tests/test_launcher.py with CUDA present (~2-3 min): the Engine then picks the GPU
  # and SGLang's triton prefill, as a user's would.
  local rc t=$SECONDS
  (cd "$OVERLAY" && timeout -s INT -k 10 $(limit 20) python3 -m pytest \
      "$REPO/tests/test_engine_args.py" "$REPO/tests/test_launcher.py" -v -rs -p no:cacheprovider --durations=10 \
      --basetemp=/tmp/deft_engine --junitxml="$OUT/pytest_engine.xml")
  rc=$?
  say "pytest engine rc=$rc in $((SECONDS - t))s"
  return "$rc"
}

phase_demo() {
  # The program `make demo` runs (the repo is not installed here: from the overlay, see above), its
  # server log kept and brought back (demo_server.log: where a first start's minute or two goes).
  local rc f
  rm -rf /tmp/sglang-deft-demo-*  # kept logs of earlier runs on a warm machine: the copy below takes this run's
  (cd "$OVERLAY" && timeout -s INT -k 10 $(limit 10) python3 -m sglang_deft.demo --keep-log)
  rc=$?
  for f in /tmp/sglang-deft-demo-*/server.log; do
    [ -f "$f" ] && { cp "$f" "$OUT/demo_server.log"; [ "$rc" -ne 0 ] && { say "tail of $f"; tail -n 120 "$f"; }; }
  done
  return "$rc"
}

main 2>&1 | tee "$OUT/session_$PHASE.log"
rc=${PIPESTATUS[0]}
echo "[session] phase $PHASE exit $rc after $((SECONDS - START))s"
exit "$rc"
