#!/usr/bin/env bash
# Prefill modes against full attention on the embedded SmolLM2-135M-Instruct, on one GPU (docs/results.md, "Prefill
# modes"): passkey and NIAH at 1K / 2K / 4K / 8K (50 prompts each) and the RULER tasks where DuoAttention loses most
# (niah_multivalue, niah_multiquery, niah_multikey_1; 50 prompts at 4K and 8K), for full attention and DuoAttention
# 25% / 50% retrieval heads in each prefill mode. Stages run side by side: a 135M model leaves the GPU idle.
#
#   scripts/gpu_prefill_accuracy.sh OUT_ROOT MODEL.gguf [PATTERN_DIR]   (default: the shipped SmolLM2 pattern)
# Settings: MODES (default streaming,window:128,full), SAMPLES (50), LENGTHS (1024 2048 4096 8000), RULER_LENGTHS (4096 8000).
set -euo pipefail
ROOT=${1:?usage: $0 OUT_ROOT MODEL.gguf [PATTERN_DIR]}
MODEL=${2:?usage: $0 OUT_ROOT MODEL.gguf [PATTERN_DIR]}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PATTERN=${3:-$REPO/duoattn/patterns/SmolLM2-135M-Instruct}
MODES=${MODES:-streaming,window:128,full}
SAMPLES=${SAMPLES:-50}
LENGTHS=${LENGTHS:-1024 2048 4096 8000}
RULER_LENGTHS=${RULER_LENGTHS:-4096 8000}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEPTHS=$("$PY" -c "print(','.join(f'{i/($SAMPLES-1):.4f}' for i in range($SAMPLES)))")
COMMON=(--model "$MODEL" --pattern "$PATTERN" --methods full,duo --sparsity 0.75,0.5 --prefill "$MODES" --device "${DEVICE:-cuda}")
mkdir -p "$ROOT"
for L in $LENGTHS; do
    "$PY" -m duoattn eval passkey "${COMMON[@]}" --out "$ROOT/passkey-$L" --lengths "$L" --samples "$SAMPLES" \
        --seed 20261201 >"$ROOT/passkey-$L.log" 2>&1 &
    "$PY" -m duoattn eval niah "${COMMON[@]}" --out "$ROOT/niah-$L" --lengths "$L" --depths "$DEPTHS" \
        --chat-template --max-new-tokens 24 >"$ROOT/niah-$L.log" 2>&1 &
done
for L in $RULER_LENGTHS; do
    "$PY" -m duoattn eval ruler "${COMMON[@]}" --out "$ROOT/ruler-$L" --lengths "$L" --samples "$SAMPLES" \
        --tasks niah_multivalue,niah_multiquery,niah_multikey_1 --chat-template >"$ROOT/ruler-$L.log" 2>&1 &
done
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
for f in "$ROOT"/*/results.json; do echo "== $f"; "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps(d.get('summary', d))[:1500])" "$f"; done
exit $status
