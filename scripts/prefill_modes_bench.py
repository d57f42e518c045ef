"""Prefill seconds and peak memory of each prefill mode, through ``model.generate`` on the one deployment path.

A random-weight model of a named shape (``duoattn.bench.shapes``), a fixed fraction of retrieval heads in every
layer, one prompt of random tokens prefilled in chunks, one token generated. Each mode but ``full`` runs twice: the
first run compiles kernels and takes pinned host memory (reported as ``seconds_cold``), the second is measured. On CUDA the peak
is ``torch.cuda.max_memory_allocated`` over the measured run; ``weights_bytes`` is what the model itself holds.

    python scripts/prefill_modes_bench.py --shape llama-3-8b --context 131072 --chunk 32768 --out results.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from duoattn import HeadPattern, duo_attention
from duoattn.bench.shapes import build_random_model
from duoattn.cache import cache_kv_bytes
from duoattn.deploy import cache_kwarg
from duoattn.prefill import PrefillMode


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_once(model, ids: torch.Tensor, chunk: int) -> tuple[float, int]:
    """Seconds of one generate call that prefills ``ids`` and emits one token; KV bytes of its cache."""
    sync(ids.device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                         prefill_chunk_size=chunk, return_dict_in_generate=True)
    sync(ids.device)
    return time.perf_counter() - start, cache_kv_bytes(out[cache_kwarg(model)])


def check(device: torch.device) -> None:
    """Each mode's chunked prefill (prompt history offloaded / kept, streams, kernels of ``device``) against the same
    mode without a cache (plain keys, no history): the two paths, each checked against the dense oracle on the CPU
    by ``tests/test_prefill_modes.py``, must agree on this device too. Raises on a mismatch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=8192,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device).float().eval()
    gates = np.zeros((3, 4))
    gates[:, 0] = 1.0
    pattern = HeadPattern(gates, sink=16, recent=64)
    ids = torch.randint(0, 256, (1, 3000), device=device)
    for mode in ("streaming", "window:700", "full"):  # the window starts inside the third 1024-token chunk
        with duo_attention(model, pattern, prefill=mode) as handle, torch.no_grad():
            plain = model(ids, use_cache=False).logits
            cache = handle.new_cache(max_len=3000)
            cache.begin_prompt(3000)
            chunks = [model(ids[:, i : i + 1024], **{cache_kwarg(model): cache}).logits for i in range(0, 3000, 1024)]
        err = (torch.cat(chunks, dim=1) - plain).abs().max().item()
        print(json.dumps({"check": mode, "max_abs_err": err}), flush=True)
        if not err < 2e-3:
            raise SystemExit(f"prefill {mode}: chunked and uncached logits differ by {err}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3-8b")
    p.add_argument("--context", type=int, default=131072, help="prompt tokens")
    p.add_argument("--chunk", type=int, default=32768, help="prefill chunk size")
    p.add_argument("--retrieval", type=float, default=0.25, help="fraction of retrieval KV heads in every layer")
    p.add_argument("--modes", default="streaming,window:512,full", help="comma-separated prefill modes")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--check", action="store_true", help="first check the chunked path of each mode on a tiny model")
    args = p.parse_args()

    device = torch.device(args.device)
    if args.check:
        check(device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = build_random_model(args.shape, device, dtype)
    cfg = model.config
    n_ret = max(1, round(args.retrieval * cfg.num_key_value_heads))
    gates = np.zeros((cfg.num_hidden_layers, cfg.num_key_value_heads))
    gates[:, :n_ret] = 1.0  # the same number of retrieval heads in every layer
    pattern = HeadPattern(gates, sink=args.sink, recent=args.recent)
    ids = torch.randint(0, cfg.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0)).to(device)
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    rows = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        with duo_attention(model, pattern, prefill=mode):
            # "full" compiles nothing and pins no host memory: one run is enough (and the slowest one).
            cold = None if PrefillMode.parse(mode).kind == "full" else prefill_once(model, ids, args.chunk)[0]
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            seconds, kv_bytes = prefill_once(model, ids, args.chunk)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        row = {"prefill": mode, "seconds": round(seconds, 3), "seconds_cold": None if cold is None else round(cold, 3),
               "peak_bytes": peak,
               "peak_gib": None if peak is None else round(peak / 2**30, 2),
               "peak_above_weights_gib": None if peak is None else round((peak - weights) / 2**30, 2),
               "kv_bytes_after": kv_bytes}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["prefill"] == "streaming"), None)
    if base is not None and base["peak_bytes"]:
        for r in rows:
            r["peak_vs_streaming"] = round(r["peak_bytes"] / base["peak_bytes"], 3)
            r["seconds_vs_streaming"] = round(r["seconds"] / base["seconds"], 3)
    result = {"shape": args.shape, "context": args.context, "chunk": args.chunk, "retrieval_heads_per_layer": n_ret,
              "kv_heads": cfg.num_key_value_heads, "sink": args.sink, "recent": args.recent, "dtype": str(dtype),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "weights_bytes": weights, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
