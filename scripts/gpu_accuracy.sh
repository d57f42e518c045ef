#!/usr/bin/env bash
# Passkey and needle-in-a-haystack on the deployment path with the embedded SmolLM2-135M-Instruct on one GPU
# (docs/results.md, "Accuracy on the one deployment path"). Stages run side by side: a 135M model leaves the GPU idle.
#
#   scripts/gpu_accuracy.sh OUT_ROOT MODEL.gguf [PATTERN_DIR]   (default: the shipped SmolLM2 pattern)
set -euo pipefail
ROOT=${1:?usage: $0 OUT_ROOT MODEL.gguf}
MODEL=${2:?usage: $0 OUT_ROOT MODEL.gguf [PATTERN_DIR]}
REPO_PATTERN=$(cd "$(dirname "$0")/.." && pwd)/duoattn/patterns/SmolLM2-135M-Instruct
PATTERN=${3:-$REPO_PATTERN}
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEPTHS=$("$PY" -c "print(','.join(f'{i/49:.4f}' for i in range(50)))")
mkdir -p "$ROOT"
for L in 1024 2048 4096; do
    "$PY" -m duoattn eval passkey --model "$MODEL" --pattern "$PATTERN" --out "$ROOT/passkey-$L" --lengths $L --samples 50 \
        --seed 20261201 --methods full,duo,streaming --sparsity 0.75,0.5 --device cuda >"$ROOT/passkey-$L.log" 2>&1 &
    "$PY" -m duoattn eval niah --model "$MODEL" --pattern "$PATTERN" --out "$ROOT/niah-$L" --lengths $L --depths "$DEPTHS" \
        --chat-template --max-new-tokens 24 --methods full,duo --sparsity 0.75,0.5 --device cuda \
        >"$ROOT/niah-$L.log" 2>&1 &
done
wait
