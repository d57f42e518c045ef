"""The evaluation harness end to end on a tiny random Llama with the embedded SmolLM2 tokenizer: answers equal plain
``model.generate`` (and ``generate`` under ``duo_attention``), the output directory is complete and valid, and an
interrupted run resumes without redoing finished cells."""

from __future__ import annotations

import json

import pytest
import torch
from matplotlib.image import imread
from transformers import LlamaConfig, LlamaForCausalLM

from duoattn import HeadPattern, duo_attention
from duoattn.cli import main
from duoattn.eval import plots, runner
from duoattn.eval.harness import EvalConfig, run_eval
from duoattn.eval.niah import NiahTask
from duoattn.eval.passkey import PasskeyTask
from duoattn.eval.ruler import RulerTask
from duoattn.eval.store import ResultStore
from duoattn.eval.summary import summarize
from duoattn.models import load_tokenizer

SINK, RECENT = 4, 24


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """3 layers x 2 KV heads (4 query heads, head_dim 8), the SmolLM2 vocabulary, float32."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def pattern_dir(tmp_path_factory):
    return HeadPattern.random(3, 2, seed=5, sink=SINK, recent=RECENT).save(tmp_path_factory.mktemp("pattern"))


def niah_config(out, pattern_dir, **kw):
    base = dict(out_dir=str(out), pattern=str(pattern_dir), methods="full,duo,streaming,random",
                sparsities=[0.5], random_seeds=2, max_new_tokens=5)
    return EvalConfig(**{**base, **kw})


TASK = NiahTask(lengths=[160, 240], depths=[0.0, 1.0])


def plain_answer(model, tok, ids, n):
    ids = torch.tensor([ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_full_and_duo_through_the_harness_equal_plain_generate(tmp_path, model, tok, pattern_dir):
    run_eval(niah_config(tmp_path, pattern_dir, methods="full,duo"), TASK, model, tok)
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    samples = {s.key: s for s in TASK.samples(tok, chat_template=False)}
    assert len(cells) == 2 * len(samples)
    pattern = HeadPattern.load(pattern_dir)
    for cell in cells:
        ids = samples[cell["sample"]].input_ids
        assert cell["prompt_tokens"] == len(ids) and cell["max_new_tokens"] == 5
        if cell["method"] == "full":
            expected = plain_answer(model, tok, ids, 5)
        else:
            with duo_attention(model, pattern, sparsity=0.5):
                expected = plain_answer(model, tok, ids, 5)
        assert cell["prediction"] == expected
    by_method = {m: [c["prediction"] for c in cells if c["method"] == m] for m in ("full", "duo-50%")}
    assert by_method["full"] != by_method["duo-50%"]  # the pattern really changes the answers


def test_end_to_end_writes_valid_results_config_and_plots(tmp_path, model, tok, pattern_dir):
    summary = run_eval(niah_config(tmp_path, pattern_dir), TASK, model, tok)
    results = json.loads((tmp_path / "results.json").read_text())
    config = json.loads((tmp_path / "config.json").read_text())
    assert results["config"] == config and config["task"] == "niah"
    assert config["task_config"]["lengths"] == [160, 240] and config["sink"] == SINK and config["recent"] == RECENT
    assert config["generation"] == {"decoding": "greedy", "max_new_tokens": "min(task, 5)",
                                    "prefill_chunk_size": None, "prompt": "raw"}
    names = ["full", "duo-50%", "streaming", "random-50%-seed0", "random-50%-seed1"]
    assert config["methods"] == names and list(results["summary"]["methods"]) == names
    assert len(results["cells"]) == len(names) * 4
    for cell in results["cells"]:
        assert cell["prompt_tokens"] <= cell["length"] - 32 and 0.0 <= cell["score"] <= 1.0
        assert cell["references"] == ["eat a sandwich and sit in Dolores Park on a sunny day"]
        if cell["method"] == "streaming":  # 3 layers x 2 KV heads x (sink + recent) tokens x 8 dims x K,V x 4 bytes
            assert cell["kv_bytes"] == 3 * 2 * (SINK + RECENT) * 8 * 2 * 4 and cell["retrieval_ratio"] == 0.0
    full = {c["sample"]: c["kv_bytes"] for c in results["cells"] if c["method"] == "full"}
    duo = {c["sample"]: c["kv_bytes"] for c in results["cells"] if c["method"] == "duo-50%"}
    assert all(duo[k] < full[k] for k in full)
    assert summary["labels"]["random-50%"]["seeds"] == 2
    assert summary["methods"]["duo-50%"]["retrieval_ratio"] == 0.5
    for png in ["heatmap_full.png", "heatmap_duo-50pct.png", "heatmap_streaming.png", "heatmap_random-50pct.png",
                "sweep.png", "by_length.png"]:
        image = imread(tmp_path / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, png


def test_resume_skips_finished_cells_and_keeps_them(tmp_path, model, tok, pattern_dir, monkeypatch):
    config = niah_config(tmp_path, pattern_dir, methods="full,streaming")
    run_eval(config, TASK, model, tok)
    first = json.loads((tmp_path / "results.json").read_text())["cells"]
    # Simulate an interruption: three cells recorded, the fourth cut off mid-line.
    lines = (tmp_path / "cells.jsonl").read_text().splitlines()
    (tmp_path / "cells.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    calls = []
    real = runner.generate_answer
    monkeypatch.setattr(runner, "generate_answer", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_eval(config, TASK, model, tok)
    assert len(calls) == len(first) - 3
    again = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert again[:3] == first[:3]
    def essentials(cells):
        return sorted((c["method"], c["sample"], c["prediction"], c["kv_bytes"]) for c in cells)

    assert essentials(again) == essentials(first)
    calls.clear()
    run_eval(config, TASK, model, tok)  # everything done: nothing runs
    assert not calls
    with pytest.raises(ValueError, match=r"different config \(.*methods: \['full', 'streaming'\] -> \['full'\]"):
        run_eval(niah_config(tmp_path, pattern_dir, methods="full"), TASK, model, tok)


STORED_CELL = {"method": "m", "label": "m", "kind": "full", "sparsity": None, "seed": None, "retrieval_ratio": 1.0,
               "sample": "s1", "task": "t", "length": 100, "score": 1.0, "kv_bytes": 10, "seconds": 0.5}


def test_store_refuses_a_damaged_cells_file(tmp_path):
    store = ResultStore(tmp_path, {"a": 1})
    store.append(STORED_CELL)
    with pytest.raises(ValueError, match="already recorded"):
        store.append({**STORED_CELL, "score": 0.0})
    with open(tmp_path / "cells.jsonl", "a") as fh:
        fh.write("{broken\n" + json.dumps({**STORED_CELL, "sample": "s2"}) + "\n")
    with pytest.raises(ValueError, match="line 2, is not valid JSON"):
        ResultStore(tmp_path, {"a": 1})


def test_summary_by_hand(tmp_path):
    def cell(method, label, kind, sample, score, kv):
        return {"method": method, "label": label, "kind": kind, "sparsity": None, "seed": None,
                "retrieval_ratio": 0.5, "sample": sample, "task": "t", "length": 100, "score": score,
                "kv_bytes": kv, "seconds": 1.0}

    cells = [cell("full", "full", "full", "a", 1.0, 100), cell("full", "full", "full", "b", 0.5, 200),
             cell("r-s0", "r", "random", "a", 1.0, 50), cell("r-s0", "r", "random", "b", 1.0, 50),
             cell("r-s1", "r", "random", "a", 0.0, 25), cell("r-s1", "r", "random", "b", 0.5, 50)]
    s = summarize(cells)
    assert s["methods"]["full"]["score"] == 0.75 and s["methods"]["full"]["kv_fraction"] == 1.0
    assert s["methods"]["r-s0"]["kv_fraction"] == pytest.approx((0.5 + 0.25) / 2)
    assert s["labels"]["r"]["score"] == pytest.approx((1.0 + 0.25) / 2)
    assert s["labels"]["r"]["score_std"] == pytest.approx(0.375)
    assert s["labels"]["r"]["seeds"] == 2 and s["labels"]["r"]["by_length"] == {"100": pytest.approx(0.625)}
    assert imread(plots.budget_sweep(s, "sweep", tmp_path / "sweep.png")).ndim == 3  # with error bars


def test_ruler_and_passkey_runs(tmp_path, model, tok):
    config = EvalConfig(out_dir=str(tmp_path / "ruler"), methods="full,streaming", sink=SINK, recent=RECENT,
                        max_new_tokens=3)
    summary = run_eval(config, RulerTask(tasks=["niah_single_1", "vt"], lengths=[1024], samples_per_task=1), model, tok)
    assert set(summary["labels"]["full"]["by_task"]) == {"niah_single_1", "vt"}
    assert imread(tmp_path / "ruler" / "by_task.png").ndim == 3
    cells = json.loads((tmp_path / "ruler" / "results.json").read_text())["cells"]
    assert {c["metric"] for c in cells} == {"string_match_all"} and all(c["max_new_tokens"] == 3 for c in cells)
    config = EvalConfig(out_dir=str(tmp_path / "pk"), methods="full", max_new_tokens=2)
    run_eval(config, PasskeyTask(lengths=[200], samples_per_length=2), model, tok)
    assert len(json.loads((tmp_path / "pk" / "results.json").read_text())["cells"]) == 2


def test_cli_eval_end_to_end_and_clear_errors(tmp_path, model, tok, capsys):
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "run"
    argv = ["eval", "passkey", "--model", str(tmp_path / "tiny"), "--out", str(out), "--methods", "full,streaming",
            "--lengths", "200", "--samples", "1", "--sink", "4", "--recent", "16", "--device", "cpu",
            "--max-new-tokens", "2", "--prefill-chunk-size", "64"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == str(tmp_path / "tiny") and config["dtype"] == "float32"
    assert config["generation"]["prefill_chunk_size"] == 64
    assert len(json.loads((out / "results.json").read_text())["cells"]) == 2
    assert main(argv[:7] + ["duo"] + argv[8:]) == 2
    err = capsys.readouterr().err
    assert "method 'duo' needs a learned pattern: pass --pattern DIR" in err
    assert "default only without --model" in err and "--pattern SmolLM2-135M-Instruct" in err
    assert main(["eval", "niah", "--out", str(tmp_path / "x"), "--depths", "0,2"]) == 2
    assert "depths must be in [0, 1]" in capsys.readouterr().err
