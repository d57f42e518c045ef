"""``duoattn bench`` end to end on the CPU with the tiny shape: table, final JSON line, files, KV accounting."""

from __future__ import annotations

import json

import pytest

from duoattn.bench import BenchConfig
from duoattn.bench.config import Row
from duoattn.bench.report import table
from duoattn.bench.shapes import SHAPES, build_random_model, weight_bytes_read
from duoattn.cli import main


def test_bench_cli_prints_a_table_then_one_json_line_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["bench", "--shapes", "tiny", "--ratios", "1,0.5", "--contexts", "300", "--stock-contexts", "300",
                 "--prefill-contexts", "600", "--prefill-chunk", "256", "--steps", "2", "--warmup", "1",
                 "--dtype", "float32", "--sink", "4", "--recent", "16", "--out", str(out)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert "ms/tok" in lines[0] and report["bench"] == "duoattn" and report["device"] == "cpu"
    assert report["decode_cache_fill"].startswith("random")
    rows = {(r["kind"], r["path"], r["ratio"]): r for r in report["rows"]}
    assert set(rows) == {("decode", "stock", 1.0), ("decode", "full", 1.0), ("decode", "duo", 0.5),
                         ("prefill", "full", 1.0), ("prefill", "duo", 0.5)}
    assert all(r["status"] == "ok" for r in rows.values())
    shape = SHAPES["tiny"]
    layers, hkv, d = shape["num_hidden_layers"], shape["num_key_value_heads"], shape["head_dim"]
    per_head_token = d * 2 * 4  # K and V, float32
    # decode caches hold context + warm-up + steps + 16 slack tokens; each step reads the context (+ ring)
    max_len = 300 + 1 + 2 + 16
    assert rows["decode", "full", 1.0]["kv_bytes"] == layers * hkv * max_len * per_head_token
    assert rows["decode", "full", 1.0]["kv_read_bytes"] == layers * hkv * 300 * per_head_token
    assert rows["decode", "stock", 1.0]["kv_read_bytes"] == layers * hkv * 300 * per_head_token
    n_ret = round(0.5 * layers * hkv)
    assert rows["decode", "duo", 0.5]["kv_read_bytes"] == (n_ret * 300 + (layers * hkv - n_ret) * 20) * per_head_token
    assert rows["prefill", "duo", 0.5]["kv_bytes"] == (n_ret * 600 + (layers * hkv - n_ret) * 20) * per_head_token
    assert json.loads((out / "config.json").read_text())["shapes"] == ["tiny"]
    assert json.loads((out / "results.json").read_text())["rows"] == report["rows"]
    assert (out / "decode.png").stat().st_size > 1000 and "stock" in (out / "table.txt").read_text()


def test_weight_bytes_read_leave_out_the_embedding_table():
    model = build_random_model("tiny", "cpu", __import__("torch").float32)
    total = sum(p.numel() * 4 for p in model.parameters())
    vocab, hidden = SHAPES["tiny"]["vocab_size"], SHAPES["tiny"]["hidden_size"]
    assert weight_bytes_read(model) == total - vocab * hidden * 4 + hidden * 4


def test_table_shows_missing_values_as_dashes():
    text = table([Row("max_context", "duo", "tiny", 0.25, 0, status="oom")])
    assert text.splitlines()[-1].split()[-1] == "oom" and " - " in text


@pytest.mark.parametrize("kwargs, match", [
    (dict(shapes=["llama-4"]), "unknown model shape"),
    (dict(ratios=[1.5]), r"ratios must lie in \[0, 1\]"),
    (dict(contexts=[0]), "contexts must be positive integers"),
    (dict(prefill_chunk=1), "prefill_chunk must be an integer >= 2"),
    (dict(decode_fill="zeros"), "decode_fill must be"),
    (dict(streaming_kernel="cuda"), "streaming_kernel must be one of"),
])
def test_bad_bench_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BenchConfig(**kwargs)


def test_cli_reports_bad_settings_without_a_traceback(capsys):
    assert main(["bench", "--shapes", "tiny", "--ratios", "2"]) == 2
    assert "ratios must lie in [0, 1]" in capsys.readouterr().err
