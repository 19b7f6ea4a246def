#!/usr/bin/env bash
# The API under load, one check of bench/gpu/run.sh (which sets the sizes in the environment):
#
#   bench/gpu/load.sh MODEL_DIR RESULTS_DIR
#
# Starts `python -m server --max-batch 64` on a free loopback port, polls /health until it answers
# (startup seconds -> load-server.json), then one bench.load run per level, in order of value: SSE
# closed loop at each of LOAD_C, one open-loop Poisson rate (LOAD_RATE/s, at most LOAD_RATE_C in
# flight), WS closed loop at each of LOAD_C. Each level writes its own load-PROTO-cC[-rR].json/.md, so
# a run cut short keeps the levels it finished. The server is stopped on any exit (trap).
set -uo pipefail

MODEL_DIR=${1:?usage: bench/gpu/load.sh MODEL_DIR RESULTS_DIR}
OUT=${2:?usage: bench/gpu/load.sh MODEL_DIR RESULTS_DIR}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
LOAD_C=${LOAD_C:-1 4 16 64}
LOAD_REQUESTS=${LOAD_REQUESTS:-12}
LOAD_TEXTS=${LOAD_TEXTS:-medium}
LOAD_RATE=${LOAD_RATE:-15}
LOAD_RATE_C=${LOAD_RATE_C:-64}
LOAD_RATE_REQUESTS=${LOAD_RATE_REQUESTS:-90}
MAX_BATCH=${MAX_BATCH:-64}
TOKEN=bench-gpu
LABEL=${MODEL_LABEL:-$MODEL_DIR}

PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
DATA=$(mktemp -d "${TMPDIR:-/tmp}/cosy-gpu-load.XXXXXX")
SERVER=

cleanup() {
  if [[ -n $SERVER ]] && kill -0 "$SERVER" 2>/dev/null; then
    kill -TERM "$SERVER" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER" 2>/dev/null
  fi
  rm -rf "$DATA"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

T0=$(date +%s.%N)
"$PYTHON" -m server --host 127.0.0.1 --port "$PORT" --token "$TOKEN" --data-dir "$DATA" \
  --model-dir "$MODEL_DIR" --device "$DEVICE" --max-batch "$MAX_BATCH" --shutdown-deadline-s 2 \
  > "$OUT/server.log" 2>&1 &
SERVER=$!
echo "server pid $SERVER on $URL (log: server.log)"

"$PYTHON" - "$URL" "$SERVER" "$T0" "$OUT/load-server.json" "$MAX_BATCH" "$DEVICE" <<'EOF'
import json, os, sys, time, urllib.request
url, pid, t0, out, max_batch, device = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
ready = None
while ready is None:
    try:
        os.kill(pid, 0)
    except OSError:
        break
    try:
        with urllib.request.urlopen(url + "/health", timeout=1.0) as r:
            if r.status == 200:
                ready = time.time() - t0
    except OSError:
        time.sleep(0.2)
json.dump({"url": url, "max_batch": int(max_batch), "device": device,
           "startup_s": None if ready is None else round(ready, 2), "healthy": ready is not None},
          open(out, "w"), indent=1)
print(f"server healthy after {ready:.1f} s" if ready is not None else "server exited before /health answered")
sys.exit(0 if ready is not None else 1)
EOF
[[ $? == 0 ]] || { tail -n 30 "$OUT/server.log"; exit 1; }

level() {  # NAME bench.load flags...
  local name=$1; shift
  echo "== $name"
  "$PYTHON" -m bench.load --url "$URL" --token "$TOKEN" --texts "$LOAD_TEXTS" --model "$LABEL" --quiet \
    --json "$OUT/$name.json" --markdown "$OUT/$name.md" "$@" | tail -n 4 || FAILED=1
}
FAILED=0
for c in $LOAD_C; do level "load-sse-c$c" --protocol sse --concurrency "$c" --requests "$LOAD_REQUESTS"; done
level "load-sse-c$LOAD_RATE_C-r$LOAD_RATE" --protocol sse --concurrency "$LOAD_RATE_C" \
  --requests "$LOAD_RATE_REQUESTS" --rate "$LOAD_RATE"
for c in $LOAD_C; do level "load-ws-c$c" --protocol ws --concurrency "$c" --requests "$LOAD_REQUESTS"; done
exit "$FAILED"
