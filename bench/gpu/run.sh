#!/usr/bin/env bash
# The one command for a lent CUDA card: every check in order of value, under one global deadline.
#
#   bench/gpu/run.sh [--dry-run] RESULTS_DIR
#
# 0. bench/gpu/install.sh bench/gpu/wheels when both exist (offline wheels); env.json (+ nvidia-smi.txt).
# 1. pytest tests/test_kernels_gpu.py (CUDA correctness)              -> pytest.xml, pytest.log
# 2. full-size random checkpoint from the manifest (timed)             -> checkpoint.json
#    bench.engine C1/8/32/64, batched vs sequential (C1/8), CUDA graphs on -> engine.json/.md,
#    then graphs off (batched only)                                    -> engine-nographs.json/.md
# 3. the server + bench.load: SSE C1/4/16/64, one open-loop Poisson rate, WS C1/4/16/64 -> load-*.json
# 4. torch profiler, 50 engine steps at C32                            -> profile.{json,txt}, trace.json.gz
# 5. bench/gpu/summary.py                                              -> summary.md (+ pytest.json)
# Each check runs under `timeout` with budget = min(its cap, what is left before DEADLINE_S minus
# RESERVE_S for the summary); a check with less than its minimum left is skipped. Every check writes
# checks/NAME.json (status ok|failed|timeout|skipped, rc, budget, seconds) and checks/NAME.log.
# --dry-run prints the plan with each check's budget assuming every earlier one uses its whole budget
# (the worst case) and runs nothing.
#
# Environment: PYTHON (default .venv/bin/python, else python3); DEADLINE_S (default 520: stops before
# 9 minutes); RESERVE_S (15); MANIFEST (default shared/reference/manifest-0.5b.json or ../shared/...;
# none found: make_checkpoint --preset full); MODEL_DIR (default models/random-0.5b; reused when it holds
# cosyvoice2.yaml; never put it under RESULTS_DIR); COMMIT (recorded when the copy has no .git);
# CAPS_S: the eight caps in seconds, in check order (install env pytest checkpoint engine engine-nographs load profile);
# ALLOW_CPU=1: no card needed: the tiny model on the CPU, C1/2, few requests and tokens (a few minutes).
set -uo pipefail

DRY=0
if [[ ${1:-} == --dry-run ]]; then DRY=1; shift; fi
OUT=${1:?usage: bench/gpu/run.sh [--dry-run] RESULTS_DIR}
mkdir -p "$OUT/checks"
OUT=$(cd "$OUT" && pwd)  # before the cd: a relative RESULTS_DIR is relative to the caller
cd "$(dirname "$0")/../.."

if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON PYTHONUNBUFFERED=1
DEADLINE_S=${DEADLINE_S:-520}
RESERVE_S=${RESERVE_S:-15}
CPU=${ALLOW_CPU:-0}

if [[ $CPU == 1 ]]; then
  DEVICE=cpu
  MODEL_DIR=${MODEL_DIR:-models/tiny-cpu}
  ENGINE_C=1,2; ENGINE_SEQ_C=1; ENGINE_TOKENS=12; ENGINE_NOGRAPHS_C=1,2
  LOAD_C="1 2"; LOAD_REQUESTS=3; LOAD_TEXTS=short; LOAD_RATE=1; LOAD_RATE_C=2; LOAD_RATE_REQUESTS=4
  PROFILE_ARGS=(--concurrency 2 --steps 10 --skip 3 --tokens 20)
  # caps (s): install env pytest checkpoint engine engine-nographs load profile
  CAPS=(100 30 150 60 150 90 240 90)
else
  DEVICE=cuda
  MODEL_DIR=${MODEL_DIR:-models/random-0.5b}
  ENGINE_C=1,8,32,64; ENGINE_SEQ_C=1,8; ENGINE_TOKENS=100; ENGINE_NOGRAPHS_C=1,8,32
  LOAD_C="1 4 16 64"; LOAD_REQUESTS=12; LOAD_TEXTS=medium; LOAD_RATE=15; LOAD_RATE_C=64; LOAD_RATE_REQUESTS=90
  PROFILE_ARGS=(--concurrency 32 --steps 50 --skip 20 --tokens 100)
  CAPS=(100 30 90 90 150 60 170 70)
fi
export LOAD_C LOAD_REQUESTS LOAD_TEXTS LOAD_RATE LOAD_RATE_C LOAD_RATE_REQUESTS DEVICE
# minimum seconds worth starting a check with
MINS=(20 5 20 10 30 20 40 20)
if [[ -n ${CAPS_S:-} ]]; then read -ra CAPS <<< "$CAPS_S"; fi  # e.g. CAPS_S="100 30 90 90 150 60 170 70"

VIRTUAL=0  # dry run: seconds the skipped work would have taken
elapsed() { if ((DRY)); then echo "$VIRTUAL"; else echo $((SECONDS + VIRTUAL)); fi; }  # a dry run: planned time only

json_str() { "$PYTHON" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1" 2>/dev/null || echo '""'; }

write_status() {  # NAME STATUS RC CAP BUDGET SECONDS NOTE
  local note
  note=$(json_str "$7")
  cat > "$OUT/checks/$1.json" <<EOF
{"name": "$1", "status": "$2", "rc": $3, "cap_s": $4, "budget_s": $5, "seconds": $6, "started_at_s": $START_AT, "deadline_s": $DEADLINE_S, "log": "checks/$1.log", "note": $note}
EOF
}

# check INDEX NAME NOTE -- COMMAND...: run COMMAND under its budget, record its status.
check() {
  local i=$1 name=$2 note=$3; shift 4
  local cap=${CAPS[$i]} min=${MINS[$i]}
  local left=$((DEADLINE_S - RESERVE_S - $(elapsed)))
  local budget=$((cap < left ? cap : left))
  START_AT=$(elapsed)
  if ((DRY)); then
    if ((budget < min)); then
      printf '%-16s skipped: %3d s left < minimum %d s\n' "$name" "$left" "$min"
    else
      printf '%-16s start %3d s  budget %3d s (cap %d)\n' "$name" "$START_AT" "$budget" "$cap"
      VIRTUAL=$((VIRTUAL + budget))
    fi
    return 0
  fi
  if ((budget < min)); then
    echo "== $name: skipped, ${left} s left (needs ${min} s)"
    echo "skipped: ${left} s left before the deadline" > "$OUT/checks/$name.log"
    write_status "$name" skipped null "$cap" "$budget" 0 "deadline: ${left} s left; $note"
    return 1
  fi
  echo "== $name: budget ${budget} s (elapsed $(elapsed) s of ${DEADLINE_S})"
  local t0=$SECONDS rc
  timeout -k 5 "$budget" "$@" > "$OUT/checks/$name.log" 2>&1
  rc=$?
  local took=$((SECONDS - t0)) status=ok
  if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status=failed; fi
  write_status "$name" "$status" "$rc" "$cap" "$budget" "$took" "$note"
  echo "   $name: $status (rc $rc, ${took} s)"
  tail -n 3 "$OUT/checks/$name.log" | sed 's/^/   | /'
  [[ $status == ok ]]
}

skip() {  # NAME WHY
  START_AT=$(elapsed)
  if ((DRY)); then printf '%-16s skipped: %s\n' "$1" "$2"; return 0; fi
  echo "== $1: skipped ($2)"
  echo "skipped: $2" > "$OUT/checks/$1.log"
  write_status "$1" skipped null 0 0 0 "$2"
}

if ((DRY)); then
  echo "plan (worst case: every check uses its whole budget), deadline ${DEADLINE_S} s, reserve ${RESERVE_S} s, device ${DEVICE}"
fi

# ---- 0. install + environment
if [[ -d bench/gpu/wheels && -f bench/gpu/install.sh ]]; then
  check 0 install "bench/gpu/install.sh bench/gpu/wheels" -- bash bench/gpu/install.sh bench/gpu/wheels
else
  skip install "no bench/gpu/wheels or no bench/gpu/install.sh"
fi
if [[ $CPU != 1 ]] && ((!DRY)); then
  "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
    || echo "!! torch sees no CUDA device (set ALLOW_CPU=1 for the CPU proof); the CUDA checks will fail"
fi
check 1 env "env.json, nvidia-smi.txt" -- "$PYTHON" -m bench.gpu.env "$OUT"

# ---- 1. correctness on the card
check 2 pytest "tests/test_kernels_gpu.py" -- "$PYTHON" -m pytest tests/test_kernels_gpu.py -v -rA \
  -p no:cacheprovider --junitxml="$OUT/pytest.xml"

# ---- 2. the engine alone
MANIFEST=${MANIFEST:-}
if [[ -z $MANIFEST ]]; then
  for m in shared/reference/manifest-0.5b.json ../shared/reference/manifest-0.5b.json; do
    [[ -f $m ]] && MANIFEST=$m && break
  done
fi
if [[ $CPU == 1 ]]; then MAKE=(--preset tiny); LABEL="tiny (random weights)"
elif [[ -n $MANIFEST ]]; then MAKE=(--manifest "$MANIFEST"); LABEL="CosyVoice2-0.5B full-size random weights"
else MAKE=(--preset full); LABEL="CosyVoice2-0.5B full-size random weights (preset, no manifest)"; fi
export MODEL_LABEL="${MODEL_LABEL:-$LABEL}"
HAVE_MODEL=0
if [[ -f $MODEL_DIR/cosyvoice2.yaml ]]; then
  skip checkpoint "reused $MODEL_DIR"
  echo "{\"model_dir\": \"$MODEL_DIR\", \"reused\": true, \"seconds\": null}" > "$OUT/checkpoint.json"
  HAVE_MODEL=1
else
  T0=$SECONDS
  if check 3 checkpoint "make_checkpoint ${MAKE[*]}" -- \
      "$PYTHON" -m kernels.weights.make_checkpoint "${MAKE[@]}" --out "$MODEL_DIR"; then
    HAVE_MODEL=1
  fi
  ((DRY)) || echo "{\"model_dir\": \"$MODEL_DIR\", \"reused\": false, \"args\": \"${MAKE[*]}\", \"ok\": $([[ $HAVE_MODEL == 1 ]] && echo true || echo false), \"seconds\": $((SECONDS - T0)), \"bytes\": $(du -sb "$MODEL_DIR" 2>/dev/null | cut -f1 || echo 0)}" > "$OUT/checkpoint.json"
fi
((DRY)) && HAVE_MODEL=1

ENGINE=("$PYTHON" -m bench.engine --model-dir "$MODEL_DIR" --device "$DEVICE" --tokens "$ENGINE_TOKENS"
        --model-label "$MODEL_LABEL")
if ((HAVE_MODEL)); then
  check 4 engine "C$ENGINE_C batched, sequential at C$ENGINE_SEQ_C, CUDA graphs on" -- "${ENGINE[@]}" \
    --concurrency "$ENGINE_C" --sequential-concurrency "$ENGINE_SEQ_C" \
    --json "$OUT/engine.json" --markdown "$OUT/engine.md"
  check 5 engine-nographs "C$ENGINE_NOGRAPHS_C batched, CUDA graphs off" -- "${ENGINE[@]}" --no-cuda-graphs \
    --concurrency "$ENGINE_NOGRAPHS_C" --sequential-concurrency "" \
    --json "$OUT/engine-nographs.json" --markdown "$OUT/engine-nographs.md"
  # ---- 3. the API under load
  check 6 load "server --max-batch 64; SSE C${LOAD_C// //}, open loop ${LOAD_RATE}/s, WS" -- \
    bash bench/gpu/load.sh "$MODEL_DIR" "$OUT"
  # ---- 4. profiler
  check 7 profile "${PROFILE_ARGS[*]}" -- "$PYTHON" -m bench.gpu.profile --model-dir "$MODEL_DIR" \
    --device "$DEVICE" --out "$OUT" "${PROFILE_ARGS[@]}"
else
  for name in engine engine-nographs load profile; do skip "$name" "no checkpoint"; done
fi

# ---- 5. summary
if ((DRY)); then
  echo "summary          at most ${RESERVE_S} s, by $(elapsed) s at the latest (deadline ${DEADLINE_S} s)"
  exit 0
fi
timeout -k 2 "$((RESERVE_S > 5 ? RESERVE_S - 2 : 3))" "$PYTHON" -m bench.gpu.summary "$OUT" \
  || echo "!! summary failed"
echo "== done in ${SECONDS} s; results in $OUT (summary.md)"
