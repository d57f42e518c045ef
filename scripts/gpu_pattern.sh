#!/usr/bin/env bash
# Identify a SmolLM2-135M-Instruct pattern with validation and budget-aware selection at 25% and 50% retrieval heads,
# then run passkey and NIAH at 1K-8K on it (full / duo 25% / duo 50% / random) and print a summary table.
# Sized for one H200 in about 7 minutes (docs/identification.md, "Validation and budget-aware selection").
#
#   scripts/gpu_pattern.sh OUT_ROOT MODEL.gguf
#
# Environment (defaults in brackets): STEPS [180], MIN_LEN [2600: 8 passkeys of 16 words need about 2474 tokens], MAX_LEN [8192], PASSKEYS [8], WORDS [16],
# VAL_SAMPLES [6], VAL_MIN [2600], VAL_MAX [8192], REFINE_EVALS [24], REFINE_WINDOW [4], LENGTHS [1024,2048,4096,8192],
# SAMPLES [50], DEVICE [cuda], PYTHON [python3]. SMOKE=1 runs every command on a tiny setting (for a CPU check).
set -euo pipefail
ROOT=${1:?usage: $0 OUT_ROOT MODEL.gguf}
MODEL=${2:?usage: $0 OUT_ROOT MODEL.gguf}
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [[ ${SMOKE:-0} == 1 ]]; then
    : "${STEPS:=1}" "${MIN_LEN:=420}" "${MAX_LEN:=460}" "${PASSKEYS:=2}" "${WORDS:=4}" "${VAL_SAMPLES:=1}"
    : "${VAL_MIN:=420}" "${VAL_MAX:=460}" "${REFINE_EVALS:=1}" "${REFINE_WINDOW:=1}" "${LENGTHS:=512}" "${SAMPLES:=1}"
    : "${DEVICE:=cpu}"
fi
STEPS=${STEPS:-180} MIN_LEN=${MIN_LEN:-2600} MAX_LEN=${MAX_LEN:-8192} PASSKEYS=${PASSKEYS:-8} WORDS=${WORDS:-16}
VAL_SAMPLES=${VAL_SAMPLES:-6} VAL_MIN=${VAL_MIN:-2600} VAL_MAX=${VAL_MAX:-8192} REFINE_EVALS=${REFINE_EVALS:-24}
REFINE_WINDOW=${REFINE_WINDOW:-4} LENGTHS=${LENGTHS:-1024,2048,4096,8192} SAMPLES=${SAMPLES:-50} DEVICE=${DEVICE:-cuda}
mkdir -p "$ROOT"
start=$SECONDS

# 1. Identification: longer samples and more, longer passkeys than the defaults; validation on another seed at
#    lengths up to the context; the head sets at 25% and 50% refined on the validation loss.
"$PY" -m duoattn identify --model "$MODEL" --device "$DEVICE" --out "$ROOT/pattern" --overwrite \
    --steps "$STEPS" --min-len "$MIN_LEN" --max-len "$MAX_LEN" --num-passkeys "$PASSKEYS" --passkey-words "$WORDS" \
    --val-samples "$VAL_SAMPLES" --val-min-len "$VAL_MIN" --val-max-len "$VAL_MAX" --budgets 0.1,0.25,0.5,0.75 \
    --refine 0.25,0.5 --refine-evals "$REFINE_EVALS" --refine-window "$REFINE_WINDOW" \
    >"$ROOT/identify.log" 2>&1
echo "identify $((SECONDS - start)) s" | tee "$ROOT/timings.txt"

# 2. The eval harness on the new pattern (scripts/gpu_pattern_eval.sh).
LENGTHS=$LENGTHS SAMPLES=$SAMPLES DEVICE=$DEVICE PYTHON=$PY "$REPO/scripts/gpu_pattern_eval.sh" "$ROOT" "$MODEL" "$ROOT/pattern"
echo "total $((SECONDS - start)) s" | tee -a "$ROOT/timings.txt"
