"""The embedded SmolLM2-135M with a quantised KV cache and 8-bit weights (CPU, short prompts)."""

from __future__ import annotations

import json

import pytest
import torch

from duoattn import HeadPattern, duo_attention, load_model
from duoattn.eval.generation import GenerationSettings, generate_answer
from duoattn.eval.passkey import passkey_sample, score_passkey
from duoattn.quant.weights import Int8Linear, linear_weight_bytes

pytestmark = pytest.mark.slow


def test_quantised_cache_keeps_the_passkey(smol):
    model, tokenizer = smol
    sample = passkey_sample(tokenizer, 600, depth=0.5, seed=3)
    settings = GenerationSettings(max_new_tokens=7, prefill_chunk_size=256)
    full_text, full_bytes = generate_answer(model, tokenizer, sample.input_ids, settings)
    t = len(sample.input_ids) + 7  # the DuoCache is sized for prompt + max_new_tokens
    per_token = 30 * 3 * 64 * 4 * 2  # layers x KV heads x head_dim x float32 x (K, V)
    assert full_bytes == per_token * (t - 1)  # the stock cache holds the tokens it saw
    for bits in (8, 4):
        with duo_attention(model, HeadPattern.uniform(30, 3, 1.0, sink=16, recent=64), kv_bits=bits) as duo:
            text, nbytes = generate_answer(model, tokenizer, sample.input_ids, settings)
        assert score_passkey(sample.answer, text) == 1.0, (bits, text)
        # float32 model: a 64-channel vector is 256 bytes; int8 takes 64 + 8, int4 32 + 8
        assert nbytes == duo.expected_kv_bytes(t) == per_token * t * (64 * bits // 8 + 8) // 256


def test_int8_weights_keep_the_passkey():
    model, tokenizer = load_model(device="cpu", weight_bits=8)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 30 * 7
    # float32 weights -> int8 codes + float32 scales: a bit over a quarter of the bytes
    params = sum(m.weight.numel() for m in model.modules() if isinstance(m, Int8Linear))
    rows = sum(m.weight.shape[0] for m in model.modules() if isinstance(m, Int8Linear))
    assert linear_weight_bytes(model) == params + 4 * rows + model.lm_head.weight.numel() * 4
    sample = passkey_sample(tokenizer, 600, depth=0.5, seed=3)
    with torch.inference_mode():
        text, _ = generate_answer(model, tokenizer, sample.input_ids, GenerationSettings(max_new_tokens=7))
    assert score_passkey(sample.answer, text) == 1.0, text


def test_eval_compares_kv_bits_on_the_same_prompts(tmp_path):
    from duoattn.cli import main

    out = tmp_path / "qp"
    assert main(["eval", "passkey", "--out", str(out), "--lengths", "150", "--samples", "2", "--methods", "duo,full",
                 "--sparsity", "0", "--pattern", str(_all_retrieval(tmp_path)), "--kv-bits", "16,4",
                 "--sink", "4", "--recent", "16", "--device", "cpu"]) == 0
    cells = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    by_method: dict[str, list[dict]] = {}
    for cell in cells:
        by_method.setdefault(cell["method"], []).append(cell)
    assert sorted(by_method) == ["duo-100%", "duo-100%-kv4", "full"]
    assert all(len(v) == 2 for v in by_method.values())
    # every head retrieval: int4 keeps (32 + 8) / 256 of the float32 bytes of the same cache
    for plain, packed in zip(by_method["duo-100%"], by_method["duo-100%-kv4"]):
        assert packed["kv_bytes"] * 256 == plain["kv_bytes"] * 40
    assert [c["prediction"] for c in by_method["duo-100%"]] == [c["prediction"] for c in by_method["full"]]
    assert all(c["score"] == 1.0 for c in by_method["full"])  # 150 tokens: the model finds the key
    assert json.loads((out / "config.json").read_text())["method_spec"]["kv_bits"] == [16, 4]


def _all_retrieval(tmp_path):
    path = tmp_path / "all-retrieval"
    HeadPattern.uniform(30, 3, 1.0, sink=4, recent=16).save(path)
    return path
