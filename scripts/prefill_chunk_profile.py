"""Diagnostic: time of one prefill chunk as the server runs it (a fresh cache per request, the prompt in chunks
of ``--chunk`` tokens), full attention against DuoAttention, on a random-weight SmolLM2-135M shape.

    python scripts/prefill_chunk_profile.py [--tokens 4096] [--chunk 512] [--requests 3]

Prints ms per chunk (each synchronised) for each setting and request, and the top CUDA / CPU ops of one
DuoAttention chunk.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from duoattn import duo_attention
from duoattn.deploy import cache_kwarg
from duoattn.kernels.dispatch import KernelChoice
from duoattn.pattern import HeadPattern
from duoattn.shipped import shipped_pattern_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--requests", type=int, default=3)
    args = ap.parse_args()
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                      attn_implementation="sdpa")
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    pattern = HeadPattern.load(shipped_pattern_dir("SmolLM2-135M-Instruct"))
    name = cache_kwarg(model)
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), device="cuda")
    for label, sparsity, streaming in (("full", 0.0, "auto"), ("duo25 flex", 0.75, "flex"),
                                       ("duo25 blocks", 0.75, "blocks")):
        with torch.no_grad(), duo_attention(model, pattern, sparsity=sparsity,
                                            kernels=KernelChoice("auto", streaming)) as handle:
            for r in range(args.requests):
                cache = handle.new_cache(args.tokens + 64, batch_size=1)
                times = []
                for s in range(0, args.tokens, args.chunk):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    model(ids[:, s : s + args.chunk], use_cache=True, logits_to_keep=1, **{name: cache})
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - t0) * 1e3)
                print(f"{label:13s} request {r}: ms per chunk " + " ".join(f"{t:.1f}" for t in times), flush=True)
            if sparsity:
                cache = handle.new_cache(args.tokens + 64, batch_size=1)
                model(ids[:, : args.chunk], use_cache=True, logits_to_keep=1, **{name: cache})
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
                    model(ids[:, args.chunk : 2 * args.chunk], use_cache=True, logits_to_keep=1, **{name: cache})
                    torch.cuda.synchronize()
                print(label, "top ops by CPU time:")
                print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
