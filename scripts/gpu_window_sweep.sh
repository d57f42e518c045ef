#!/usr/bin/env bash
# Accuracy against the streaming window at fixed KV memory (docs/results.md, "Window or retrieval heads"): NIAH at
# 2K and 4K for duo 10% retrieval heads and StreamingLLM (0%) with the recent window that gives them the KV memory
# of duo 25% with sink 64 + recent 256. SmolLM2-135M has 90 KV heads: 25% keeps 22, 10% keeps 9, and a head costs
# L tokens (retrieval) or sink + recent (streaming), so for prompt length L
#   10%:  9 L + 81 (64 + R) = 22 L + 68 x 320    ->  R = (13 L + 21760) / 81 - 64
#   0%:  90 (64 + R)       = 22 L + 68 x 320    ->  R = (22 L + 21760) / 90 - 64
# duo 25% at recent 256 on the same prompts is scripts/gpu_pattern_eval.sh's niah-L run.
#
#   scripts/gpu_window_sweep.sh OUT_ROOT MODEL.gguf PATTERN_DIR
set -euo pipefail
ROOT=${1:?usage: $0 OUT_ROOT MODEL.gguf PATTERN_DIR}
MODEL=${2:?usage: $0 OUT_ROOT MODEL.gguf PATTERN_DIR}
PATTERN=${3:?usage: $0 OUT_ROOT MODEL.gguf PATTERN_DIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SAMPLES=${SAMPLES:-50} DEVICE=${DEVICE:-cuda}
DEPTHS=$("$PY" -c "print(','.join(f'{i/($SAMPLES-1 if $SAMPLES>1 else 1):.4f}' for i in range($SAMPLES)))")
mkdir -p "$ROOT"
start=$SECONDS
for L in 2048 4096; do
    R10=$(( (13 * L + 21760) / 81 - 64 ))
    R0=$(( (22 * L + 21760) / 90 - 64 ))
    "$PY" -m duoattn eval niah --model "$MODEL" --pattern "$PATTERN" --out "$ROOT/niah-$L-duo10-recent$R10" \
        --lengths $L --depths "$DEPTHS" --chat-template --max-new-tokens 24 --methods duo --sparsity 0.9 \
        --recent $R10 --device "$DEVICE" >"$ROOT/niah-$L-duo10.log" 2>&1 &
    "$PY" -m duoattn eval niah --model "$MODEL" --pattern "$PATTERN" --out "$ROOT/niah-$L-streaming-recent$R0" \
        --lengths $L --depths "$DEPTHS" --chat-template --max-new-tokens 24 --methods streaming \
        --recent $R0 --device "$DEVICE" >"$ROOT/niah-$L-streaming.log" 2>&1 &
done
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
echo "window sweep $((SECONDS - start)) s" | tee -a "$ROOT/timings.txt"
for d in "$ROOT"/niah-*-recent*; do
    "$PY" -c "import json,sys; r=json.load(open(sys.argv[1]+'/results.json')); print(sys.argv[1].split('/')[-1], {k: round(v['score'], 3) for k, v in r['summary']['labels'].items()})" "$d" || status=1
done
exit $status
