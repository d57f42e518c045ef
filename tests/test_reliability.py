"""Bad input and faults (issue 17): every bad argument or input file gets a clear error naming it, before any model
is loaded or any file is written; outputs change as a whole; loaded files are checked completely.

docs/reliability.md lists these cases and what each gets. Models are tiny and random, the tokenizer is one token per
character (built in-process), so nothing is downloaded; a case takes a second or two (the SIGINT test starts one
subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from identify_helpers import CharTokenizer, one_long_range_head_model, random_samples
from test_identify_data import TEXT
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from duoattn import HeadPattern
from duoattn.checks import UsageError
from duoattn.cli import check_bench_machine, main
from duoattn.demo import DemoConfig, run_demo
from duoattn.eval.generation import GenerationSettings, generate_answer
from duoattn.eval.harness import EvalConfig, run_eval
from duoattn.eval.passkey import PasskeyTask
from duoattn.eval.prompts import Sample
from duoattn.eval.store import ResultStore
from duoattn.identify import IdentifyConfig, identify
from duoattn.identify.checkpoint import load_checkpoint
from duoattn.identify.train import train_gates
from duoattn.io import atomic_write_bytes, replace_directory, save_figure
from duoattn.models import check_context
from duoattn.pattern import CONFIG_FILE, GATES_FILE

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 512  # max_position_embeddings of the tiny model on disk


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character or newline (ids 2..97), <unk> 0, <eos> 1."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A tiny model directory (512 positions, 2 layers x 2 KV heads), patterns that fit it and do not, bad files."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                         eos_token_id=1, pad_token_id=1, bos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(root / "tiny")
    char_tokenizer().save_pretrained(root / "tiny")
    HeadPattern.random(2, 2, seed=1, sink=4, recent=16).save(root / "pattern")
    HeadPattern.random(3, 2, seed=1, sink=4, recent=16).save(root / "pattern-3x2")
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=512)).save_pretrained(
        root / "gpt2")
    char_tokenizer().save_pretrained(root / "gpt2")
    (root / "a-file").write_text("not a directory\n")
    (root / "binary.txt").write_bytes(b"\x00\x01\x02PNG\x00" * 50)
    (root / "latin1.txt").write_bytes("Caf\xe9 au lait. ".encode("latin-1") * 50)
    (root / "numbers.txt").write_text("12 34 56. 78, 90! " * 50)
    (root / "domain.txt").write_text(TEXT)
    return root


def cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- bug 1
def _pattern(value: float, sink: int = 4) -> HeadPattern:
    return HeadPattern(np.full((3, 2), value), sink=sink, recent=8, metadata={"num_layers": 3, "num_kv_heads": 2})


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4, 5])
def test_a_failed_pattern_save_leaves_the_old_pattern_or_the_new_one(tmp_path, monkeypatch, fail_at):
    """Bug 1: the n-th rename of a save fails (disk full); the directory then loads as the old pattern, whole."""
    target = tmp_path / "p"
    _pattern(0.25).save(target)
    (target / "README.md").write_text("kept\n")
    calls = {"n": 0}
    real = {"replace": os.replace, "rename": os.rename}

    def failing(kind):
        def move(src, dst):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise OSError(28, "No space left on device")
            return real[kind](src, dst)
        return move

    monkeypatch.setattr(os, "replace", failing("replace"))
    monkeypatch.setattr(os, "rename", failing("rename"))
    failed = False
    try:
        _pattern(0.75, sink=6).save(target)
    except OSError:
        failed = True
    monkeypatch.undo()
    loaded = HeadPattern.load(target)
    # the gates and the sink come from the two files: both old, or both new
    assert (loaded.gates.tolist(), loaded.sink) == ((np.full((3, 2), 0.25).tolist(), 4) if failed
                                                    else (np.full((3, 2), 0.75).tolist(), 6))
    assert (target / "README.md").read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temporary directory left behind
    assert failed == (fail_at <= 4)  # 2 files into the new directory, 2 renames to swap it in


def test_a_gates_file_of_another_shape_than_its_config_is_refused(tmp_path):
    d = _pattern(0.5).save(tmp_path / "p")
    (d / GATES_FILE).write_text("0.5\t0.5\n0.5\t0.5\n")
    with pytest.raises(ValueError, match=r"says num_layers=3 .* do not belong together"):
        HeadPattern.load(d)


# ------------------------------------------------------------------------------------------------- bug 2
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_of_a_plain_open(tmp_path, umask, mode):
    """Bug 2: atomically written files, plots and pattern directories follow the umask (tempfile makes 0600)."""
    import matplotlib.pyplot as plt

    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        fig = plt.figure()
        save_figure(fig, tmp_path / "a.png")
        plt.close(fig)
        _pattern(0.5).save(tmp_path / "pattern")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == mode
    for path in ("a.json", "a.png", f"pattern/{GATES_FILE}", f"pattern/{CONFIG_FILE}"):
        assert stat.S_IMODE(os.stat(tmp_path / path).st_mode) == mode, path
    assert stat.S_IMODE(os.stat(tmp_path / "pattern").st_mode) == mode | ((mode & 0o444) >> 2)  # x where r


def test_an_existing_file_keeps_its_mode(tmp_path):
    path = tmp_path / "shared.json"
    path.write_text("{}")
    path.chmod(0o640)
    atomic_write_bytes(path, b"[]")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 and path.read_bytes() == b"[]"


def test_replace_directory_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        replace_directory(tmp_path / "f", lambda new: None)
    assert (tmp_path / "f").read_text() == "x"


def test_saving_through_a_link_replaces_the_directory_it_points_to(tmp_path):
    _pattern(0.25).save(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    _pattern(0.75).save(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and HeadPattern.load(tmp_path / "real").gates[0, 0] == 0.75
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


# ---------------------------------------------------------------------------------------------- bugs 4, 5
def identify_run(out: Path, haystack: Path, **kwargs):
    values = dict(out=str(out), steps=2, min_len=1200, max_len=1300, num_passkeys=2, passkey_words=3, sink=4,
                  recent=32, haystack=(str(haystack),), save_every=1)
    return identify(IdentifyConfig(**{**values, **kwargs}), model=one_long_range_head_model(),
                    tokenizer=CharTokenizer(modulo=96), progress=False)


@pytest.mark.parametrize("lengths", [dict(min_len=200, max_len=320), dict(min_len=100, max_len=1000)])
def test_identify_refuses_samples_that_fit_the_streaming_window(tmp_path, lengths):
    """Bug 4: up to sink + recent tokens a streaming head sees everything; such samples would teach nothing."""
    name = "max_len" if lengths["max_len"] <= 320 else "min_len"
    with pytest.raises(UsageError, match=rf"{name}={lengths[name]} must exceed sink \+ recent = 64 \+ 256 = 320"):
        IdentifyConfig(out=str(tmp_path), sink=64, recent=256, **lengths)


def test_identify_cli_refuses_samples_that_fit_the_streaming_window(tmp_path, capsys):
    code, err = cli(["identify", "--out", tmp_path / "o", "--min-len", 300, "--max-len", 300], capsys)
    assert code == 2 and "max_len=300 must exceed sink + recent = 64 + 256 = 320" in err
    assert not (tmp_path / "o").exists()


def test_identify_refuses_a_non_empty_out_and_overwrite_replaces_it_whole(tmp_path, files):
    """Bug 5: another run's directory is not overwritten silently; --overwrite replaces all of it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text("an older pattern\n")
    with pytest.raises(UsageError, match=r"is not empty \(README.md\); pass --resume .* --overwrite"):
        identify_run(out, files / "domain.txt")
    with pytest.raises(UsageError, match="holds no checkpoint to resume"):
        identify_run(out, files / "domain.txt", resume=True)
    assert [p.name for p in out.iterdir()] == ["README.md"]
    identify_run(out, files / "domain.txt", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoint", CONFIG_FILE, GATES_FILE, "gates.png", "history.json", "loss.png", "validation.json",
         "validation.png"])
    with pytest.raises(UsageError, match="is not empty"):  # a finished run is not rerun over either
        identify_run(out, files / "domain.txt", seed=7)
    assert len(identify_run(out, files / "domain.txt", resume=True).history) == 2


# ------------------------------------------------------------------------------------------------- bug 6
def test_check_context_names_the_setting():
    config = LlamaConfig(max_position_embeddings=512)
    check_context(config, 512, "lengths")
    with pytest.raises(UsageError, match=r"^lengths=600 exceeds the context of the model \(512 tokens\)$"):
        check_context(config, 600, "lengths")


def test_eval_refuses_lengths_past_the_context(tmp_path, files, capsys):
    """Bug 6: the check comes before the output directory is created."""
    code, err = cli(["eval", "passkey", "--model", files / "tiny", "--out", tmp_path / "o", "--methods", "full",
                     "--lengths", 600, "--device", "cpu"], capsys)
    assert code == 2 and "lengths=600 exceeds the context of the model (512 tokens)" in err
    assert not (tmp_path / "o").exists()


@dataclass
class PromptsOfLength:
    """A task whose prompts are exactly ``lengths[0]`` tokens and may generate 8 more."""

    lengths: list[int]
    name = "fixed"

    def samples(self, tokenizer, chat_template: bool) -> list[Sample]:
        return [Sample("s", [5] * self.lengths[0], ["x"], "passkey", 8, {"task": "fixed", "length": self.lengths[0]})]


def test_eval_refuses_a_prompt_that_with_its_answer_passes_the_context(tmp_path, files):
    config = EvalConfig(out_dir=str(tmp_path / "o"), model=str(files / "tiny"), methods="full", device="cpu")
    with pytest.raises(UsageError, match=r"prompt s \(tokens \+ max_new_tokens\)=518 exceeds the context of the"):
        run_eval(config, PromptsOfLength([510]))
    assert not (tmp_path / "o").exists()


def test_demo_refuses_lengths_past_the_context(files):
    config = DemoConfig(model=str(files / "tiny"), pattern=str(files / "pattern"), lengths=[300, 600], device="cpu")
    with pytest.raises(UsageError, match=r"lengths \(\+ the answer's tokens\)=608 exceeds the context"):
        run_demo(config)


def test_demo_checks_everything_before_loading_the_weights_then_runs(files, monkeypatch, capsys):
    import duoattn.demo as demo

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the arguments were checked")

    config = DemoConfig(model=str(files / "tiny"), pattern=str(files / "pattern"), lengths=[30, 400], samples=1,
                        device="cpu")
    with monkeypatch.context() as patch:
        patch.setattr(demo, "load_model", no_weights)
        with pytest.raises(UsageError, match="length 30 is too short"):
            run_demo(config)
    rows = run_demo(DemoConfig(**{**config.__dict__, "lengths": [400]}))
    assert [r.method for r in rows] == ["full", "duo-50%", "streaming"]
    assert rows[0].kv_bytes[400] > rows[1].kv_bytes[400] > rows[2].kv_bytes[400]  # streaming heads hold less
    assert "acc@400" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- bug 7
def test_a_bad_dtype_writes_nothing_and_the_next_run_works(tmp_path, files, capsys):
    """Bug 7: every argument is checked before config.json is written."""
    argv = ["eval", "passkey", "--model", files / "tiny", "--out", tmp_path / "o", "--methods", "full",
            "--lengths", 400, "--samples", 1, "--device", "cpu", "--max-new-tokens", 1]
    code, err = cli(argv + ["--dtype", "float33"], capsys)
    assert code == 2 and "dtype must be one of ('float32', 'bfloat16', 'float16', 'float64'), got 'float33'" in err
    assert not (tmp_path / "o").exists()
    assert cli(argv, capsys)[0] == 0
    assert len(json.loads((tmp_path / "o" / "results.json").read_text())["cells"]) == 1


# ------------------------------------------------------------------------------ unclear cases: the API
def test_complex_gates_are_refused():
    with pytest.raises(UsageError, match="real numeric values .* complex128"):
        HeadPattern(np.array([[0.5 + 1j, 1.0]]))


def test_string_gates_are_refused():
    with pytest.raises(UsageError, match="real numeric values"):
        HeadPattern([["0.5", "1.0"]])


def pattern_dir(tmp_path: Path, config: bytes | None = None, tsv: bytes | None = None) -> Path:
    d = _pattern(0.5).save(tmp_path / "p")
    if config is not None:
        (d / CONFIG_FILE).write_bytes(config)
    if tsv is not None:
        (d / GATES_FILE).write_bytes(tsv)
    return d


PATTERN_FILE_CASES = {
    "config.json not UTF-8": (dict(config=b'{"sink_size": 4, "recent_size": 8, "x": "\xff"}'),
                              r"pattern config '.*config.json' is not UTF-8 text \(byte 0xff"),
    "config.json nested 100k deep": (dict(config=b"[" * 100_000 + b"]" * 100_000),
                                     r"config.json' is not valid JSON: nested too deeply"),
    "config.json a list": (dict(config=b"[1, 2]"), r"config.json must hold a JSON object, got list"),
    "gates file not UTF-8": (dict(tsv=b"0.5\t\xff\n"), r"gates file '.*tsv' is not UTF-8 text"),
    "gates far outside [0, 1]": (dict(tsv=b"0.5\t7.0\n0.5\t0.5\n0.5\t0.5\n"), r"holds values from 0.5 to 7"),
    "sink_size not an integer": (dict(config=b'{"sink_size": "4", "recent_size": 8}'), r"sink must be an integer"),
}


@pytest.mark.parametrize("case", list(PATTERN_FILE_CASES))
def test_damaged_pattern_files_are_refused_naming_the_file(tmp_path, case):
    kwargs, message = PATTERN_FILE_CASES[case]
    with pytest.raises(UsageError, match=message):
        HeadPattern.load(pattern_dir(tmp_path, **kwargs))


def test_a_pattern_path_that_is_a_file_is_named_as_such(files):
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        HeadPattern.load(files / "a-file")


@pytest.mark.parametrize("ids, message", [([], "input_ids is empty"), ([5, 100], r"token ids in \[0, 100\), got 100"),
                                           ([5, -1], "got -1")])
def test_bad_prompts_are_refused_before_generation(ids, message):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(UsageError, match=message):
        generate_answer(model, char_tokenizer(), ids, GenerationSettings(max_new_tokens=1))


@pytest.mark.parametrize("name, message", [
    ("binary.txt", r"binary.txt' is (binary|not UTF-8)"),
    ("latin1.txt", r"latin1.txt' is not UTF-8 text \(byte 0xe9 at offset 3\)"),
    ("numbers.txt", r"numbers.txt' holds no word"),
    ("a-file/x", "does not exist"),
])
def test_bad_haystack_files_are_refused_before_the_model_is_loaded(tmp_path, files, capsys, name, message):
    code, err = cli(["identify", "--out", tmp_path / "o", "--model", files / "tiny", "--min-len", 350, "--max-len", 400,
                     "--haystack", files / name], capsys)
    assert code == 2 and re.search(message, err), err
    with pytest.raises((UsageError, FileNotFoundError), match=message):
        identify_run(tmp_path / "o2", files / name)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


# --------------------------------------------------------------------------------------- checkpoints
@pytest.fixture
def checkpoint(tmp_path) -> Path:
    config = IdentifyConfig(out=str(tmp_path / "out"), steps=2, sink=2, recent=8, min_len=40, max_len=40)
    train_gates(LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)),
                random_samples(40, 8), config, config.settings(), tmp_path / "out" / "checkpoint", progress=False)
    return tmp_path / "out" / "checkpoint"


def _rewrite_tensors(directory: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "step-000002.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"step": "2"})


CHECKPOINT_CASES = {
    "truncated tensors": (lambda d: (d / "step-000002.safetensors").write_bytes(
        (d / "step-000002.safetensors").read_bytes()[:100]), r"step-000002.safetensors' is not a readable safetensors"),
    "random bytes": (lambda d: (d / "step-000002.safetensors").write_bytes(os.urandom(256)),
                     "is not a readable safetensors"),
    "NaN gate": (lambda d: _rewrite_tensors(d, lambda t: t["gates"].__setitem__((0, 0), float("nan"))),
                 r"step-000002.safetensors': gates holds NaN"),
    "gate out of range": (lambda d: _rewrite_tensors(d, lambda t: t["gates"].__setitem__((0, 0), 1.5)),
                          r"gates must lie in \[0, 1\]"),
    "missing optimiser state": (lambda d: _rewrite_tensors(d, lambda t: t.pop("optimizer.0.exp_avg_sq")),
                                "lacks the tensor 'optimizer.0.exp_avg_sq'"),
    "gates of the wrong dtype": (lambda d: _rewrite_tensors(d, lambda t: t.__setitem__("gates", t["gates"].double())),
                                 "gates must be float32"),
    "state.json not JSON": (lambda d: (d / "state.json").write_text("{"), r"state.json' is not valid JSON"),
    "state.json a directory": (lambda d: ((d / "state.json").unlink(), (d / "state.json").mkdir()),
                               "is not a regular file"),
    "state.json without history": (lambda d: (d / "state.json").write_text(json.dumps(
        {k: v for k, v in json.loads((d / "state.json").read_text()).items() if k != "history"})), "lacks history"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_damaged_checkpoints_are_refused_at_load_naming_the_file(checkpoint, case):
    damage, message = CHECKPOINT_CASES[case]
    load_checkpoint(checkpoint)  # intact, it loads
    damage(checkpoint)
    with pytest.raises(UsageError, match=message):
        load_checkpoint(checkpoint)


def test_identify_with_a_damaged_checkpoint_refuses_to_resume(tmp_path, files):
    out = tmp_path / "run"
    identify_run(out, files / "domain.txt")
    (out / "checkpoint" / "state.json").unlink()
    (out / "checkpoint" / "state.json").mkdir()
    with pytest.raises(UsageError, match="state.json' is not a regular file"):
        identify_run(out, files / "domain.txt", resume=True)


# ---------------------------------------------------------------------------------------- results store
def _cell(**changes):
    cell = {"method": "full", "label": "full", "kind": "full", "sparsity": None, "seed": None, "retrieval_ratio": 1.0,
            "sample": "L100/0", "task": "passkey", "length": 100, "score": 1.0, "kv_bytes": 10, "seconds": 0.1}
    return {**cell, **changes}


CELLS_CASES = {
    "a line not UTF-8": (b'{"method": "\xff"}\n' + json.dumps(_cell()).encode() + b"\n", r"line 1, is not UTF-8"),
    "a line missing keys": (json.dumps({"method": "full", "sample": "a"}).encode() + b"\n",
                            r"cells.jsonl, line 1 lacks label, kind"),
    "a score that is not a number": (json.dumps(_cell(score="1")).encode() + b"\n", "score must be int or float"),
    "a cell recorded twice": ((json.dumps(_cell()) + "\n" + json.dumps(_cell()) + "\n").encode(), "twice"),
}


@pytest.mark.parametrize("case", list(CELLS_CASES))
def test_damaged_cells_files_are_refused_naming_the_line(tmp_path, case):
    data, message = CELLS_CASES[case]
    (tmp_path / "cells.jsonl").write_bytes(data)
    with pytest.raises(UsageError, match=message):
        ResultStore(tmp_path, {"a": 1})
    assert not (tmp_path / "config.json").exists()  # nothing written


def test_a_cut_short_last_line_is_dropped(tmp_path):
    (tmp_path / "cells.jsonl").write_bytes(json.dumps(_cell()).encode() + b'\n{"method": "\xe2\x82')
    assert len(ResultStore(tmp_path, {"a": 1}).cells) == 1


# ------------------------------------------------------------------------------------------- GPT-2
def test_gpt2_runs_full_attention_and_is_refused_for_duoattention(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=512)).eval()
    tok = char_tokenizer()
    summary = run_eval(EvalConfig(out_dir=str(tmp_path / "full"), methods="full", max_new_tokens=1),
                       PasskeyTask(lengths=[400], samples_per_length=1), model, tok)
    assert summary["methods"]["full"]["score"] in (0.0, 1.0)
    with pytest.raises(ValueError, match="does not support model_type 'gpt2'"):
        run_eval(EvalConfig(out_dir=str(tmp_path / "duo"), methods="streaming"),
                 PasskeyTask(lengths=[400], samples_per_length=1), model, tok)
    assert not (tmp_path / "duo").exists()


# ------------------------------------------------------------------------------------ the command line
CLI_CASES = {
    # name: (argv with {files} and {tmp} placeholders, the message)
    "model path that does not exist": (["eval", "passkey", "--model", "{tmp}/nowhere/model", "--out", "{tmp}/o"],
                                       "model directory '{tmp}/nowhere/model' does not exist"),
    "model directory without config.json": (["eval", "passkey", "--model", "{tmp}", "--out", "{tmp}/o"],
                                            "holds no config.json"),
    "identify --model that does not exist": (["identify", "--model", "./missing", "--out", "{tmp}/o"],
                                             "'./missing' does not exist"),
    "device foo": (["eval", "passkey", "--device", "foo", "--out", "{tmp}/o"], "device must be cpu, cuda or cuda:N"),
    "device cuda without a GPU": (["eval", "passkey", "--device", "cuda:7", "--out", "{tmp}/o"], "cuda:7"),
    "identify --device foo": (["identify", "--device", "foo", "--out", "{tmp}/o"], "got 'foo'"),
    "identify --dtype int8": (["identify", "--dtype", "int8", "--out", "{tmp}/o"], "invalid choice"),
    "methods full with kv-bits 8": (["eval", "passkey", "--methods", "full", "--kv-bits", "8", "--out", "{tmp}/o"],
                                    r"kv_bits \[8\] quantise the cache of duo, streaming and random heads"),
    "kv-bits 3": (["eval", "passkey", "--methods", "streaming", "--kv-bits", "3", "--out", "{tmp}/o"], "kv_bits"),
    "passkey lengths 20": (["eval", "passkey", "--model", "{files}/tiny", "--methods", "full", "--lengths", "20",
                            "--device", "cpu", "--out", "{tmp}/o"], "length 20 is too short for a passkey prompt"),
    "eval --out that is a file": (["eval", "passkey", "--out", "{files}/a-file"], "is not a directory"),
    "eval pattern of another model": (["eval", "passkey", "--model", "{files}/tiny", "--pattern",
                                       "{files}/pattern-3x2", "--methods", "duo", "--device", "cpu",
                                       "--lengths", "400", "--out", "{tmp}/o"], r"pattern has shape \(3, 2\)"),
    "eval --pattern that is a file": (["eval", "passkey", "--pattern", "{files}/a-file", "--out", "{tmp}/o"],
                                      "is a file, not a directory"),
    "bench --out that is a file": (["bench", "--shapes", "tiny", "--out", "{files}/a-file"], "is not a directory"),
    "bench --model with another model's pattern": (["bench", "--model", "{files}/tiny", "--pattern",
                                                    "{files}/pattern-3x2", "--device", "cpu"],
                                                   r"--pattern .*pattern-3x2 does not fit .*\(3, 2\)"),
    "bench --pattern that does not fit a shape": (["bench", "--shapes", "tiny", "--pattern", "{files}/pattern-3x2"],
                                                  r"does not fit tiny"),
    "bench --device foo": (["bench", "--shapes", "tiny", "--device", "foo"], "--device must be cpu"),
    "demo --samples 0": (["demo", "--samples", "0"], "samples must be an integer >= 1, got 0"),
    "demo --lengths ,": (["demo", "--lengths", ","], "lengths must hold at least one integer"),
    "demo --lengths 0": (["demo", "--lengths", "0"], r"lengths must be integers >= 1, got 0"),
    "demo --sparsity nan": (["demo", "--sparsity", "nan"], "expected a number in"),
    "demo pattern of another model": (["demo", "--model", "{files}/tiny", "--pattern", "{files}/pattern-3x2",
                                       "--device", "cpu"], r"pattern has shape \(3, 2\)"),
    "identify on an unsupported model": (["identify", "--model", "{files}/gpt2", "--out", "{tmp}/o"],
                                         "does not support model_type 'gpt2'"),
    "demo on an unsupported model": (["demo", "--model", "{files}/gpt2", "--pattern", "{files}/pattern"],
                                     "does not support model_type 'gpt2'"),
    "demo --lengths too short for a passkey": (["demo", "--model", "{files}/tiny", "--pattern", "{files}/pattern",
                                                "--lengths", "30", "--device", "cpu"],
                                               "length 30 is too short for a passkey prompt"),
    "identify --resume and --overwrite": (["identify", "--resume", "--overwrite", "--out", "{tmp}/o"], "not both"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_usage_errors_exit_2_with_the_argument_named(tmp_path, files, capsys, case):
    argv, message = CLI_CASES[case]
    def fill(text: str, escape=lambda s: s) -> str:
        return text.replace("{files}", escape(str(files))).replace("{tmp}", escape(str(tmp_path)))

    try:
        code = main([fill(a) for a in argv])
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert re.search(fill(message, re.escape), err), err
    assert not (tmp_path / "o").exists()


def test_bench_refuses_an_8b_shape_on_a_cpu_unless_asked_for(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = argparse.Namespace(model=None, shapes=["tiny", "llama-3-8b"], device=None, dtype="bfloat16",
                              contexts=[131072])
    with pytest.raises(UsageError, match=r"--shapes llama-3-8b builds a 16 GB bfloat16 model .* no CUDA GPU"):
        check_bench_machine(args)
    check_bench_machine(argparse.Namespace(**{**vars(args), "shapes": ["tiny"]}))  # small shapes are fine
    check_bench_machine(argparse.Namespace(**{**vars(args), "device": "cpu"}))
    assert "warning: --shapes llama-3-8b builds a 16 GB" in capsys.readouterr().err


def test_ctrl_c_prints_one_line_and_exits_130(capsys, monkeypatch):
    import duoattn.cli as cli_module

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli_module.COMMANDS, "demo", (cli_module.add_demo, interrupted))
    assert main(["demo"]) == 130
    assert capsys.readouterr().err == "duoattn demo: interrupted\n"


# -------------------------------------------------------------------------------- interrupt and resume
SCRIPT = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # SIGINT raises KeyboardInterrupt, even if the parent ignores it
sys.path.insert(0, {tests!r})
from identify_helpers import CharTokenizer, one_long_range_head_model
from duoattn.identify import IdentifyConfig, identify
config = IdentifyConfig(**{config!r})
while not os.path.exists({go!r}):  # imported; start when the test says so
    time.sleep(0.01)
model = one_long_range_head_model()
# Slow the steps down (a pause before each decoder layer changes no value) so that the signal, sent once the first
# checkpoint exists, lands while later steps still run, however fast the machine.
for layer in model.model.layers:
    layer.register_forward_pre_hook(lambda module, args: time.sleep(0.05))
identify(config, model=model, tokenizer=CharTokenizer(modulo=96), progress=False)
"""


def test_sigint_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, files):
    settings = dict(steps=6, min_len=1150, max_len=1200, num_passkeys=2, passkey_words=3, sink=4, recent=32,
                    haystack=(str(files / "domain.txt"),), save_every=2)
    out, go = tmp_path / "cut", tmp_path / "go"
    script = SCRIPT.format(tests=str(Path(__file__).parent), config={**settings, "out": str(out)}, go=str(go))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    # the uninterrupted run, while the subprocess imports torch
    whole = identify(IdentifyConfig(out=str(tmp_path / "whole"), **settings), model=one_long_range_head_model(),
                     tokenizer=CharTokenizer(modulo=96), progress=False)
    go.touch()
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not state.is_file():
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, err  # stopped mid-run, not finished
    assert not (out / GATES_FILE).exists()
    done = json.loads(state.read_text())["step"]
    assert 2 <= done < 6
    resumed = identify(IdentifyConfig(out=str(out), resume=True, **settings), model=one_long_range_head_model(),
                       tokenizer=CharTokenizer(modulo=96), progress=False)
    np.testing.assert_array_equal(resumed.pattern.gates, whole.pattern.gates)
    keys = ("step", "loss", "distill", "reg", "mean_gate", "lr", "length")
    assert [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys] for r in whole.history]
