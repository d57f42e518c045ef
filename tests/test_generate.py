"""``duoattn generate``: documents from files or stdin, the answer streamed to stdout, one summary line on stderr."""

from __future__ import annotations

import io
import re

import pytest
from conftest import tiny_llama
from test_pipeline import separate_answer, word_tokenizer, words

from duoattn import HeadPattern, cli, hub
from duoattn import generate as gen
from duoattn.eval.passkey import QUESTION, passkey_sample

SUMMARY = re.compile(
    r"prompt (\d+) tokens \| prefill [\d.]+ s \| ([\d.]+|n/a) tokens/s \((\d+) new\) \| "
    r"KV ([\d.]+ [KMGT]?i?B) held vs ([\d.]+ [KMGT]?i?B) full attention \(([\d.]+)x\)"
)


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """``duoattn generate --model tiny`` gets a tiny random Llama and a word tokenizer; its pattern is on disk."""
    model, tok = tiny_llama(num_layers=3, heads=4, kv_heads=2), word_tokenizer()
    pattern = HeadPattern.random(3, 2, seed=1, sink=4, recent=8)
    monkeypatch.setattr(gen, "load_model", lambda name, dtype=None, device=None: (model, tok))
    return model, tok, pattern, str(pattern.save(tmp_path / "pattern"))


def run_cli(capsys, *argv: str) -> tuple[str, str]:
    assert cli.main(["generate", *argv]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_the_answer_streams_to_stdout_and_equals_plain_generate(tiny, capsys, tmp_path):
    model, tok, pattern, pattern_dir = tiny
    doc = tmp_path / "doc.txt"
    doc.write_text(words(0, 60))
    question = words(1, 4)
    out, err = run_cli(capsys, "--model", "tiny", "--pattern", pattern_dir, "--file", str(doc), "--question",
                       question, "--max-new-tokens", "6", "--prefill-chunk-size", "16")
    expected = separate_answer(model, tok, pattern, f"<user> {doc.read_text()}\n\n{question} <bot>", 6)
    assert out == expected + "\n"
    assert SUMMARY.fullmatch(err.strip().splitlines()[-1])


def test_the_summary_counts_tokens_and_kv_bytes(tiny, tmp_path):
    model, tok, pattern, pattern_dir = tiny
    doc = tmp_path / "doc.txt"
    doc.write_text(words(2, 50))
    config = gen.GenerateConfig(model="tiny", pattern=pattern_dir, files=[str(doc)], prompt="w3", chat_template=False,
                                max_new_tokens=5, sparsity=0.5)
    err = io.StringIO()
    result = gen.run_generate(config, stdout=io.StringIO(), stderr=err)
    assert result.prompt_tokens == 50 + 1  # words, each one token, plus the prompt word
    tokens = result.prompt_tokens + config.max_new_tokens  # the cache is sized for the prompt and the answer
    # 3 layers x 2 KV heads, head_dim 8, float64; sparsity 0.5: 3 retrieval heads, 3 keep sink + recent = 12
    per_token = 8 * 8 * 2
    assert result.full_kv_bytes == 6 * tokens * per_token
    assert result.kv_bytes == (3 * tokens + 3 * min(tokens, 12)) * per_token
    held, full, ratio = SUMMARY.fullmatch(err.getvalue().strip().splitlines()[-1]).groups()[3:]
    assert (held, full) == (gen.format_bytes(result.kv_bytes), gen.format_bytes(result.full_kv_bytes))
    assert float(ratio) == pytest.approx(result.kv_bytes / result.full_kv_bytes, abs=0.005)


def test_bytes_are_shown_in_binary_units():
    assert [gen.format_bytes(n) for n in (0, 1023, 1024, 1536, 36 * 2**20 + 2**19, 3 * 2**30)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "36.5 MiB", "3.0 GiB"]


def test_several_files_and_stdin_are_read_in_order(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha")
    b.write_text("beta")
    assert gen.read_documents([str(a)], io.StringIO()) == "alpha"
    text = gen.read_documents([str(a), "-", str(b)], io.StringIO("from stdin"))
    assert text == f"--- {a} ---\nalpha\n\n--- stdin ---\nfrom stdin\n\n--- {b} ---\nbeta"


def test_long_prompts_show_prefill_progress_on_stderr(tiny, monkeypatch):
    model, tok, pattern, pattern_dir = tiny
    monkeypatch.setattr(gen, "PROGRESS_MIN_TOKENS", 10)
    out, err = io.StringIO(), io.StringIO()
    config = gen.GenerateConfig(model="tiny", pattern=pattern_dir, files=["-"], prompt="w1", max_new_tokens=2,
                                prefill_chunk_size=16, chat_template=False)
    gen.run_generate(config, stdin=io.StringIO(words(3, 40)), stdout=out, stderr=err)
    assert "prefill" in err.getvalue() and "40/40" in err.getvalue()
    assert "prefill" not in out.getvalue()


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "nothing to answer"),
        (["--file", "-", "--file", "-"], "stdin can be read once"),
        (["--file", "/nonexistent/doc.txt"], "--file '/nonexistent/doc.txt' is not a file"),
        # the model id of a published pattern (a name lookup: nothing is downloaded)
        (["--model", hub.upstream_pattern("Llama-3.1-8B-Instruct").model, "--prompt", "x"],
         "needs --pattern .* published for it is --pattern Llama-3.1-8B-Instruct"),
        (["--prompt", "x", "--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    ],
)
def test_bad_input_is_refused_naming_it(capsys, argv, message):
    assert cli.main(["generate", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_prompt_longer_than_the_context_is_refused(tiny, capsys, monkeypatch, tmp_path):
    model, _, _, pattern_dir = tiny
    monkeypatch.setattr(model.config, "max_position_embeddings", 32)
    doc = tmp_path / "doc.txt"
    doc.write_text(words(4, 40))
    assert cli.main(["generate", "--model", "tiny", "--pattern", pattern_dir, "--file", str(doc)]) == 2
    assert "exceeds the model's context of 32 tokens" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- the embedded model
@pytest.fixture(scope="module")
def passkey_doc(smol, tmp_path_factory):
    """A ~1K-token passkey document (the demo's prompt without its question) and its key."""
    _, tok = smol
    sample = passkey_sample(tok, 1024, depth=0.5, seed=7)
    path = tmp_path_factory.mktemp("passkey") / "haystack.txt"
    path.write_text(tok.decode(sample.input_ids)[: -len(QUESTION)], encoding="utf-8")
    return path, sample.answer


ASK = ["--prompt", QUESTION.strip(), "--no-chat-template", "--max-new-tokens", "6"]


@pytest.mark.slow
def test_the_embedded_model_answers_a_passkey_from_a_file(smol, passkey_doc, monkeypatch, capsys):
    monkeypatch.setattr(gen, "load_model", lambda name, dtype=None, device=None: smol)
    path, key = passkey_doc
    out, err = run_cli(capsys, "--file", str(path), *ASK)  # default model name, pattern and sparsity
    assert re.search(r"\d+", out).group(0) == key
    assert SUMMARY.fullmatch(err.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_embedded_model_answers_a_passkey_from_stdin(smol, passkey_doc, monkeypatch, capsys):
    monkeypatch.setattr(gen, "load_model", lambda name, dtype=None, device=None: smol)
    path, key = passkey_doc
    monkeypatch.setattr("sys.stdin", io.StringIO(path.read_text(encoding="utf-8")))
    out, _ = run_cli(capsys, "--file", "-", *ASK)
    assert re.search(r"\d+", out).group(0) == key
