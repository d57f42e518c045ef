"""Batched decode over several caches (``duoattn.batch``): rows of different lengths in one step.

Kernel level: B members of different sizes and lengths (shorter than sink + recent, wrapped in the ring, spanning
several splits; one member of batch 2) decoded in one batched step equal B separate batch-1 steps and the dense
float64 oracle, for the torch path and the Triton kernels (under the interpreter on the CPU), dense and int8 / int4.
Model level: a batch view over requests' caches follows the oracle on the unpatched model while a sequence leaves
and another joins; ``Scheduler.decode`` runs one forward for all decoding requests.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os

import numpy as np
import pytest
import torch
from conftest import reference_logits
from transformers import LlamaConfig, LlamaForCausalLM

from duoattn import HeadPattern, duo_attention
from duoattn.batch import BatchCache
from duoattn.kernels import dispatch
from duoattn.kernels.dispatch import KernelChoice
from duoattn.kernels.reference import reference_attention
from duoattn.kernels.rows import DecodeRows, Member, length_stride
from duoattn.layout import ring_slot
from duoattn.quant.kv import KVQuantConfig, QuantizedKV, dequantize, quantize

HAVE_TRITON = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SINK, RECENT = 4, 8
KERNELS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAVE_TRITON, reason="needs triton"))]


if HAVE_TRITON:
    from test_triton_kernels import interpreter_on_numpy2  # noqa: F401 - the same interpreter fix-up (autouse)


def _member(keys, values, max_len, n_ret, bits):
    """A cache's storage holding ``keys, values [b, Hkv, L, D]`` at positions 0..L-1, as the cache lays it out."""
    b, hkv, length, d = keys.shape
    cfg = None if bits == 16 else KVQuantConfig(bits)
    if cfg is None:
        fk = torch.zeros(b, n_ret, max_len, d, device=DEVICE)
        fv = torch.zeros_like(fk)
        fk[:, :, :length], fv[:, :, :length] = keys[:, :n_ret], values[:, :n_ret]
    else:
        fk = QuantizedKV.zeros((b, n_ret), max_len, d, cfg, torch.float32, torch.device(DEVICE))
        fv = QuantizedKV.zeros((b, n_ret), max_len, d, cfg, torch.float32, torch.device(DEVICE))
        fk.write(0, quantize(keys[:, :n_ret], cfg))
        fv.write(0, quantize(values[:, :n_ret], cfg))
    ring = min(SINK + RECENT, max_len)
    rk = torch.zeros(b, hkv - n_ret, ring, d, device=DEVICE)
    rv = torch.zeros_like(rk)
    for p in range(length):  # later positions overwrite earlier ones: what the ring keeps
        rk[:, :, ring_slot(p, SINK, RECENT)] = keys[:, n_ret:, p]
        rv[:, :, ring_slot(p, SINK, RECENT)] = values[:, n_ret:, p]
    return Member(fk, fv, rk, rv)


def _clone(m: Member) -> Member:
    def c(x):
        return x.map(torch.clone) if isinstance(x, QuantizedKV) else x.clone()
    return Member(c(m.full_k), c(m.full_v), c(m.ring_k), c(m.ring_v))


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("kernel", KERNELS)
def test_batched_step_equals_separate_steps_and_the_oracle(kernel, bits):
    gen = torch.Generator().manual_seed(bits)
    n_ret, n_str, group, d, splits = 1, 2, 2, 32, 4
    hkv, hq = n_ret + n_str, (n_ret + n_str) * group
    # (batch, stored tokens before the step, max_len): shorter than the window, a ring smaller than the window,
    # exactly full, wrapped, and spanning all splits (ceil(97 / 4) = 25 tokens per split, blocks of 16)
    shapes = [(1, 3, 40), (1, 5, 7), (2, 11, 30), (1, 39, 64), (1, 96, 100)]
    kernels = KernelChoice(kernel, "blocks")
    history = [(torch.randn(b, hkv, n + 1, d, generator=gen).to(DEVICE),
                torch.randn(b, hkv, n + 1, d, generator=gen).to(DEVICE)) for b, n, _ in shapes]
    members = [_member(k[:, :, :n], v[:, :, :n], t, n_ret, bits) for (k, v), (_, n, t) in zip(history, shapes)]
    alone = [_clone(m) for m in members]
    q = torch.randn(sum(b for b, _, _ in shapes), hq, 1, d, generator=gen).to(DEVICE)
    k_new = torch.cat([k[:, :, -1:] for k, _ in history])
    v_new = torch.cat([v[:, :, -1:] for _, v in history])
    lengths_host = [n + 1 for _, n, _ in shapes]

    def run(rows, lengths, host, q, k, v):
        ws = dispatch.Workspace()
        ws.reserve_decode(rows.batch, n_ret * group, splits, hq, d, torch.float32, torch.device(DEVICE))
        dispatch.append_rows(kernels, k, v, rows, lengths, SINK, RECENT)
        return dispatch.decode_rows(kernels, q, rows, lengths, lambda: host, ws, d**-0.5, splits).clone()

    triton = kernel == "triton"
    rows = DecodeRows(members, tables=triton)
    lengths = torch.tensor([n + 1 for b, n, _ in shapes for _ in range(b)], device=DEVICE)
    got = run(rows, lengths, lengths_host, q, k_new, v_new)
    assert got.shape == (q.shape[0], 1, hq, d)
    row = 0
    for (b, n, _), m, (keys, values) in zip(shapes, alone, history):
        sl = slice(row, row + b)
        row += b
        one = run(DecodeRows([m], tables=triton), torch.tensor(n + 1, device=DEVICE), [n + 1], q[sl], k_new[sl],
                  v_new[sl])
        torch.testing.assert_close(got[sl], one, rtol=1e-6, atol=1e-6)  # the same step, alone
        # the oracle: dense attention over every position, the streaming rule applied by position; retrieval keys
        # as stored (dequantised when quantised), the new token included
        fk = dequantize(m.full_k) if bits < 16 else m.full_k
        fv = dequantize(m.full_v) if bits < 16 else m.full_v
        k_all = torch.cat([fk[:, :, : n + 1].cpu(), keys[:, n_ret:].cpu()], dim=1)
        v_all = torch.cat([fv[:, :, : n + 1].cpu(), values[:, n_ret:].cpu()], dim=1)
        if bits == 16:
            torch.testing.assert_close(k_all, keys.cpu())  # what was appended is the new token
        retrieval = torch.tensor([True] * n_ret + [False] * n_str)
        ref = reference_attention(q[sl].cpu().double(), k_all.double(), v_all.double(), retrieval, SINK, RECENT,
                                  q_pos=torch.tensor([n]))
        torch.testing.assert_close(got[sl].cpu().double(), ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_rows_refuse_members_that_do_not_match():
    a = Member(torch.zeros(1, 1, 8, 16), torch.zeros(1, 1, 8, 16), torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16))
    b = Member(torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16), None, None)
    with pytest.raises(ValueError, match="member 1 has 2 retrieval / 0 streaming"):
        DecodeRows([a, b])
    c = Member(torch.zeros(1, 1, 8, 32)[..., ::2], torch.zeros(1, 1, 8, 16), torch.zeros(1, 1, 4, 16),
               torch.zeros(1, 1, 4, 16))
    with pytest.raises(ValueError, match="contiguous tokens"):
        DecodeRows([a, c])
    with pytest.raises(ValueError, match="one length per row"):
        length_stride(torch.zeros(3, dtype=torch.int64), 2)


# ------------------------------------------------------------------------------------------------ model level
PATTERN = HeadPattern(np.array([[1.0, 0.0], [0.2, 0.9]]), sink=3, recent=10)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, attn_implementation="sdpa")  # head_dim 32
    return LlamaForCausalLM(config).to(DEVICE).eval()


@pytest.mark.parametrize("kernel, bits", [("torch", 16), ("torch", 8), ("torch", 4),
                                          *(pytest.param("triton", b, marks=KERNELS[1].marks) for b in (16, 4))])
def test_membership_change_keeps_every_sequence_exact(model, kernel, bits):
    """Sequences A, B, C decode together; A leaves, D joins (after its own prefill); every row of every step equals
    the oracle's logits at that position (teacher-forced tokens), whatever the other rows are doing."""
    gen = torch.Generator().manual_seed(3)
    prompts = {"A": 5, "B": 30, "C": 50, "D": 17}
    steps = 6
    ids = {k: torch.randint(0, 97, (1, p + steps + 4), generator=gen).to(DEVICE) for k, p in prompts.items()}
    quant = KVQuantConfig(bits) if bits < 16 else None
    expected = {k: reference_logits(model, PATTERN, x, kv_quant=quant)[0] for k, x in ids.items()}
    done = dict.fromkeys(prompts, 0)  # decode steps taken per sequence
    with torch.no_grad(), duo_attention(model, PATTERN, kv_bits=bits, kernels=KernelChoice(decode=kernel),
                                        cuda_graphs=False) as handle:
        caches = {}
        for k, p in prompts.items():
            caches[k] = handle.new_cache(ids[k].shape[1])
            model(ids[k][:, :p], cache=caches[k], use_cache=True)

        def rounds(names, n):
            view = BatchCache([caches[k] for k in names])
            # masks span the capacity: each cache its own, the view its longest member's, on every layer
            sizes = [ids[k].shape[1] for k in names]
            for layer in range(2):
                assert [caches[k].get_mask_sizes(1, layer) for k in names] == [(n_, 0) for n_ in sizes]
                assert view.get_mask_sizes(1, layer) == (max(sizes), 0)
                assert view.get_max_length(layer) == view.layers[layer].get_max_cache_shape() == max(sizes)
            for _ in range(n):
                tokens = [int(ids[k][0, prompts[k] + done[k]]) for k in names]
                out = model(**view.step_inputs(tokens), cache=view, use_cache=True).logits[:, -1]
                for b, k in enumerate(names):
                    want = expected[k][prompts[k] + done[k]]
                    torch.testing.assert_close(out[b], want, rtol=1e-4, atol=1e-4, msg=f"{k} step {done[k]}")
                    done[k] += 1
            view.release()

        rounds(["A", "B", "C"], 3)
        rounds(["B", "C", "D"], 3)  # A left, D joined
        rounds(["D", "A"], 1)  # A comes back after sitting out rounds, in another row
        assert caches["A"].length() == prompts["A"] + 4 and int(caches["A"].state.clock) == prompts["A"] + 4


@pytest.mark.parametrize("kernel, bits", [("torch", 16), ("torch", 4),
                                          *(pytest.param("triton", b, marks=KERNELS[1].marks) for b in (16, 4))])
def test_static_views_rebound_in_place_keep_every_sequence_exact(model, kernel, bits):
    """The server's batched step on the GPU (``BatchGraphs``, here without capturing): one static view per bucket
    of rows, rebound in place as sequences join and leave, padding rows filling the bucket. Every member row of every
    step equals the oracle; the tensors a captured graph reads never move; padding never touches a member."""
    from duoattn.deploy import cache_kwarg
    from duoattn.graphs import BatchGraphs, bucket_rows

    gen = torch.Generator().manual_seed(6)
    prompts = {"A": 5, "B": 30, "C": 50, "D": 17}
    ids = {k: torch.randint(0, 97, (1, p + 12), generator=gen).to(DEVICE) for k, p in prompts.items()}
    quant = KVQuantConfig(bits) if bits < 16 else None
    expected = {k: reference_logits(model, PATTERN, x, kv_quant=quant)[0] for k, x in ids.items()}
    done = dict.fromkeys(prompts, 0)
    assert [bucket_rows(n) for n in (1, 2, 3, 4, 5, 9)] == [2, 2, 4, 4, 8, 16]
    with torch.no_grad(), duo_attention(model, PATTERN, kv_bits=bits, kernels=KernelChoice(decode=kernel),
                                        cuda_graphs=False) as handle:
        caches = {}
        for k, p in prompts.items():
            caches[k] = handle.new_cache(ids[k].shape[1])
            model(ids[k][:, :p], cache=caches[k], use_cache=True)
        graphs = BatchGraphs(model, cache_kwarg(model), handle.new_cache, max_len=128, capture=False)
        fixed = {}

        def rounds(names, n, rows):
            for _ in range(n):
                tokens = [int(ids[k][0, prompts[k] + done[k]]) for k in names]
                out = graphs.step([caches[k] for k in names], tokens)
                view = graphs.bound
                assert view.state.batch == rows and out.shape == (len(names), 97)
                tensors = [view.state.lengths, view.state.ids, view.state.positions]
                if kernel == "triton":
                    tensors += [t for layer in view.layers for t in layer.rows.tables() if t is not None]
                ptrs = [t.data_ptr() for t in tensors]
                assert fixed.setdefault(rows, ptrs) == ptrs  # what a captured graph reads stays in place
                for b, k in enumerate(names):
                    torch.testing.assert_close(out[b], expected[k][prompts[k] + done[k]], rtol=1e-4, atol=1e-4,
                                               msg=f"{k} step {done[k]}")
                    done[k] += 1

        rounds(["A", "B", "C"], 3, 4)
        rounds(["B", "C", "D"], 2, 4)  # A left, D joined: the same view, rebound
        rounds(["D", "A"], 2, 2)
        rounds(["C"], 1, 2)  # one member and a padding row
        rounds(["A", "B", "C", "D"], 2, 4)
        graphs.unbind()
        assert len(graphs.views) == 2
        for view in graphs.views.values():
            assert view.state.used == 0 and view.caches == []  # the views hold no member once unbound
        for k in prompts:  # every member's own clock followed its host count
            assert caches[k].length() == prompts[k] + done[k] == int(caches[k].state.clock)
        pad = graphs._pad
        assert pad.length() == 1 and int(pad.state.clock) == 1


def test_static_view_refuses_what_does_not_fit(model):
    with torch.no_grad(), duo_attention(model, PATTERN, cuda_graphs=False) as handle:
        pad = handle.new_cache(1, batch_size=1)
        with pytest.raises(ValueError, match="batch-1 cache holding one token"):
            BatchCache.static(pad, 2, 64)
        pad.set_length(1)
        view = BatchCache.static(pad, 2, 64)
        caches = []
        for n in (3, 4, 5):
            c = handle.new_cache(20)
            model(torch.zeros(1, n, dtype=torch.long, device=DEVICE), cache=c, use_cache=True)
            caches.append(c)
        with pytest.raises(ValueError, match="caches hold 3 rows, the view 2"):
            view.bind(caches)
        long = handle.new_cache(65)
        model(torch.zeros(1, 2, dtype=torch.long, device=DEVICE), cache=long, use_cache=True)
        with pytest.raises(ValueError, match="sized for 65 tokens does not fit a view made for 64"):
            view.bind([long])
        with pytest.raises(ValueError, match="only a view made by BatchCache.static"):
            BatchCache(caches).bind(caches[:1])
        view.bind(caches[:2])
        with pytest.raises(ValueError, match="one token per member row \\(2\\)"):
            view.step_inputs([1])


def test_batch_view_refuses_what_it_cannot_gather(model):
    with torch.no_grad(), duo_attention(model, PATTERN, cuda_graphs=False) as handle:
        fresh = handle.new_cache(10)
        with pytest.raises(ValueError, match="not allocated yet"):
            BatchCache([fresh])
        prompting = handle.new_cache(20)
        prompting.begin_prompt(10)
        model(torch.zeros(1, 4, dtype=torch.long, device=DEVICE), cache=prompting, use_cache=True)
        with pytest.raises(ValueError, match="still prefilling"):
            BatchCache([prompting])
        full = handle.new_cache(3)
        model(torch.zeros(1, 3, dtype=torch.long, device=DEVICE), cache=full, use_cache=True)
        view = BatchCache([full])
        with pytest.raises(ValueError, match="sized for 3 tokens"):
            model(**view.step_inputs([1]), cache=view, use_cache=True)
        with pytest.raises(ValueError, match="one token per member row"):
            view.step_inputs([1, 2])


def _prefilled_requests(sched, model, full, loop, extra: int, max_tokens: int) -> tuple[list, list]:
    """Requests whose prompts (each row of ``full`` but its last ``extra`` tokens) are prefilled on their own caches
    and whose first generated token is the next token of the row; ``shapes``: the input shapes of every decode
    forward the scheduler makes from now on."""
    from duoattn.serve.sampling import SamplingParams
    from duoattn.serve.scheduler import Sequence

    shapes = []
    forward = sched.decode_forward

    def spy(**kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(**kwargs)

    sched.decode_forward = spy
    seqs = []
    for x in full:
        n = x.shape[1] - extra
        seq = Sequence(x[0, :n].tolist(), SamplingParams(max_tokens=max_tokens, temperature=0.0), 0, loop,
                       lambda _: None)
        seq.cache = sched.new_cache(n + max_tokens, batch_size=1)
        model(x[:, :n], cache=seq.cache, use_cache=True)
        seq.prefilled, seq.generated = n, [int(x[0, n])]
        seqs.append(seq)
    return seqs, shapes


def test_scheduler_decodes_all_requests_in_one_forward(model):
    from duoattn.serve.metrics import ServerMetrics
    from duoattn.serve.scheduler import Scheduler

    gen = torch.Generator().manual_seed(4)
    full = [torch.randint(0, 97, (1, n + 2), generator=gen).to(DEVICE) for n in (4, 21, 40)]
    expected = [reference_logits(model, PATTERN, x)[0] for x in full]
    loop = asyncio.new_event_loop()
    try:
        with torch.no_grad(), duo_attention(model, PATTERN, cuda_graphs=False) as handle:
            sched = Scheduler(model, handle, set(), 64, ServerMetrics(), cuda_graphs=False)
            assert sched.batched
            seqs, shapes = _prefilled_requests(sched, model, full, loop, extra=2, max_tokens=4)
            logits = sched.decode(seqs)
            assert shapes == [(3, 1)]  # one forward for the three of them
            for seq, want, got in zip(seqs, expected, logits):
                torch.testing.assert_close(got, want[len(seq.prompt)].float(), rtol=1e-4, atol=1e-4)
            sched._finish(seqs[0], None)  # a request leaves: the view holding its storage goes with it
            assert sched._batch is None and seqs[0].cache is None
            for seq, x in zip(seqs[1:], full[1:]):
                seq.generated.append(int(x[0, len(seq.prompt) + 1]))
            logits = sched.decode(seqs[1:])
            assert shapes == [(3, 1), (2, 1)]
            for seq, want, got in zip(seqs[1:], expected[1:], logits):
                torch.testing.assert_close(got, want[len(seq.prompt) + 1].float(), rtol=1e-4, atol=1e-4)
    finally:
        loop.close()


def test_scheduler_batched_step_through_static_views(model):
    """The scheduler's GPU path (batched steps through ``BatchGraphs``; here without capturing): every decoding
    request's logits equal the oracle's, and a request that leaves is let go by the view at once."""
    from duoattn.graphs import BatchGraphs
    from duoattn.serve.metrics import ServerMetrics
    from duoattn.serve.scheduler import Scheduler

    gen = torch.Generator().manual_seed(7)
    full = [torch.randint(0, 97, (1, n + 3), generator=gen).to(DEVICE) for n in (9, 33, 50)]
    expected = [reference_logits(model, PATTERN, x)[0] for x in full]
    loop = asyncio.new_event_loop()
    try:
        with torch.no_grad(), duo_attention(model, PATTERN, cuda_graphs=False) as handle:
            sched = Scheduler(model, handle, set(), 64, ServerMetrics(), cuda_graphs=False)
            assert sched.batch_graphs is None  # no CUDA: the eager view
            sched.batch_graphs = BatchGraphs(model, sched.cache_name, handle.new_cache, 128, capture=False)
            sched.warm_up(5)  # what a GPU server does before it opens its port: every bucket up to 5 rows
            assert sorted(sched.batch_graphs.views) == [2, 4, 8]
            assert all(v.state.used == 0 for v in sched.batch_graphs.views.values())
            seqs, shapes = _prefilled_requests(sched, model, full, loop, extra=3, max_tokens=6)

            def step(live):
                logits = sched.decode(live)
                for seq, got in zip(live, logits):
                    x = full[seqs.index(seq)]
                    pos = len(seq.prompt) + len(seq.generated) - 1
                    torch.testing.assert_close(got, expected[seqs.index(seq)][pos].float(), rtol=1e-4, atol=1e-4)
                    seq.generated.append(int(x[0, pos + 1]))

            step(seqs)
            assert shapes == [] and sched.batch_graphs.bound.state.batch == 4  # not the eager forward
            gone = seqs[1].cache
            sched._finish(seqs[1], None)
            assert sched.batch_graphs.bound is None
            assert all(gone not in view.caches for view in sched.batch_graphs.views.values())
            step([seqs[0], seqs[2]])
            assert sched.batch_graphs.bound.state.batch == 2
            for seq in (seqs[0], seqs[2]):
                assert seq.cache.length() == len(seq.prompt) + len(seq.generated) - 1
    finally:
        loop.close()


def test_scheduler_switches_between_batched_and_per_request_steps(model):
    """Up to ``sequential_max`` decoding requests take one batch-1 step each (on a GPU: each replays its cache's
    CUDA graph); more take one batched step. Switching either way keeps every request's clock right."""
    from duoattn.serve.metrics import ServerMetrics
    from duoattn.serve.scheduler import Scheduler

    gen = torch.Generator().manual_seed(5)
    full = [torch.randint(0, 97, (1, n + 4), generator=gen).to(DEVICE) for n in (6, 30, 45)]
    expected = [reference_logits(model, PATTERN, x)[0] for x in full]
    loop = asyncio.new_event_loop()
    try:
        with torch.no_grad(), duo_attention(model, PATTERN, cuda_graphs=False) as handle:
            sched = Scheduler(model, handle, set(), 64, ServerMetrics(), cuda_graphs=False)
            assert sched.sequential_max == 0  # no graphs to replay: always batched
            seqs, shapes = _prefilled_requests(sched, model, full, loop, extra=4, max_tokens=8)

            def step(expect_shapes):
                shapes.clear()
                logits = sched.decode(seqs)
                assert shapes == expect_shapes
                for seq, x, want, got in zip(seqs, full, expected, logits):
                    pos = len(seq.prompt) + len(seq.generated) - 1
                    torch.testing.assert_close(got, want[pos].float(), rtol=1e-4, atol=1e-4)
                    seq.generated.append(int(x[0, pos + 1]))

            step([(3, 1)])
            sched.sequential_max = 3
            step([(1, 1)] * 3)
            assert sched._batch is None
            sched.sequential_max = 0
            step([(3, 1)])
    finally:
        loop.close()
