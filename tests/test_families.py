"""Every supported family, with tiny random configs built in-process: DuoAttention against the unpatched model and
the dense oracle, in single-pass prefill, chunked prefill and token-by-token decoding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import transformers
from conftest import FAMILIES, reference_logits, run_chunks
from transformers.cache_utils import DynamicSlidingWindowLayer

from duoattn import HeadPattern, duo_attention, enable_duo_attention
from duoattn.cache import DuoCache, DuoLayer
from duoattn.models import SUPPORTED_MODEL_TYPES
from duoattn.deploy import cache_kwarg

LAYERS, HEADS = 4, 4
SHAPES = {"gqa": 2, "mha": 4}  # KV heads for 4 query heads
MHA_TOO = ("llama", "qwen2", "phi3", "gemma2")
CASES = [(name, shape) for name in FAMILIES for shape in SHAPES if shape == "gqa" or name in MHA_TOO]
GEN = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)


def tolerance(family: str) -> float:
    # Gemma 2 runs eager before DuoAttention (its local layers keep it), and eager takes its softmax in float32
    # even in a float64 model. Either bound is far below what a wrong head role changes (see the mixed test).
    return 1e-5 if FAMILIES[family].attn == "eager" else 1e-10


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, 97, (1, 32), generator=torch.Generator().manual_seed(1))


def build(family: str, shape: str = "gqa"):
    return FAMILIES[family].build(num_layers=LAYERS, heads=HEADS, kv_heads=SHAPES[shape])


def test_every_supported_model_type_has_a_family_here():
    built = {build(name).config.model_type for name in FAMILIES}
    assert built == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("family, shape", CASES)
def test_all_retrieval_equals_the_unpatched_model(family, shape, ids):
    model = build(family, shape)
    expected = model(ids).logits
    expected_gen = model.generate(ids, **GEN)
    kv_heads = model.config.num_key_value_heads
    with duo_attention(model, HeadPattern.uniform(LAYERS, kv_heads, 1.0, sink=2, recent=4), prefill_chunk_size=7):
        cached = model(ids).logits
        uncached = model(ids, use_cache=False).logits
        got_gen = model.generate(ids, **GEN)
    atol = tolerance(family)
    torch.testing.assert_close(cached, expected, rtol=0, atol=atol)
    torch.testing.assert_close(uncached, expected, rtol=0, atol=atol)
    assert torch.equal(got_gen.sequences, expected_gen.sequences)
    torch.testing.assert_close(torch.stack(got_gen.scores), torch.stack(expected_gen.scores), rtol=0, atol=atol)
    assert isinstance(got_gen[cache_kwarg(model)], DuoCache)


@pytest.mark.parametrize("family, shape", CASES)
def test_mixed_pattern_matches_the_dense_reference(family, shape, ids):
    model = build(family, shape)
    kv_heads = model.config.num_key_value_heads
    pattern = HeadPattern(np.random.default_rng(kv_heads).random((LAYERS, kv_heads)), sink=2, recent=6)
    full = model(ids).logits
    expected = reference_logits(model, pattern, ids, sparsity=0.5)
    assert not torch.allclose(expected, full, atol=1e-3)  # the streaming heads change the result
    with duo_attention(model, pattern, sparsity=0.5) as handle:
        assert 0 < handle.retrieval_ratio < 1
        single = model(ids, use_cache=False).logits
        prefill = model(ids).logits
        chunked = run_chunks(model, ids, handle.new_cache(32), [5, 11, 1, 15])
        decoded = run_chunks(model, ids, handle.new_cache(32), [1] * ids.shape[1])
    for got in (single, prefill, chunked, decoded):
        torch.testing.assert_close(got, expected, rtol=0, atol=tolerance(family))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decoding_after_chunked_prefill_equals_single_pass(family, ids):
    model = build(family)
    pattern = HeadPattern(np.random.default_rng(3).random((LAYERS, 2)), sink=2, recent=6)
    with duo_attention(model, pattern, sparsity=0.5):
        single = model.generate(ids, **GEN)
    with duo_attention(model, pattern, sparsity=0.5, prefill_chunk_size=6) as handle:
        chunked = model.generate(ids, **GEN)
    assert torch.equal(chunked.sequences, single.sequences)
    atol = tolerance(family)
    torch.testing.assert_close(torch.stack(chunked.scores), torch.stack(single.scores), rtol=0, atol=atol)
    t = ids.shape[1] + GEN["max_new_tokens"]  # the cache is sized to the request
    assert chunked[cache_kwarg(model)].max_len == t
    assert chunked[cache_kwarg(model)].kv_bytes() == handle.expected_kv_bytes(t)


# ------------------------------------------------------------------------ local sliding-window layers (Gemma, Qwen)
LOCAL = [name for name, fam in FAMILIES.items() if fam.window is not None]


def record_local_calls(model, layers: list[int]) -> tuple[dict[int, list], list]:
    """Forward hooks that record (kwargs, output) of the given layers' attention modules."""
    calls: dict[int, list] = {i: [] for i in layers}

    def hook(module, args, kwargs, output, i):
        calls[i].append((args, dict(kwargs), output[0]))

    hooks = [
        model.model.layers[i].self_attn.register_forward_hook(
            lambda m, a, kw, out, i=i: hook(m, a, kw, out, i), with_kwargs=True
        )
        for i in layers
    ]
    return calls, hooks


@pytest.mark.parametrize("family", LOCAL)
def test_local_layers_are_left_as_they_were(family, ids):
    model = build(family)
    window = FAMILIES[family].window
    windows = [window if t == "sliding_attention" else None for t in model.config.layer_types]
    local = [i for i, w in enumerate(windows) if w is not None]
    calls, hooks = record_local_calls(model, local)
    model(ids, use_cache=False)
    pattern = HeadPattern.uniform(LAYERS, 2, 0.0, sink=1, recent=2)
    with duo_attention(model, pattern) as handle:
        model(ids, use_cache=False)
        out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    for hook in hooks:
        hook.remove()
    assert handle.sliding_windows == windows
    for i in local:
        (_, before, _), (args, during, output) = calls[i][:2]
        # The mask each local layer gets is the one the model's own implementation built before ...
        mask_before, mask_during = before["attention_mask"], during["attention_mask"]
        assert (mask_before is None and mask_during is None) or torch.equal(mask_before, mask_during)
        # ... and the layer computes what it computed before on the same input (DuoAttention disabled now).
        assert torch.equal(model.model.layers[i].self_attn(*args, **during)[0], output)
    cache = out[cache_kwarg(model)]
    for layer, w in zip(cache.layers, windows):
        assert isinstance(layer, DynamicSlidingWindowLayer if w else DuoLayer)
        assert w is None or layer.keys.shape[-2] == w - 1  # transformers' own window cache
    assert cache.kv_bytes() == handle.expected_kv_bytes(ids.shape[1] + 3)  # sized for prompt + max_new_tokens


def test_gemma2_soft_capping_is_exercised(ids):
    model = build("gemma2")
    capped = model(ids).logits
    model.config.attn_logit_softcapping = None
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert not torch.allclose(model(ids).logits, capped, atol=1e-2)


def test_sparsity_ranks_only_the_global_layers():
    model = build("gemma2")  # layers 0 and 2 local, 1 and 3 global
    gates = np.array([[0.0, 0.0], [0.9, 0.2], [0.0, 0.0], [0.4, 0.6]])  # local rows lowest: they must not count
    with duo_attention(model, HeadPattern(gates), sparsity=0.5) as handle:
        expected = HeadPattern(gates[[1, 3]]).binarize(sparsity=0.5)  # the global rows alone
        np.testing.assert_array_equal(handle.roles[[1, 3]], expected)
        assert handle.roles[[0, 2]].all()  # local rows: nothing evicted by DuoAttention
        assert handle.retrieval_ratio == 0.5 and expected.sum() == 2
        assert [lr is None for lr in handle.layer_roles] == [True, False, True, False]
    with duo_attention(model, HeadPattern(gates)) as handle:  # threshold 0.5, global rows only
        np.testing.assert_array_equal(handle.roles, [[1, 1], [1, 0], [1, 1], [0, 1]])


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "family, overrides",
    [
        ("mistral", {"sliding_window": 16}),  # Mistral 7B v0.1 style
        ("phi3", {"sliding_window": 16}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}),
    ],
)
def test_a_model_whose_every_layer_is_local_is_refused(family, overrides):
    model = dataclasses.replace(FAMILIES[family], overrides=overrides, window=16).build()
    name = model.config.model_type
    with pytest.raises(ValueError, match=rf"every layer of this {name} model .* sliding window of 16 tokens"):
        enable_duo_attention(model, HeadPattern.uniform(LAYERS, 2))
    assert model.config._attn_implementation == "sdpa"


def test_a_bidirectional_gemma3_is_refused():
    gemma3 = FAMILIES["gemma3"]
    model = dataclasses.replace(gemma3, overrides={**gemma3.overrides, "use_bidirectional_attention": True}).build()
    with pytest.raises(ValueError, match="bidirectionally"):
        enable_duo_attention(model, HeadPattern.uniform(LAYERS, 2))


@pytest.mark.parametrize(
    "config, model, kwargs",
    [
        ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_head=2, n_embd=16, vocab_size=50)),
        ("FalconConfig", "FalconForCausalLM", dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=16,
                                                   vocab_size=50)),
        ("MambaConfig", "MambaForCausalLM", dict(num_hidden_layers=2, hidden_size=16, state_size=4, vocab_size=50)),
    ],
)
def test_other_architectures_are_refused_with_the_supported_list(config, model, kwargs):
    net = getattr(transformers, model)(getattr(transformers, config)(**kwargs))
    with pytest.raises(ValueError) as err:
        enable_duo_attention(net, HeadPattern.uniform(2, 2))
    message = str(err.value)
    assert f"model_type {net.config.model_type!r}" in message
    assert all(f"{k} ({v})" in message for k, v in SUPPORTED_MODEL_TYPES.items())


# ------------------------------------------------------------------------------ Gemma 3 with a vision tower
def tiny_gemma3_multimodal():
    torch.manual_seed(0)
    text = transformers.Gemma3TextConfig(
        **{**FAMILIES["gemma3"].overrides, "vocab_size": 300}, hidden_size=32, intermediate_size=64,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    )
    vision = transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=297, eoi_token_index=298,
        image_token_index=299, attn_implementation="sdpa",
    )
    return transformers.Gemma3ForConditionalGeneration(config).to(torch.float64).eval()


def test_gemma3_multimodal_text_prompts_and_refused_images(ids):
    model = tiny_gemma3_multimodal()
    pattern = HeadPattern(np.random.default_rng(5).random((LAYERS, 2)), sink=2, recent=6)
    full = model.generate(ids, **GEN)
    with duo_attention(model, HeadPattern.uniform(LAYERS, 2, 1.0, sink=2, recent=4)):
        assert torch.equal(model.generate(ids, **GEN).sequences, full.sequences)
    expected = reference_logits(model, pattern, ids, sparsity=0.5)
    assert not torch.allclose(expected, model(ids).logits, atol=1e-3)
    with duo_attention(model, pattern, sparsity=0.5) as handle:
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-10)
        decoded = run_chunks(model, ids, handle.new_cache(ids.shape[1]), [9] + [1] * (ids.shape[1] - 9))
        torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-10)
        # Image tokens attend to each other bidirectionally: a mask DuoAttention layers cannot honour.
        with_image = torch.cat([ids[:, :5], torch.tensor([[297, 299, 299, 299, 299, 298]]), ids[:, 5:]], dim=1)
        with pytest.raises(ValueError, match="custom attention mask"):
            model(with_image, pixel_values=torch.randn(1, 3, 28, 28, dtype=torch.float64),
                  token_type_ids=(with_image == 299).long())
