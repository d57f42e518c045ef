#!/usr/bin/env bash
# The multi-GPU runs of docs/distributed.md, on one host with 8 GPUs (H200 for the numbers the docs wait for):
# 1. sequence-parallel identification, Llama-3-8B shape with random bf16 weights: seconds per step and rank 0's peak
#    memory at 32K and 128K samples on 2, 4 and 8 GPUs;
# 2. tensor-parallel decode, TP=2: ms/token at 128K and 512K contexts, plain and rank-balanced binarisation.
#
# Run from the repository root: bash scripts/gpu_distributed.sh
# Results: ${OUT:-runs}/bench-identify-sp{2,4,8}/{results.json,table.md,identify.png}, ${OUT:-runs}/tp2{,-balanced}/
# {results.json,tp_decode.png}. A failed run is reported and the next one starts.
set -uo pipefail
OUT="${OUT:-runs}"
TORCHRUN="${TORCHRUN:-torchrun}"
export PYTHONPATH="${PYTHONPATH:-.}"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export CUBLAS_WORKSPACE_CONFIG=:4096:8

for n in 2 4 8; do
  echo "== identification, sequence parallel over $n GPUs"
  "$TORCHRUN" --nproc-per-node "$n" -m duoattn bench-identify --shape llama-3-8b --lengths 32768,131072 \
      --steps 2 --warmup 1 --device cuda --out "$OUT/bench-identify-sp$n" && cat "$OUT/bench-identify-sp$n/table.md" \
      || echo "sequence parallel over $n GPUs failed"
done
echo "== decode, tensor parallel over 2 GPUs (saves a random Llama-3-8B to $OUT/tp2/model first)"
"$TORCHRUN" --nproc-per-node 2 scripts/tp_decode_bench.py --shape llama-3-8b --contexts 131072,524288 \
    --device cuda --out "$OUT/tp2" || echo "tp2 failed"
echo "== decode, tensor parallel over 2 GPUs, balance_ranks=2"
"$TORCHRUN" --nproc-per-node 2 scripts/tp_decode_bench.py --model "$OUT/tp2/model" --contexts 131072,524288 \
    --device cuda --balance-ranks --out "$OUT/tp2-balanced" || echo "tp2-balanced failed"
