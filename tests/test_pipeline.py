"""duoattn.pipeline: several questions over one context, prefilled once, answered as separate generate calls would."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from duoattn import DuoPipeline, HeadPattern, duo_attention, pipeline
from duoattn.pipelines import copy_cache

SPECIAL = ["<unk>", "<s>", "</s>", "<user>", "<bot>"]  # ids 0..4; tiny_llama's bos / eos are 1 / 2
WORDS = [f"w{i}" for i in range(97 - len(SPECIAL))]
CHAT = "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<bot>{% endif %}"


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the tiny model's 97 ids, with a one-turn chat template."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<unk>")
    tok.chat_template = CHAT
    return tok


def words(seed: int, n: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(num_layers=3, heads=4, kv_heads=2)
    pattern = HeadPattern.random(3, 2, seed=1, sink=4, recent=8)
    return model, word_tokenizer(), pattern


def separate_answer(model, tok, pattern, prompt: str, max_new_tokens: int, kv_bits: int = 16) -> str:
    """The reference: one plain generate call over the whole prompt, under the same DuoAttention settings."""
    ids = tok(prompt, return_tensors="pt").input_ids
    with duo_attention(model, pattern, sparsity=0.5, kv_bits=kv_bits), torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("kv_bits", [16, 8])
def test_answers_over_one_context_equal_separate_generate_calls(setup, kv_bits):
    model, tok, pattern = setup
    pipe = DuoPipeline(model, tok, pattern, sparsity=0.5, kv_bits=kv_bits)
    context = words(0, 60)  # longer than sink + recent: streaming heads really evict
    questions = [words(1, 5), words(2, 3), words(3, 7)]
    answers = pipe(context=context, question=questions, max_new_tokens=8)
    expected = [
        separate_answer(model, tok, pattern, f"<user> {context}\n\n{q} <bot>", 8, kv_bits) for q in questions
    ]
    assert answers == expected
    assert len(set(answers)) > 1 and all(a for a in answers)  # the questions lead to different answers


def test_without_a_chat_template_a_single_question_gives_a_string(setup):
    model, tok, pattern = setup
    pipe = DuoPipeline(model, tok, pattern, sparsity=0.5, chat_template=False, prefill_chunk_size=16)
    context, question = words(4, 50), words(5, 4)
    answer = pipe(context, question, max_new_tokens=6)
    assert answer == separate_answer(model, tok, pattern, f"{context} {question}", 6)


def test_the_context_is_prefilled_once_for_all_questions(setup):
    model, tok, pattern = setup
    pipe = DuoPipeline(model, tok, pattern, sparsity=0.5)
    context = words(6, 60)
    ctx_len = len(pipe.encode(context, ["x"])[0])
    lengths: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append((args[0] if args else kwargs["input_ids"]).shape[1]),
        with_kwargs=True,
    )
    try:
        pipe(context, [words(7, 4), words(8, 4), words(9, 4)], max_new_tokens=4)
        by_pipeline = sum(n >= ctx_len for n in lengths)
        lengths.clear()
        for q in (words(7, 4), words(8, 4), words(9, 4)):
            separate_answer(model, tok, pattern, f"<user> {context}\n\n{q} <bot>", 4)
        by_separate_calls = sum(n >= ctx_len for n in lengths)
    finally:
        hook.remove()
    assert (by_pipeline, by_separate_calls) == (1, 3)


def test_a_copied_cache_is_independent_of_the_original(setup):
    model, _, pattern = setup
    ids = torch.randint(5, 97, (1, 20))
    with duo_attention(model, pattern, sparsity=0.5) as handle, torch.inference_mode():
        cache = handle.new_cache(40)
        model(ids, past_key_values=cache, use_cache=True)
        copied = copy_cache(cache)
        before = [t.clone() for layer in cache.layers for t in (layer.full_k, layer.ring_k) if t is not None]
        model(ids[:, :3], past_key_values=copied, use_cache=True)
        assert (cache.length(), copied.length()) == (20, 23)
        after = [t for layer in cache.layers for t in (layer.full_k, layer.ring_k) if t is not None]
        assert all(torch.equal(a, b) for a, b in zip(before, after))  # the original did not see the copy's tokens
        moved = [t for layer in copied.layers for t in (layer.full_k, layer.ring_k) if t is not None]
        assert not all(torch.equal(a, b) for a, b in zip(before, moved))


def test_the_model_is_left_as_it_was_between_calls(setup):
    model, tok, pattern = setup
    before = model.config._attn_implementation
    DuoPipeline(model, tok, pattern)(words(10, 20), words(11, 3), max_new_tokens=2)
    assert model.config._attn_implementation == before and "generate" not in vars(model)


def test_bad_input_is_refused_clearly(setup, monkeypatch):
    model, tok, pattern = setup
    pipe = DuoPipeline(model, tok, pattern)
    with pytest.raises(ValueError, match="empty list"):
        pipe(words(0, 5), [])
    with pytest.raises(ValueError, match="both empty"):
        DuoPipeline(model, tok, pattern, chat_template=False)("", "")
    monkeypatch.setattr(model.config, "max_position_embeddings", 40)
    with pytest.raises(ValueError, match=r"prompt has \d+ tokens; with max_new_tokens=8 that exceeds the model's "
                                         r"context of 40 tokens"):
        pipe(words(0, 60), "w1", max_new_tokens=8)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        pipeline(model, pattern)
    with pytest.raises(ValueError, match="needs a pattern"):
        pipeline(model, tokenizer=tok)
    with pytest.raises(ValueError, match=r"pattern shape \(2, 2\)"):
        DuoPipeline(model, tok, HeadPattern.uniform(2, 2))
