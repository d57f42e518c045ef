"""What users call, end to end on tiny models: identification (its written pattern and its optimiser), the
random-heads baseline, the demo's table and the ``identify`` / ``eval niah`` / ``eval ruler`` command lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import oracle
import pytest
import torch
from conftest import tiny_llama
from identify_helpers import CharTokenizer, random_samples
from test_identify_data import TEXT
from transformers import LlamaConfig, LlamaForCausalLM

from duoattn import HeadPattern
from duoattn.cli import main
from duoattn.eval.methods import Method
from duoattn.identify import IdentifyConfig, identify
from duoattn.identify.train import train_gates
from duoattn.models import load_tokenizer
from duoattn.pattern import GATES_FILE

pytestmark = pytest.mark.usefixtures("one_thread")


class OptimizerLog:
    """Records, at every optimiser step, the learning rate it uses and (after the step) its parameters."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.params: list[torch.Tensor] = []

    def __enter__(self) -> OptimizerLog:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._hooks = [
            register_optimizer_step_pre_hook(lambda opt, args, kwargs: self.lrs.append(opt.param_groups[0]["lr"])),
            register_optimizer_step_post_hook(
                lambda opt, args, kwargs: self.params.append(opt.param_groups[0]["params"][0].detach().clone())
            ),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()


# ------------------------------------------------------------------------------------------ identification
def test_learning_rate_schedule_is_applied_to_the_optimiser(tmp_path):
    """10 steps: the ramp is 2 steps long, so the rates are 0.5, 1, ..., 1, 0.5 times the peak (by hand)."""
    cfg = IdentifyConfig(out=str(tmp_path), steps=10, lr=0.04, sink=2, recent=8, min_len=64, max_len=64,
                         save_every=100)
    with OptimizerLog() as log:
        train_gates(tiny_llama(num_layers=2), random_samples(48, 8), cfg, cfg.settings(), tmp_path / "ckpt",
                    progress=False)
    assert log.lrs == pytest.approx([0.02] + [0.04] * 8 + [0.02], rel=1e-12)


@pytest.fixture
def haystack(tmp_path: Path) -> Path:
    path = tmp_path / "domain.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_identify_writes_the_trained_gates_rows_as_layers(tmp_path, haystack):
    """3 layers x 2 KV heads (not square): the TSV holds, row per layer, exactly the gates the optimiser ended
    with (after the clamp to [0, 1]); read with numpy, not with the package's loader."""
    model = tiny_llama(num_layers=3, heads=4, kv_heads=2, seed=7)
    cfg = IdentifyConfig(out=str(tmp_path / "run"), steps=4, min_len=700, max_len=760, num_passkeys=1,
                         passkey_words=2, sink=4, recent=16, lr=0.1, haystack=(str(haystack),), save_every=2)
    with OptimizerLog() as log:
        identify(cfg, model=model, tokenizer=CharTokenizer(modulo=96), progress=False)
    trained = log.params[-1].clamp(0, 1).double().numpy()
    assert trained.shape == (3, 2) and len(np.unique(trained)) == 6  # every gate distinct: a swap would show
    written = np.loadtxt(tmp_path / "run" / GATES_FILE, delimiter="\t")
    np.testing.assert_array_equal(written, trained)


# ----------------------------------------------------------------------------------- random-heads baseline
def test_random_baseline_seeds_draw_different_heads(tiny_model):
    """Each seed draws its own head set (the same one every time); all keep DuoAttention's number of heads."""
    model = tiny_llama(num_layers=4, heads=4, kv_heads=4)
    drawn = {}
    for seed in range(4):
        with Method("random", 0.5, seed=seed).applied(model, None, sink=2, recent=4) as handle:
            drawn[seed] = handle.roles.copy()
        with Method("random", 0.5, seed=seed).applied(model, None, sink=2, recent=4) as handle:
            np.testing.assert_array_equal(handle.roles, drawn[seed])
        assert drawn[seed].sum() == 8
    sets = {roles.tobytes() for roles in drawn.values()}
    assert len(sets) == 4


# ---------------------------------------------------------------------------------------- user entry points
@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok) -> Path:
    """A tiny random Llama with the SmolLM2 vocabulary, saved with its tokenizer like any model directory."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pattern_dir(tmp_path_factory) -> Path:
    gates = np.array([[0.1, 0.9], [0.8, 0.3], [0.2, 0.6]])
    return HeadPattern(gates, sink=4, recent=24).save(tmp_path_factory.mktemp("pattern"))


def kv_bytes(roles: np.ndarray, sink: int, recent: int, tokens: int) -> int:
    """float32 K and V of head_dim 8: retrieval heads hold every token, streaming heads sink + recent."""
    n_ret = int(roles.sum())
    return (n_ret * tokens + (roles.size - n_ret) * min(tokens, sink + recent)) * 8 * 2 * 4


def test_demo_table_equals_separate_runs(monkeypatch, model_dir, pattern_dir, capsys):
    """The demo's rows against plain ``generate`` runs: same answers scored by hand, KV bytes by the formula."""
    import duoattn.demo as demo
    from duoattn import duo_attention, load_model

    model, tok = load_model(str(model_dir), device="cpu")
    monkeypatch.setattr(demo, "load_model", lambda *args, **kwargs: (model, tok))
    config = demo.DemoConfig(model=str(model_dir), pattern=str(pattern_dir), lengths=[120, 200], samples=2, sparsity=0.5)
    rows = demo.run_demo(config)
    table = capsys.readouterr().out
    assert [r.method for r in rows] == ["full", "duo-50%", "streaming"]
    roles = {"full": np.ones((3, 2), bool), "duo-50%": oracle.binarize(np.loadtxt(pattern_dir / GATES_FILE), 0.5),
             "streaming": np.zeros((3, 2), bool)}
    for row in rows:
        pattern = None if row.method == "full" else HeadPattern(roles[row.method].astype(float), sink=4, recent=24)
        for length in config.lengths:
            hits, tokens = 0, None
            for i in range(config.samples):
                sample = demo.passkey_sample(tok, length, depth=(i + 0.5) / 2, seed=config.seed + 1000 * length + i)
                ids = torch.tensor([sample.input_ids])
                kwargs = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids),
                              pad_token_id=tok.eos_token_id)
                if pattern is None:
                    out = model.generate(ids, **kwargs)
                else:
                    with duo_attention(model, pattern, sparsity=None):
                        out = model.generate(ids, **kwargs)
                text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                digits = "".join(c if c.isdigit() else " " for c in text).split()
                hits += bool(digits) and digits[0] == sample.answer
                # DuoAttention's cache is sized for the prompt and max_new_tokens; the stock cache holds what it saw
                # (the last generated token is never fed back).
                tokens = ids.shape[1] + 8 if pattern is not None else out.shape[1] - 1
            assert row.accuracy[length] == hits / config.samples
            assert row.kv_bytes[length] == kv_bytes(roles[row.method], 4, 24, tokens)
        ratio = rows[0].kv_bytes[200] / row.kv_bytes[200]
        line = next(s for s in table.splitlines() if s.startswith(row.method + " "))
        assert line.split()[-2:] == [f"{row.kv_bytes[200] / 2**20:.1f}", f"{ratio:.2f}x"]


def test_cli_identify_success_path(tmp_path, model_dir, haystack, capsys):
    out = tmp_path / "pattern"
    argv = ["identify", "--model", str(model_dir), "--out", str(out), "--steps", "2", "--min-len", "220",
            "--max-len", "260", "--num-passkeys", "1", "--passkey-words", "2", "--sink", "4", "--recent", "16",
            "--haystack", str(haystack), "--device", "cpu", "--save-every", "1"]
    with OptimizerLog() as log:
        assert main(argv) == 0
    assert "written to" in capsys.readouterr().out
    pattern = HeadPattern.load(out)
    assert pattern.shape == (3, 2) and (pattern.sink, pattern.recent) == (4, 16)
    np.testing.assert_array_equal(pattern.gates, log.params[-1].clamp(0, 1).double().numpy())
    assert len(log.lrs) == 2


def read_cells(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["cells"]


def check_kv_bytes(cells: list[dict], pattern_dir: Path) -> None:
    """Per prompt: full > duo > streaming bytes, and duo keeps the heads the oracle's binarisation picks."""
    roles = oracle.binarize(np.loadtxt(pattern_dir / GATES_FILE), sparsity=0.5)
    by_sample: dict[str, dict[str, dict]] = {}
    for cell in cells:
        by_sample.setdefault(cell["sample"], {})[cell["method"]] = cell
    for methods in by_sample.values():
        assert methods["duo-50%"]["retrieval_ratio"] == roles.mean()
        assert methods["full"]["kv_bytes"] > methods["duo-50%"]["kv_bytes"] > methods["streaming"]["kv_bytes"]


def test_cli_eval_niah_success_path(tmp_path, model_dir, pattern_dir):
    out = tmp_path / "niah"
    argv = ["eval", "niah", "--model", str(model_dir), "--pattern", str(pattern_dir), "--out", str(out),
            "--methods", "full,duo,streaming", "--lengths", "160,240", "--depths", "0,1", "--device", "cpu",
            "--max-new-tokens", "3"]
    assert main(argv) == 0
    cells = read_cells(out)
    assert len(cells) == 3 * 2 * 2
    assert {(c["method"], c["prompt_tokens"] <= c["length"]) for c in cells} == {
        (m, True) for m in ("full", "duo-50%", "streaming")}
    check_kv_bytes(cells, pattern_dir)
    assert all(0.0 <= c["score"] <= 1.0 for c in cells)


def test_cli_eval_ruler_success_path(tmp_path, model_dir, pattern_dir):
    out = tmp_path / "ruler"
    argv = ["eval", "ruler", "--model", str(model_dir), "--pattern", str(pattern_dir), "--out", str(out),
            "--methods", "full,duo,streaming", "--tasks", "niah_single_1,vt", "--lengths", "1024", "--samples", "1",
            "--device", "cpu", "--max-new-tokens", "3"]
    assert main(argv) == 0
    cells = read_cells(out)
    assert len(cells) == 3 * 2
    assert {c["task"] for c in cells} == {"niah_single_1", "vt"}
    check_kv_bytes(cells, pattern_dir)


def test_training_gives_gradients_to_the_gates_only(tmp_path):
    model = tiny_llama(num_layers=2)
    cfg = IdentifyConfig(out=str(tmp_path), steps=2, sink=2, recent=8, min_len=64, max_len=64, save_every=100)
    with OptimizerLog() as log:
        train_gates(model, random_samples(48, 8), cfg, cfg.settings(), tmp_path / "ckpt", progress=False)
    assert [p.shape for p in log.params] == [(2, 2)] * 2  # the optimiser holds the gates, one step per sample
    assert all(p.grad is None for p in model.parameters())
