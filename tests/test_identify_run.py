"""``identify`` end to end on a tiny model: the output directory, and bad input that leaves no pattern behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from identify_helpers import CharTokenizer, one_long_range_head_model
from test_identify_data import TEXT

from duoattn import HeadPattern
from duoattn.cli import main
from duoattn.identify import IdentifyConfig, identify
from duoattn.identify.run import GATES_PLOT, HISTORY_FILE, LOSS_PLOT, VALIDATION_FILE, VALIDATION_PLOT
from duoattn.pattern import CONFIG_FILE, GATES_FILE

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def haystack(tmp_path: Path) -> Path:
    path = tmp_path / "domain.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def run(out: Path, haystack: Path, **kwargs):
    values = dict(out=str(out), steps=3, min_len=1200, max_len=1400, num_passkeys=2, passkey_words=3,
                  sink=4, recent=32, haystack=(str(haystack),), save_every=2)
    config = IdentifyConfig(**{**values, **kwargs})
    return identify(config, model=one_long_range_head_model(), tokenizer=CharTokenizer(modulo=96), progress=False)


def test_output_directory(tmp_path, haystack):
    out = tmp_path / "run"
    result = run(out, haystack)
    assert {p.name for p in out.iterdir()} == {GATES_FILE, CONFIG_FILE, HISTORY_FILE, GATES_PLOT, LOSS_PLOT, "checkpoint",
                                               VALIDATION_FILE, VALIDATION_PLOT}
    pattern = HeadPattern.load(out)
    np.testing.assert_array_equal(pattern.gates, result.pattern.gates)
    assert pattern.shape == (2, 2) and (pattern.sink, pattern.recent) == (4, 32)
    assert (pattern.gates < 1).any() and pattern.gates.min() >= 0
    config = json.loads((out / CONFIG_FILE).read_text())
    for key, value in dict(steps=3, min_len=1200, max_len=1400, num_passkeys=2, passkey_words=3, lr=0.02, reg=0.05,
                           seed=42, sink_size=4, recent_size=32, min_depth=0.05, max_depth=0.95, dtype="float64",
                           device="cpu", haystack=[str(haystack)], model_type="llama").items():
        assert config[key] == value, key
    assert len(config["haystack_sha256"]) == 64 and config["train_seconds"] > 0
    history = json.loads((out / HISTORY_FILE).read_text())
    assert [r["step"] for r in history] == [1, 2, 3] and all(1200 <= r["length"] <= 1400 for r in history)
    for name in (GATES_PLOT, LOSS_PLOT, VALIDATION_PLOT):
        assert (out / name).read_bytes().startswith(PNG)


def test_resume_of_a_finished_run_rewrites_the_same_pattern(tmp_path, haystack):
    first = run(tmp_path / "run", haystack)
    again = run(tmp_path / "run", haystack, resume=True)
    np.testing.assert_array_equal(first.pattern.gates, again.pattern.gates)


def assert_no_pattern(out: Path):
    assert not (out / GATES_FILE).exists() and not (out / CONFIG_FILE).exists()


def test_bad_input_leaves_no_pattern(tmp_path, haystack):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"max_len=5000 exceeds the context of the model \(4096 tokens\)"):
        run(out, haystack, max_len=5000)
    assert_no_pattern(out)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        run(out, empty)
    short = tmp_path / "short.txt"
    short.write_text(TEXT[:1300])
    with pytest.raises(ValueError, match="haystack is too short"):
        run(out, short)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(out, tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"min_len=300 is too short"):
        run(out, haystack, min_len=300)
    assert_no_pattern(out)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        run(blocker / "run", haystack)
    assert blocker.read_text() == "not a directory"


def test_cli_reports_bad_input(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["identify", "--out", str(out), "--min-len", "2000", "--max-len", "1000"]) == 2
    assert "duoattn identify: error: min_len (2000) must not exceed max_len (1000)" in capsys.readouterr().err
    assert main(["identify", "--out", str(out), "--haystack", str(tmp_path / "none.txt"), "--steps", "0"]) == 2
    assert "steps must be an integer >= 1" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_embedded_model_two_steps(smol, tmp_path):
    model, tokenizer = smol
    flags = [p.requires_grad for p in model.parameters()]
    config = IdentifyConfig(out=str(tmp_path / "run"), steps=2, min_len=420, max_len=460, num_passkeys=2,
                            passkey_words=4, sink=16, recent=64, save_every=1)
    result = identify(config, model=model, tokenizer=tokenizer, progress=False)
    first, second = result.history
    assert first["distill"] == 0.0  # all gates 1: the student is exactly the teacher
    assert 0.0 < second["distill"] < 1.0
    gates = result.pattern.gates
    assert gates.shape == (30, 3) and (gates < 1).all() and (gates > 0.9).all()  # two steps of at most lr each
    assert len(np.unique(gates)) > 1  # float32 gates: the heads already differ
    assert model.config._attn_implementation == "sdpa" and [p.requires_grad for p in model.parameters()] == flags
