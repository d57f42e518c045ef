"""The Triton decode kernels against a dense float64 reference.

Without a GPU they run in Triton's interpreter (``TRITON_INTERPRET=1``); without the ``triton`` package the module
is skipped (it is an optional dependency: CUDA machines have it with PyTorch).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("the triton package is not installed", allow_module_level=True)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without a GPU these tests need TRITON_INTERPRET=1 (tests/conftest.py sets it)",
                allow_module_level=True)

from conftest import reference_logits, run_chunks  # noqa: E402

from duoattn import HeadPattern, duo_attention  # noqa: E402
from duoattn.kernels import decode_triton  # noqa: E402
from duoattn.kernels.dispatch import KernelChoice  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def interpreter_on_numpy2(monkeypatch):
    """Triton 3.6's interpreter turns one-element loop bounds into ints with ``int(array)``, which NumPy 2 refuses
    for 1-d arrays; index the element instead."""
    if DEVICE == "cuda":
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)


def reference_decode(q, fk, fv, rk, rv, length, cap):
    """float64: query head h*G+g attends to the first `length` keys of retrieval head h, or to the ring's first
    min(length, cap) slots of streaming head h - n_ret."""
    b, hq, _, d = q.shape
    n_ret = 0 if fk is None else fk.shape[1]
    n_str = 0 if rk is None else rk.shape[1]
    group = hq // (n_ret + n_str)
    out = torch.empty(b, 1, hq, d, dtype=torch.float64)
    for h in range(n_ret + n_str):
        k, v = (fk[:, h, :length], fv[:, h, :length]) if h < n_ret else (rk[:, h - n_ret, :min(length, cap)],
                                                                       rv[:, h - n_ret, :min(length, cap)])
        for g in range(group):
            qh = q[:, h * group + g, 0].double()
            w = torch.softmax(torch.einsum("bd,btd->bt", qh, k.double()) * d**-0.5, dim=-1)
            out[:, 0, h * group + g] = torch.einsum("bt,btd->bd", w, v.double())
    return out


BF16 = pytest.param(torch.bfloat16, 2e-2, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="Triton 3.6's interpreter multiplies bfloat16 tiles wrongly in tl.dot (checked by hand)"))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), BF16])
@pytest.mark.parametrize("n_ret, n_str, group, splits", [(2, 1, 3, 4), (1, 0, 4, 8), (0, 2, 2, 1), (3, 3, 1, 2)])
def test_decode_attention_matches_reference(dtype, tol, n_ret, n_str, group, splits):
    g = torch.Generator().manual_seed(n_ret * 10 + n_str)
    b, d, max_len, sink, recent = 2, 16, 150, 4, 9
    cap = sink + recent

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    fk, fv = (rand(b, n_ret, max_len, d), rand(b, n_ret, max_len, d)) if n_ret else (None, None)
    rk, rv = (rand(b, n_str, cap, d), rand(b, n_str, cap, d)) if n_str else (None, None)
    po = torch.empty(b, max(1, n_ret * group), splits, d, dtype=torch.float32, device=DEVICE)
    pl = torch.empty(b, max(1, n_ret * group), splits, dtype=torch.float32, device=DEVICE)
    for length in (1, 12, 13, 64, 65, 149):
        q = rand(b, (n_ret + n_str) * group, 1, d)
        out = torch.full((b, 1, q.shape[1], d), float("nan"), dtype=dtype, device=DEVICE)  # poisoned
        clock = torch.tensor(length, device=DEVICE)
        decode_triton.decode_attention(q, fk, fv, rk, rv, clock, out, po, pl, d**-0.5, splits, block=16)
        ref = reference_decode(q.cpu(), *(None if t is None else t.cpu() for t in (fk, fv, rk, rv)), length, cap)
        assert not out.isnan().any(), "an output element was never written"
        err = (out.cpu().double() - ref).norm() / ref.norm()
        assert err < tol, f"length {length}: relative error {err:.2e}"


def test_append_token_writes_the_full_cache_and_the_ring_slot():
    b, hkv, n_ret, d, sink, recent, max_len = 2, 3, 1, 16, 4, 6, 40
    fk, fv = torch.zeros(b, n_ret, max_len, d, device=DEVICE), torch.zeros(b, n_ret, max_len, d, device=DEVICE)
    rk, rv = torch.zeros(b, hkv - n_ret, sink + recent, d, device=DEVICE), torch.zeros(b, hkv - n_ret, sink + recent,
                                                                                     d, device=DEVICE)
    for pos in range(max_len):
        k, v = torch.randn(b, hkv, 1, d, device=DEVICE), torch.randn(b, hkv, 1, d, device=DEVICE)
        decode_triton.append_token(k, v, fk, fv, rk, rv, torch.tensor(pos + 1, device=DEVICE), sink, recent)
        slot = pos if pos < sink else sink + (pos - sink) % recent
        assert torch.equal(fk[:, :, pos], k[:, :n_ret, 0]) and torch.equal(fv[:, :, pos], v[:, :n_ret, 0])
        assert torch.equal(rk[:, :, slot], k[:, n_ret:, 0]) and torch.equal(rv[:, :, slot], v[:, n_ret:, 0])


def test_deployment_with_triton_kernels_matches_the_dense_reference():
    """The decode steps of the deployment path on the Triton kernels (append + split-KV decode), after a chunked
    prefill, against the dense oracle on the unpatched model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")  # head_dim 16
    model = LlamaForCausalLM(config).to(DEVICE).eval()
    ids = torch.randint(0, 97, (1, 105), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    pattern = HeadPattern(np.array([[1.0, 0.0], [0.0, 0.0], [0.2, 0.9]]), sink=3, recent=20)
    expected = reference_logits(model, pattern, ids)
    with torch.no_grad(), duo_attention(model, pattern, kernels=KernelChoice(decode="triton"), cuda_graphs=False) as h:
        cache = h.new_cache(112)
        got = run_chunks(model, ids, cache, [45, 45] + [1] * 15)
        assert cache.describe()["decode_kernel"] == "triton" and cache.graph_safe
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
