#!/usr/bin/env bash
# One command for a CUDA machine: full-size random checkpoint -> server (CUDA graphs on) -> load sweep.
#
#   bench/gpu.sh RESULTS_DIR [MANIFEST]
#
# MANIFEST defaults to shared/reference/manifest-0.5b.json (or ../shared/... beside the checkout).
# Writes RESULTS_DIR/{engine.json,engine.md,load.json,load.png,load.md,nvidia-smi.txt,env.txt}:
# first the engine alone (bench.engine: batched vs sequential, CUDA graphs on, ENGINE_CONCURRENCY, default
# 1,8,32,64; ENGINE_CONCURRENCY= skips it; once with overlapped stages -> engine.*, once serial ->
# engine-serial.*, ENGINE_OVERLAP="1 0" by default), then the server under load.
# Knobs (environment): PYTHON (default .venv/bin/python, else python3), MODEL_DIR (where the random
# checkpoint goes; reused when it already holds cosyvoice2.yaml; default ./models/random-0.5b),
# CONCURRENCY (default 1,2,4,8,16,32,64), REQUESTS per level (default 32; at least C are sent),
# TEXTS (short|medium|long|mixed, default mixed), MAX_BATCH for the server under test (default 64),
# MODEL_LABEL (meta.model), BASELINE_CONCURRENCY (default 1,4,16; empty = no batching-off baseline: it runs one request at a
# time, so C64 would mostly measure its queue). ALLOW_CPU=1 lets it run without CUDA (script checks).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu.sh RESULTS_DIR [MANIFEST]}
MANIFEST=${2:-}
if [[ -z $MANIFEST ]]; then
  for m in shared/reference/manifest-0.5b.json ../shared/reference/manifest-0.5b.json; do
    [[ -f $m ]] && MANIFEST=$m && break
  done
fi
[[ -f ${MANIFEST:-} ]] || { echo "manifest not found; pass it as the second argument" >&2; exit 2; }
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
MODEL_DIR=${MODEL_DIR:-./models/random-0.5b}
CONCURRENCY=${CONCURRENCY:-1,2,4,8,16,32,64}
REQUESTS=${REQUESTS:-32}
TEXTS=${TEXTS:-mixed}
MAX_BATCH=${MAX_BATCH:-64}
BASELINE_CONCURRENCY=${BASELINE_CONCURRENCY-1,4,16}
mkdir -p "$OUT"

# Fail early and clearly: the machine may have no network to install anything.
"$PYTHON" - <<'EOF'
import importlib.util, os, sys
missing = [m for m in ("torch", "numpy", "h11", "wsproto", "uvloop", "requests", "websocket", "matplotlib",
                       "soundfile", "soxr", "onnxruntime", "tokenizers", "lameenc", "yaml")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python modules: {missing} (pip install -e '.[test,gpu]')")
import torch
if not torch.cuda.is_available() and os.environ.get("ALLOW_CPU") != "1":
    sys.exit("torch sees no CUDA device: this script is for a CUDA machine")
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
EOF

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
{ echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"; "$PYTHON" -m pip freeze 2>/dev/null; } \
  > "$OUT/env.txt" || true

if [[ ! -f $MODEL_DIR/cosyvoice2.yaml ]]; then
  echo "== writing a full-size RANDOM checkpoint to $MODEL_DIR (output will be noise)"
  "$PYTHON" -m kernels.weights.make_checkpoint --manifest "$MANIFEST" --out "$MODEL_DIR"
fi

ENGINE_CONCURRENCY=${ENGINE_CONCURRENCY-1,8,32,64}
if [[ -n $ENGINE_CONCURRENCY ]]; then
  for overlap in ${ENGINE_OVERLAP:-1 0}; do
    suffix=$([[ $overlap == 1 ]] && echo "" || echo "-serial")
    echo "== engine alone, C=$ENGINE_CONCURRENCY, batched vs sequential, CUDA graphs on, overlapped stages $overlap"
    PYTHONUNBUFFERED=1 "$PYTHON" -m bench.engine --model-dir "$MODEL_DIR" --device "${ENGINE_DEVICE:-cuda}" \
      --concurrency "$ENGINE_CONCURRENCY" --tokens "${ENGINE_TOKENS:-150}" --overlap-stages "$overlap" \
      --model-label "${MODEL_LABEL:-CosyVoice2-0.5B full-size random weights}" \
      --json "$OUT/engine$suffix.json" --markdown "$OUT/engine$suffix.md"
  done
fi

BASELINE_ARGS=()
if [[ -n $BASELINE_CONCURRENCY ]]; then
  BASELINE_ARGS=(--spawn-baseline --baseline-concurrency "$BASELINE_CONCURRENCY")
fi

echo "== sweep C=$CONCURRENCY, $REQUESTS requests per level, sse+ws, server --max-batch $MAX_BATCH (CUDA graphs on)"
PYTHONUNBUFFERED=1 "$PYTHON" -m bench.load --spawn --model-dir "$MODEL_DIR" --server-max-batch "$MAX_BATCH" \
  --model "${MODEL_LABEL:-CosyVoice2-0.5B full-size random weights ($MODEL_DIR)}" \
  --protocol sse,ws --concurrency "$CONCURRENCY" --requests "$REQUESTS" --texts "$TEXTS" \
  "${BASELINE_ARGS[@]}" \
  --json "$OUT/load.json" --plot "$OUT/load.png" --markdown "$OUT/load.md"
echo "== results in $OUT"
