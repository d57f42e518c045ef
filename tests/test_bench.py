"""``duoattn bench`` end to end on the CPU with the tiny shape: every headline row through ``model.generate`` (stock,
full, duo; 16-bit and int4 KV; 16- and 8-bit weights), the table, the final JSON line, the files, and KV bytes
computed by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from duoattn.bench import BenchConfig
from duoattn.bench.config import Row
from duoattn.bench.report import table
from duoattn.bench.shapes import SHAPES, build_random_model, weight_bytes_read
from duoattn.cli import main

# tiny: 2 layers x 2 KV heads, head_dim 64, float32: one head's K + V of one token
SHAPE = SHAPES["tiny"]
LAYERS, HKV, D = SHAPE["num_hidden_layers"], SHAPE["num_key_value_heads"], SHAPE["head_dim"]
PER_HEAD_TOKEN = D * 4 * 2
INT4_PER_HEAD_TOKEN = (D * 4 // 8 + 2 * 4) * 2  # int4 codes + one float32 scale and zero point per vector; K + V


def run_cli(args, capsys):
    assert main(["bench", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_bench_cli_prints_a_table_then_one_json_line_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    steps, sink, recent, context, prompt = 2, 4, 16, 200, 300
    lines, report = run_cli(["--shapes", "tiny", "--ratios", "1,0.5", "--kv-bits", "16,4", "--contexts", str(context),
                             "--prefill-contexts", str(prompt), "--prefill-chunk", "256", "--steps", str(steps),
                             "--dtype", "float32", "--sink", str(sink), "--recent", str(recent), "--capacity",
                             "--out", str(out)], capsys)
    assert "ms/tok" in lines[0] and report["bench"] == "duoattn" and report["device"] == "cpu"
    rows = {(r["kind"], r["path"], r["ratio"], r["kv_bits"], r["fill"]): r for r in report["rows"]}
    assert set(rows) == {
        ("generate", "stock", 1.0, 16, "random"), ("generate", "stock", 1.0, 16, "prefill"),
        ("generate", "full", 1.0, 16, "random"), ("step", "full", 1.0, 16, "random"),
        ("generate", "duo", 0.5, 16, "random"), ("step", "duo", 0.5, 16, "random"),
        ("generate", "duo", 0.5, 4, "random"), ("step", "duo", 0.5, 4, "random"),
        ("generate", "full", 1.0, 16, "prefill"), ("generate", "duo", 0.5, 16, "prefill"),
        ("generate", "duo", 0.5, 4, "prefill"),
        ("max_context", "full", 1.0, 16, "random"), ("max_context", "duo", 0.5, 16, "random"),
        ("max_context", "duo", 0.5, 4, "random"),
    }
    for key, r in rows.items():
        if key[0] == "max_context":
            assert r["status"] == "skipped" and r["note"] == "needs a GPU"  # the capacity search needs CUDA
            continue
        assert r["status"] == "ok", r
        assert (r["ms_per_token"] > 0) if r["fill"] == "random" else (r["prefill_s"] > 0)
    n_ret = round(0.5 * LAYERS * HKV)
    n_str = LAYERS * HKV - n_ret
    # decode caches are preallocated for context + 3 x steps + 16 tokens; a step reads the context (+ the ring)
    capacity = context + 3 * steps + 16
    ring = sink + recent
    full = rows["generate", "full", 1.0, 16, "random"]
    assert full["kv_bytes"] == LAYERS * HKV * capacity * PER_HEAD_TOKEN
    assert full["kv_read_bytes"] == LAYERS * HKV * context * PER_HEAD_TOKEN
    assert rows["generate", "stock", 1.0, 16, "random"]["kv_read_bytes"] == LAYERS * HKV * context * PER_HEAD_TOKEN
    duo = rows["generate", "duo", 0.5, 16, "random"]
    assert duo["kv_bytes"] == (n_ret * capacity + n_str * ring) * PER_HEAD_TOKEN
    assert duo["kv_read_bytes"] == (n_ret * context + n_str * ring) * PER_HEAD_TOKEN
    int4 = rows["generate", "duo", 0.5, 4, "random"]
    assert int4["kv_bytes"] == n_ret * capacity * INT4_PER_HEAD_TOKEN + n_str * ring * PER_HEAD_TOKEN
    assert int4["kv_read_bytes"] == n_ret * context * INT4_PER_HEAD_TOKEN + n_str * ring * PER_HEAD_TOKEN
    for kind in ("full", "duo"):  # the step row measures the same cache
        key = ("generate", kind, 1.0 if kind == "full" else 0.5, 16, "random")
        step = rows[("step", *key[1:])]
        assert (step["kv_bytes"], step["kv_read_bytes"]) == (rows[key]["kv_bytes"], rows[key]["kv_read_bytes"])
    # prefill rows: generate(max_new_tokens=1) sizes the cache for the prompt + 1
    assert rows["generate", "full", 1.0, 16, "prefill"]["kv_bytes"] == LAYERS * HKV * (prompt + 1) * PER_HEAD_TOKEN
    assert rows["generate", "duo", 0.5, 16, "prefill"]["kv_bytes"] == (n_ret * (prompt + 1) + n_str * ring) * \
        PER_HEAD_TOKEN
    assert rows["generate", "duo", 0.5, 4, "prefill"]["kv_bytes"] == n_ret * (prompt + 1) * INT4_PER_HEAD_TOKEN + \
        n_str * ring * PER_HEAD_TOKEN
    assert json.loads((out / "config.json").read_text())["shapes"] == ["tiny"]
    assert json.loads((out / "results.json").read_text())["rows"] == report["rows"]
    assert (out / "decode.png").stat().st_size > 1000 and "stock" in (out / "table.txt").read_text()


def test_bench_with_8_bit_weights(capsys):
    """8-bit weights: the rows run on Int8Linear layers; KV bytes do not depend on the weights."""
    _, report = run_cli(["--shapes", "tiny", "--ratios", "0.5", "--kv-bits", "8", "--weight-bits", "16,8",
                         "--contexts", "64", "--steps", "1", "--dtype", "float32", "--sink", "4", "--recent", "8",
                         "--no-step-rows"], capsys)
    rows = {(r["path"], r["weight_bits"]): r for r in report["rows"]}
    assert set(rows) == {("stock", 16), ("duo", 16), ("duo", 8)}  # stock rows at the model's own weights only
    assert all(r["status"] == "ok" and r["kv_bits"] in (16, 8) for r in rows.values())
    int8 = (D + 2 * 4) * 2  # int8 codes + float32 scale and zero point; K + V
    expected = 2 * (64 + 3 + 16) * int8 + 2 * 12 * PER_HEAD_TOKEN  # 2 retrieval, 2 streaming heads
    assert rows["duo", 16]["kv_bytes"] == rows["duo", 8]["kv_bytes"] == expected
    assert rows["duo", 8]["weight_read_bytes"] < rows["duo", 16]["weight_read_bytes"] / 2


def test_weight_bytes_read_leave_out_the_embedding_table():
    model = build_random_model("tiny", "cpu", torch.float32)
    total = sum(p.numel() * 4 for p in model.parameters())
    vocab, hidden = SHAPE["vocab_size"], SHAPE["hidden_size"]
    assert weight_bytes_read(model) == total - vocab * hidden * 4 + hidden * 4


def test_table_shows_missing_values_as_dashes():
    text = table([Row("max_context", "duo", "tiny", 0.25, 0, status="oom")])
    assert text.splitlines()[-1].split()[-1] == "oom" and " - " in text


@pytest.mark.parametrize("kwargs, match", [
    (dict(shapes=["llama-4"]), "unknown model shape"),
    (dict(ratios=[1.5]), r"ratios must lie in \[0, 1\]"),
    (dict(ratios=[]), "ratios must not be empty"),
    (dict(contexts=[0]), "contexts must be positive integers"),
    (dict(prefill_contexts=[-5]), "prefill_contexts must be positive integers"),
    (dict(prefill_chunk=1), "prefill_chunk must be an integer >= 2"),
    (dict(kv_bits=[16, 3]), r"kv_bits must be some of \(16, 8, 4\)"),
    (dict(weight_bits=[4]), "weight_bits must be some of"),
    (dict(decode_kernel="cuda"), "decode_kernel must be one of"),
    (dict(streaming_kernel="cuda"), "streaming_kernel must be one of"),
    (dict(dtype="int8"), "dtype must be bfloat16, float16 or float32"),
])
def test_bad_bench_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BenchConfig(**kwargs)


def test_full_attention_rows_keep_the_model_dtype():
    assert BenchConfig(ratios=[1.0, 0.25], kv_bits=[16, 4]).settings() == [(1.0, 16), (0.25, 16), (0.25, 4)]


def test_cli_reports_bad_settings_without_a_traceback(capsys):
    assert main(["bench", "--shapes", "tiny", "--ratios", "2"]) == 2
    assert "ratios must lie in [0, 1]" in capsys.readouterr().err
    assert main(["bench", "--shapes", "tiny", "--kv-bits", "16,3"]) == 2
    assert "kv_bits must be some of (16, 8, 4)" in capsys.readouterr().err


def test_bench_takes_a_shipped_pattern_by_name():
    """``--pattern`` of ``bench`` is resolved as everywhere else (``serve`` calls the same resolver): a directory or
    a shipped name (or a published name, or a Hub repo id)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from duoattn import HeadPattern
    from duoattn.bench.run import head_pattern
    from duoattn.shipped import shipped_pattern_dir

    name = "SmolLM2-135M-Instruct"
    want = HeadPattern.load(shipped_pattern_dir(name))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    for given in (name, str(shipped_pattern_dir(name))):
        got = head_pattern(model, BenchConfig(pattern=given))
        np.testing.assert_array_equal(got.gates, want.gates)
        assert (got.sink, got.recent) == (want.sink, want.recent)
    with pytest.raises(FileNotFoundError):
        head_pattern(model, BenchConfig(pattern="no-such-pattern-name"))
