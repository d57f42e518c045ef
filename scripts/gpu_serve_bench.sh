#!/usr/bin/env bash
# duoattn serve under load on one GPU: for full attention (sparsity 0 on the same path) and DuoAttention 50% / 75%
# streaming heads, with bf16 and int4 retrieval KV, start a server, run `duoattn load` (N concurrent streaming
# clients) against it on 127.0.0.1, stop it. The server decodes its requests in one batched step replayed from a
# CUDA graph per batch-size bucket (docs/serving.md).
#
# Run from the repository root on the GPU machine: bash scripts/gpu_serve_bench.sh
# Settings: MODEL (default: the embedded SmolLM2-135M-Instruct), PATTERN (default: its shipped pattern), CLIENTS,
# REQUESTS, PROMPT_TOKENS, MAX_TOKENS, BUDGET_GIB (KV pool), PORT, SETTINGS ("sparsity bits" pairs, comma-separated),
# SKIP_TESTS=1 (the server's CPU tests need the openai client). Results: ${OUT:-runs}/serve-bench/<setting>/load.json
set -euo pipefail
PYTHON="${PYTHON:-python}"
OUT_DIR="${OUT:-runs}/serve-bench"
PORT="${PORT:-8791}"
CLIENTS="${CLIENTS:-16}"
REQUESTS="${REQUESTS:-64}"
PROMPT_TOKENS="${PROMPT_TOKENS:-4096}"
MAX_TOKENS="${MAX_TOKENS:-128}"
BUDGET_GIB="${BUDGET_GIB:-8}"
export PYTHONPATH="${PYTHONPATH:-.}"
MODEL_ARGS=()
[[ -n "${MODEL:-}" ]] && MODEL_ARGS+=(--model "$MODEL")
[[ -n "${PATTERN:-}" ]] && MODEL_ARGS+=(--pattern "$PATTERN")

"$PYTHON" -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(), torch.__version__)"

# 1. The server's own tests (CPU, tiny models and the embedded one).
[[ ${SKIP_TESTS:-0} == 1 ]] || "$PYTHON" -m pytest -q tests/test_serve.py

# GET a URL (no curl needed): its body on stdout, non-zero exit if it does not answer 200.
get() { "$PYTHON" -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())" "$1"; }

SERVER_PID=""
stop_server() { if [[ -n "$SERVER_PID" ]]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""; fi; }
trap stop_server EXIT

# 2. One server per setting, loaded by concurrent streaming clients.
IFS=, read -r -a SETS <<<"${SETTINGS:-0 16,0.5 16,0.75 16,0 4,0.5 4,0.75 4}"
for setting in "${SETS[@]}"; do
    read -r sparsity bits <<< "$setting"
    name="sparsity${sparsity}-kv${bits}"
    mkdir -p "$OUT_DIR/$name"
    "$PYTHON" -m duoattn serve "${MODEL_ARGS[@]}" --sparsity "$sparsity" --kv-bits "$bits" --host 127.0.0.1 \
        --port "$PORT" --kv-budget-gib "$BUDGET_GIB" --max-batch "$CLIENTS" --queue-size "$REQUESTS" \
        --queue-timeout 600 > "$OUT_DIR/$name/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 300); do
        get "http://127.0.0.1:$PORT/health" > /dev/null 2>&1 && break
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$OUT_DIR/$name/server.log"; exit 1; }
        sleep 1
    done
    echo "== $name"
    "$PYTHON" -m duoattn load --url "http://127.0.0.1:$PORT" --clients "$CLIENTS" --requests "$REQUESTS" \
        --prompt-tokens "$PROMPT_TOKENS" --max-tokens "$MAX_TOKENS" --deadline 900 --out "$OUT_DIR/$name"
    get "http://127.0.0.1:$PORT/metrics" > "$OUT_DIR/$name/metrics.txt"
    stop_server
done
