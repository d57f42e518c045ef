"""Property-based tests of the rules everything rests on: binarisation, the learning-rate schedule and the KV
quantisation round trip, each against a statement of the documented rule written here (or in ``tests/oracle.py``).
"""

from __future__ import annotations

import math

import numpy as np
import oracle
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from duoattn import HeadPattern
from duoattn.identify.schedule import lr_factor
from duoattn.quant.kv import QuantizedKV, KVQuantConfig, dequantize, quantize, round_up, unpack_int4

FAST = settings(max_examples=60, deadline=None)

# ------------------------------------------------------------------------------------------- binarisation
# Few distinct values make ties common; values outside [0, 1] are clipped first (so 1.3 ties with 1.0).
GATE = st.sampled_from([-0.2, 0.0, 0.1, 0.5, 0.5000001, 0.9, 1.0, 1.3]) | st.floats(0, 1)


@st.composite
def gate_tables(draw):
    layers, heads = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    return draw(arrays(np.float64, (layers, heads), elements=GATE))


@FAST
@given(gate_tables(), st.floats(0, 1) | st.sampled_from([0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.875, 1.0]),
       st.data())
def test_sparsity_keeps_the_documented_number_of_heads_in_the_documented_order(gates, sparsity, data):
    layers = data.draw(st.lists(st.booleans(), min_size=len(gates), max_size=len(gates)).filter(any) | st.none())
    roles = HeadPattern(gates).binarize(sparsity=sparsity, layers=None if layers is None else np.array(layers))
    np.testing.assert_array_equal(roles, oracle.binarize(gates, sparsity=sparsity, layers=layers))
    selected = np.ones(len(gates), bool) if layers is None else np.array(layers)
    n = int(selected.sum()) * gates.shape[1]
    assert int((~roles[selected]).sum()) == math.floor(sparsity * n + 0.5)  # round half up, not to even
    assert roles[~selected].all()


@FAST
@given(gate_tables(), st.floats(-0.5, 1.5) | st.sampled_from([0.0, 0.5, 1.0]) | st.none())
def test_threshold_streams_the_heads_below_it(gates, threshold):
    np.testing.assert_array_equal(HeadPattern(gates).binarize(threshold=threshold),
                                  oracle.binarize(gates, threshold=threshold))


def test_binarize_by_hand():
    # 8 heads, sparsity 0.3125: 2.5 streaming heads round half up to 3 (round() would give 2)
    gates = np.array([[0.7, 0.2, 0.2, 0.9], [0.2, 1.4, 0.6, 0.05]])
    roles = HeadPattern(gates).binarize(sparsity=0.3125)
    # lowest: 0.05 (1, 3); then the tied 0.2 in (layer, head) order: (0, 1), (0, 2) - (1, 0) keeps its full cache
    assert roles.tolist() == [[True, False, False, True], [True, True, True, False]]
    assert HeadPattern(gates).binarize().tolist() == [[True, False, False, True], [False, True, True, False]]
    assert HeadPattern(gates).binarize(threshold=0.7).tolist() == [[True, False, False, True], [False, True, False, False]]
    with pytest.raises(ValueError, match="^give either sparsity or threshold, not both$"):
        HeadPattern(gates).binarize(sparsity=0.5, threshold=0.5)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        HeadPattern(gates).binarize(threshold=float("nan"))
    with pytest.raises(ValueError, match="^layers selects no layer: DuoAttention needs at least one layer to apply to$"):
        HeadPattern(gates).binarize(layers=np.array([False, False]))
    with pytest.raises(ValueError, match=r"layers must be a bool array of shape \(2,\)"):
        HeadPattern(gates).binarize(layers=np.array([1, 1]))


# ---------------------------------------------------------------------------------------------- schedule
def documented_factor(step: int, total: int) -> float:
    """Warm-up from 0.1 over the first fifth of the steps, 1.0, decay to 0.1 over the last fifth (module docstring),
    as a piecewise function: the ``(step + 1)``-th step of the ramp is at ``(step + 1) / (total / 5)``."""
    ramp = total / 5
    if step + 1 < ramp:
        return max(0.1, (step + 1) / ramp)
    if total - step < ramp:
        return max(0.1, (total - step) / ramp)
    return 1.0


@FAST
@given(st.integers(1, 3000), st.data())
def test_schedule_is_the_documented_ramp(total, data):
    step = data.draw(st.integers(0, total - 1))
    assert lr_factor(step, total) == pytest.approx(documented_factor(step, total), abs=1e-12)
    assert lr_factor(step, total) == pytest.approx(lr_factor(total - 1 - step, total), abs=1e-12)  # symmetric
    assert 0.1 <= lr_factor(step, total) <= 1.0


def test_schedule_refuses_steps_outside_the_run():
    for step, total, message in [(0, 0, "total_steps must be >= 1"), (3, 3, r"step must be in \[0, 3\)"),
                                 (-1, 3, r"step must be in \[0, 3\)")]:
        with pytest.raises(ValueError, match=message):
            lr_factor(step, total)
    assert lr_factor(0, 1) == lr_factor(1, 4) == 1.0  # a ramp shorter than one step: no warm-up at all


# ------------------------------------------------------------------------------------------ quantisation
PRECISION = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}


@st.composite
def vectors(draw):
    """``[T, D]`` vectors of any scale and offset in a storage dtype, with a group size dividing D."""
    dtype = draw(st.sampled_from(list(PRECISION)))
    d = draw(st.sampled_from([2, 4, 8, 16, 24]))
    group = draw(st.sampled_from([None] + [g for g in (1, 2, 4, 8) if d % g == 0]))
    tokens = draw(st.integers(1, 6))
    big = 3.0 if dtype == torch.float16 else 20.0
    scale = 10.0 ** draw(st.floats(-big, big))
    far = -10.0 if dtype == torch.float16 else -1000.0  # float16 overflows beyond 65504
    offset = draw(st.sampled_from([0.0, 1.0, far])) * (scale if draw(st.booleans()) else 1.0)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(tokens, d, generator=gen, dtype=torch.float64) * scale + offset
    if draw(st.booleans()):  # some constant groups
        x[0] = x[0, 0]
    return x.to(dtype), draw(st.sampled_from([8, 4])), group


@FAST
@given(vectors())
def test_round_trip_stays_within_half_a_step(case):
    x, bits, group = case
    cfg = KVQuantConfig(bits, group)
    q = quantize(x, cfg)
    g = cfg.group(x.shape[-1])
    xs = x.double().reshape(*x.shape[:-1], -1, g)
    lo, hi = xs.amin(-1), xs.amax(-1)
    qmax = 2**bits - 1
    p = PRECISION[x.dtype]
    s = q.scale.double()
    work_eps = 2.0**-52 if x.dtype == torch.float64 else 2.0**-23
    # the scale: not below the step (but for the work dtype's rounding of the division), at most one rounding of
    # the storage dtype above it
    assert (s * qmax >= (hi - lo) * (1 - 2 * work_eps)).all()
    tiny = torch.finfo(x.dtype).smallest_normal * 2.0 ** -(p - 1)
    assert (s <= (hi - lo) / qmax * (1 + 2.0 ** -(p - 1)) + tiny).all()
    assert torch.equal(q.zero.double(), lo)  # the zero point is the group minimum, exactly
    codes = unpack_int4(q.data) if bits == 4 else q.data
    assert int(codes.max()) <= qmax
    err = (dequantize(q).double() - x.double()).abs().reshape(xs.shape)
    bound = s[..., None] / 2 * (1 + 2.0**-10) + 4 * work_eps * torch.maximum(lo.abs(), hi.abs())[..., None]
    assert (err <= bound).all()
    assert (err[(hi == lo)] == 0).all()  # constant groups come back exactly
    assert dequantize(q, x.dtype).dtype == x.dtype and dequantize(q).dtype == torch.promote_types(x.dtype, torch.float32)


@FAST
@given(st.floats(0, 1e30, allow_subnormal=True), st.sampled_from([torch.bfloat16, torch.float16]))
def test_round_up_gives_the_nearest_value_at_or_above(value, dtype):
    """From the work dtype (float32) to a narrower storage dtype: the smallest representable value >= x."""
    x = torch.tensor([value], dtype=torch.float32)
    if x.item() > torch.finfo(dtype).max:
        return
    y = round_up(x, dtype)
    assert y.dtype == dtype and y.float().item() >= x.item()
    below = torch.nextafter(y, torch.tensor([-math.inf], dtype=dtype))
    assert below.float().item() < x.item() or y.item() == 0
    same = torch.tensor([value], dtype=torch.float32)
    assert torch.equal(round_up(same, torch.float32), same)  # no narrowing: unchanged


def test_quantized_storage_views_and_copies():
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    cfg = KVQuantConfig(4, 4)
    q = quantize(x, cfg)
    assert (q.num_tokens, q.head_dim, q.group_size, q.bits) == (5, 8, 4, 4)
    assert q.nbytes() == 2 * 5 * cfg.bytes_per_vector(8, 4) == 2 * 5 * (4 + 2 * 2 * 4)
    part = q.tokens(1, 3)
    assert part.num_tokens == 2 and torch.equal(dequantize(part), dequantize(q)[:, 1:3])
    joined = QuantizedKV.cat(q.tokens(0, 2), q.tokens(2, 5))
    assert torch.equal(dequantize(joined), dequantize(q))
    store = QuantizedKV.zeros((2,), 9, 8, cfg, torch.float64, torch.device("cpu"))
    assert (store.data.shape, store.scale.shape, store.zero.shape) == ((2, 9, 4), (2, 9, 2), (2, 9, 2))
    assert (store.data.dtype, store.scale.dtype, store.zero.dtype) == (torch.uint8, torch.float64, torch.float64)
    wide = q.map(lambda t: t.double() if t.is_floating_point() else t)
    store.write(2, wide)
    assert torch.equal(dequantize(store.tokens(2, 7)), dequantize(wide))
    meta = QuantizedKV.zeros((1,), 3, 8, cfg, torch.float64, torch.device("meta"))  # where it was asked to be
    assert {t.device.type for t in (meta.data, meta.scale, meta.zero)} == {"meta"}
    size = KVQuantConfig(8, 4).bytes_per_vector(8, 2)
    assert type(size) is int and size == 8 + 2 * 2 * 2


def test_quant_config_refuses_non_integer_group_sizes():
    for bad in (True, 2.5, "4", 0, -4):
        with pytest.raises(ValueError, match="kv group_size must be a positive integer or None"):
            KVQuantConfig(8, group_size=bad)
    assert KVQuantConfig(4, group_size=1).group(8) == 1


# ---------------------------------------------------------------------------------------- pattern files
def test_one_dimensional_gates_are_one_kv_head_per_layer():
    assert HeadPattern([0.2, 0.7, 0.1]).shape == (3, 1)
    assert HeadPattern([0.3]).shape == (1, 1)
    p = HeadPattern([[0.2, 0.7, 0.1]], sink=0, recent=1)  # the smallest window there is
    assert p.shape == (1, 3) and (p.sink, p.recent) == (0, 1)


def test_random_gates_depend_on_the_seed_only():
    a, b = HeadPattern.random(3, 4, seed=1, sink=2, recent=5), HeadPattern.random(3, 4, seed=1)
    assert a.shape == (3, 4) and (a.sink, a.recent) == (2, 5)
    np.testing.assert_array_equal(a.gates, b.gates)
    np.testing.assert_array_equal(a.gates, np.random.default_rng(1).random((3, 4)))
    assert not np.array_equal(a.gates, HeadPattern.random(3, 4, seed=2).gates)


def test_loading_reads_tabs_and_single_rows(tmp_path):
    (tmp_path / "config.json").write_text('{"sink_size": 2, "recent_size": 8}')
    (tmp_path / "full_attention_heads.tsv").write_text("0.25\t0.5\t1\n")
    assert HeadPattern.load(tmp_path).gates.tolist() == [[0.25, 0.5, 1.0]]  # one layer of three heads
    (tmp_path / "full_attention_heads.tsv").write_text("0.25 0.5\n0.1 0.2\n")
    with pytest.raises(ValueError, match="is not a tab-separated table of numbers"):
        HeadPattern.load(tmp_path)


def test_load_errors_name_the_file_and_what_is_wrong(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"^pattern directory '{missing}' does not exist$"):
        HeadPattern.load(missing)
    with pytest.raises(FileNotFoundError, match=f"^pattern directory '{tmp_path}' has no full_attention_heads.tsv$"):
        HeadPattern.load(tmp_path)
    (tmp_path / "full_attention_heads.tsv").write_text("0.5\n")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'config.json'} must hold a JSON object, got list$"):
        HeadPattern.load(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'config.json'} lacks sink_size, recent_size$"):
        HeadPattern.load(tmp_path)


def test_save_creates_parents_and_writes_the_same_bytes_for_the_same_pattern(tmp_path):
    gates = np.array([[0.1, 0.9]])
    first = HeadPattern(gates, metadata={"b": 1, "a": 2}).save(tmp_path / "x" / "y")
    second = HeadPattern(gates, metadata={"a": 2, "b": 1}).save(tmp_path / "z")
    for name in ("config.json", "full_attention_heads.tsv"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
