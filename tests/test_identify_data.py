"""Multi-passkey samples: positions, lengths, seeding and bad input, checked through a character tokenizer
(token index = character index) and, in one slow test, through the embedded model's tokenizer."""

from __future__ import annotations

import pytest
import torch
from identify_helpers import CharTokenizer

from duoattn.data.haystack import load_essays
from duoattn.data.passkeys import (
    ANSWER_TAIL, NATO_WORDS, NEEDLE_HEAD, OUTRO, QUESTION, PasskeyConfig, PasskeyDataset, ordinal,
)  # fmt: skip

# 400 short sentences of 5 numbered words: about 14,000 characters of haystack.
TEXT = " ".join(f"Line {i} says {i % 7} and {i % 11}." for i in range(400))
CONFIG = PasskeyConfig(num_passkeys=3, passkey_words=4, min_len=2000, max_len=3000)


@pytest.fixture(scope="module")
def dataset() -> PasskeyDataset:
    return PasskeyDataset(CharTokenizer(), TEXT, CONFIG, seed=7)


def test_ordinals():
    assert [ordinal(k) for k in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "101st", "111th"]  # fmt: skip


@pytest.mark.parametrize("index", range(6))
def test_passkeys_are_where_the_labels_say(dataset, index):
    tok = CharTokenizer()
    sample = dataset.sample(index)
    text = tok.decode(sample.input_ids)
    assert len(sample.passkeys) == len(sample.passkey_spans) == CONFIG.num_passkeys
    starts = [a for a, _ in sample.passkey_spans]
    assert starts == sorted(starts)
    for k, ((a, b), key) in enumerate(zip(sample.passkey_spans, sample.passkeys), start=1):
        words = key.split(" ")
        assert len(words) == CONFIG.passkey_words and set(words) <= set(NATO_WORDS)
        assert text[a:b] == " " + key
        assert text[:a].endswith(NEEDLE_HEAD.format(ordinal=ordinal(k)))
        # needles sit between sentences: the haystack before the needle ends with a full stop
        before = text[: a - len(NEEDLE_HEAD.format(ordinal=ordinal(k)))]
        assert before.endswith(".") or before.endswith("in.\n\n")
        assert text.count(key) == 2  # once in its needle, once in its answer


@pytest.mark.parametrize("index", range(6))
def test_loss_positions_cover_exactly_the_question_answer_blocks(dataset, index):
    tok = CharTokenizer()
    sample = dataset.sample(index)
    expected = "".join(
        QUESTION.format(ordinal=ordinal(k)) + " " + key + ANSWER_TAIL for k, key in enumerate(sample.passkeys, 1)
    )
    positions = sample.loss_positions
    assert positions.tolist() == list(range(sample.length - len(expected), sample.length))
    assert tok.decode(sample.input_ids[positions]) == expected
    assert tok.decode(sample.input_ids[: positions[0]]).endswith(OUTRO)
    for (a, b), key in zip(sample.qa_spans, sample.passkeys):
        assert tok.decode(sample.input_ids[a:b]).endswith(" " + key + ANSWER_TAIL)


@pytest.mark.parametrize("index", range(3))
def test_answer_loss_positions_are_those_that_predict_the_passkeys(dataset, index):
    from dataclasses import replace

    tok = CharTokenizer()
    answers = PasskeyDataset(CharTokenizer(), TEXT, replace(CONFIG, loss="answers"), seed=7).sample(index)
    qa = dataset.sample(index)
    assert torch.equal(answers.input_ids, qa.input_ids)  # only the loss positions differ
    positions = answers.loss_positions.tolist()
    assert set(positions) < set(qa.loss_positions.tolist())
    # each passkey's characters and the full stop after it are the next tokens of these positions, and nothing else
    predicted = "".join(tok.decode(answers.input_ids[[p + 1]]) for p in positions)
    assert predicted == "".join(" " + key + "." for key in answers.passkeys)
    with pytest.raises(ValueError, match="loss must be one of"):
        PasskeyConfig(loss="all")


def test_lengths_and_depths_are_within_bounds(dataset):
    lengths, depths = [], []
    for index in range(60):
        sample = dataset.sample(index)
        lengths.append(sample.length)
        depths.extend(sample.depths)
        assert list(sample.depths) == sorted(sample.depths)
    assert CONFIG.min_len <= min(lengths) and max(lengths) <= CONFIG.max_len
    assert max(lengths) - min(lengths) > (CONFIG.max_len - CONFIG.min_len) / 2  # really drawn from the range
    # depths snap to the nearest sentence boundary: at most half a sentence (about 30 of >1,000 tokens) away
    assert 0.05 - 0.02 <= min(depths) and max(depths) <= 0.95 + 0.02
    assert max(depths) - min(depths) > 0.5
    exact = PasskeyDataset(CharTokenizer(), TEXT, PasskeyConfig(3, 4, min_len=2345, max_len=2345), seed=1)
    assert {exact.sample(i).length for i in range(5)} == {2345}


def test_samples_are_seeded(dataset):
    again = PasskeyDataset(CharTokenizer(), TEXT, CONFIG, seed=7)
    other = PasskeyDataset(CharTokenizer(), TEXT, CONFIG, seed=8)
    for index in (0, 3, 1000):
        a, b = dataset.sample(index), again.sample(index)
        assert torch.equal(a.input_ids, b.input_ids) and a.passkeys == b.passkeys and a.depths == b.depths
        assert a.passkeys != other.sample(index).passkeys
    assert dataset.sample(0).passkeys != dataset.sample(1).passkeys
    # drawing out of order changes nothing: sample k depends on (seed, k) only
    assert torch.equal(dataset.sample(5).input_ids, PasskeyDataset(CharTokenizer(), TEXT, CONFIG, 7).sample(5).input_ids)


def test_bos_comes_first():
    sample = PasskeyDataset(CharTokenizer(bos=0), TEXT, CONFIG, seed=1).sample(0)
    assert sample.input_ids[0] == 0 and (sample.input_ids[1:] != 0).all()


def test_bad_input_is_refused():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="empty"):
        PasskeyDataset(tok, " \n\n ", CONFIG, seed=0)
    with pytest.raises(ValueError, match="haystack is too short: it holds"):
        PasskeyDataset(tok, TEXT[:2500], CONFIG, seed=0)
    with pytest.raises(ValueError, match="min_len=1000 is too short"):
        PasskeyDataset(tok, TEXT, PasskeyConfig(3, 4, min_len=1000, max_len=3000), seed=0)
    with pytest.raises(ValueError, match=r"min_len \(3001\) must not exceed max_len \(3000\)"):
        PasskeyConfig(3, 4, min_len=3001, max_len=3000)
    for bad in ({"num_passkeys": 0}, {"passkey_words": -1}, {"min_len": 2.5}, {"min_depth": 0.9, "max_depth": 0.1}):
        with pytest.raises(ValueError):
            PasskeyConfig(**bad)


@pytest.mark.slow
def test_real_tokenizer_positions(smol):
    _, tokenizer = smol
    config = PasskeyConfig(num_passkeys=4, passkey_words=8, min_len=1024, max_len=1536)
    dataset = PasskeyDataset(tokenizer, load_essays(), config, seed=0)
    for index in range(3):
        sample = dataset.sample(index)
        assert config.min_len <= sample.length <= config.max_len
        for (a, b), key in zip(sample.passkey_spans, sample.passkeys):
            assert tokenizer.decode(sample.input_ids[a:b]).strip() == key
        qa = tokenizer.decode(sample.input_ids[sample.loss_positions])
        assert qa.startswith("Question: what is the 1st passkey") and qa.rstrip().endswith(sample.passkeys[-1] + ".")
        assert [tokenizer.decode(sample.input_ids[a:b]).strip().split(" ")[-1] for a, b in sample.qa_spans] == [
            key.split(" ")[-1] + "." for key in sample.passkeys]  # fmt: skip


def test_haystack_sources_mix_the_essays_with_user_text(tmp_path):
    from duoattn.data.haystack import ESSAYS, load_haystack
    from duoattn.identify.run import check_inputs
    from duoattn.identify.train import IdentifyConfig

    notes = tmp_path / "notes.txt"
    notes.write_text("  Our own notes. They are short.\n", encoding="utf-8")
    essays = load_essays()
    assert load_haystack(()) == essays
    assert load_haystack([str(notes)]) == "Our own notes. They are short."
    assert load_haystack([ESSAYS, str(notes)]) == essays + "\n\nOur own notes. They are short."
    assert load_haystack([str(notes), ESSAYS]) == "Our own notes. They are short.\n\n" + essays
    # "essays" names no file: it is not checked as one; a missing file next to it still is.
    config = IdentifyConfig(out=str(tmp_path / "out"), haystack=(ESSAYS, str(notes)))
    check_inputs(config, model_given=True)
    with pytest.raises(FileNotFoundError, match="haystack file.*missing.txt.*does not exist"):
        check_inputs(IdentifyConfig(out=str(tmp_path / "out"), haystack=(ESSAYS, str(tmp_path / "missing.txt"))),
                     model_given=True)
