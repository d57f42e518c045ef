"""HeadPattern: the upstream file format, binarisation and input validation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from duoattn import HeadPattern

UPSTREAM_TSV = (
    "1.000000000000000000e+00\t8.593750000000000000e-01\n"
    "-1.373291015625000000e-03\t1.000976562500000000e+00\n"
    "2.500000000000000000e-01\t5.000000000000000000e-01\n"
)


def write_upstream(directory, tsv=UPSTREAM_TSV, config=None):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "full_attention_heads.tsv").write_text(tsv)
    config = {"sink_size": 128, "recent_size": 256, "lr": 0.02, "num_passkeys": 10} if config is None else config
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_loads_upstream_files_unchanged_and_clips(tmp_path):
    pattern = HeadPattern.load(write_upstream(tmp_path / "p"))
    assert pattern.shape == (3, 2)  # rows = layers, columns = KV heads
    assert (pattern.sink, pattern.recent) == (128, 256)
    expected = np.array([[1.0, 0.859375], [0.0, 1.0], [0.25, 0.5]])  # -0.00137 and 1.00098 clipped
    np.testing.assert_array_equal(pattern.gates, expected)
    assert pattern.metadata == {"lr": 0.02, "num_passkeys": 10}


def test_save_load_round_trip_is_exact(tmp_path):
    gates = np.random.default_rng(0).random((5, 3))
    HeadPattern(gates, sink=16, recent=64, metadata={"seed": 7}).save(tmp_path / "out")
    back = HeadPattern.load(tmp_path / "out")
    np.testing.assert_array_equal(back.gates, gates)
    assert (back.sink, back.recent, back.metadata) == (16, 64, {"seed": 7})
    # upstream readers: np.loadtxt on the TSV, json on the config
    np.testing.assert_array_equal(np.loadtxt(tmp_path / "out" / "full_attention_heads.tsv", delimiter="\t"), gates)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["sink_size"] == 16
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "full_attention_heads.tsv"]  # no temp files left


def test_single_kv_head_round_trip(tmp_path):
    HeadPattern([[0.2], [0.9]], sink=1, recent=2).save(tmp_path / "one")
    assert HeadPattern.load(tmp_path / "one").shape == (2, 1)


def test_binarize_sparsity_ranks_globally():
    gates = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    pattern = HeadPattern(gates)
    # 50% of 6 heads streaming: the three lowest gates (0.1, 0.2, 0.3) across all layers
    np.testing.assert_array_equal(pattern.binarize(sparsity=0.5), [[True, False, True], [False, True, False]])
    assert pattern.binarize(sparsity=0.0).all()
    assert not pattern.binarize(sparsity=1.0).any()
    assert pattern.binarize(sparsity=1 / 6).sum() == 5


def test_binarize_threshold_and_default():
    pattern = HeadPattern([[0.49, 0.5], [0.51, 0.0]])
    np.testing.assert_array_equal(pattern.binarize(), [[False, True], [True, False]])  # t = 0.5, gate >= t
    np.testing.assert_array_equal(pattern.binarize(threshold=0.505), [[False, False], [True, False]])
    with pytest.raises(ValueError, match="either sparsity or threshold"):
        pattern.binarize(sparsity=0.5, threshold=0.5)


def test_ties_are_broken_deterministically_in_layer_head_order():
    pattern = HeadPattern(np.ones((4, 2)))
    first = pattern.binarize(sparsity=0.25)
    # the first two heads in (layer, head) order become streaming, every time
    np.testing.assert_array_equal(first.reshape(-1), [False, False, True, True, True, True, True, True])
    for _ in range(5):
        np.testing.assert_array_equal(HeadPattern(np.ones((4, 2))).binarize(sparsity=0.25), first)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gates_are_refused(bad):
    with pytest.raises(ValueError, match="layer 1, KV head 0"):
        HeadPattern([[0.5, 0.5], [bad, 0.5]])


@pytest.mark.parametrize("sparsity", [-0.1, 1.5, float("nan")])
def test_sparsity_out_of_range_is_refused(sparsity):
    with pytest.raises(ValueError, match="sparsity must be in"):
        HeadPattern(np.ones((2, 2))).binarize(sparsity=sparsity)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gates": np.ones((2, 2, 2))}, "shape"),
        ({"gates": []}, "shape"),
        ({"gates": [["a", "b"]]}, "numeric"),
        ({"gates": np.ones((2, 2)), "sink": -1}, "sink"),
        ({"gates": np.ones((2, 2)), "recent": 0}, "recent"),
        ({"gates": np.ones((2, 2)), "recent": 2.5}, "recent"),
    ],
)
def test_bad_construction_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HeadPattern(**kwargs)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HeadPattern.load(tmp_path / "nowhere")
    d = write_upstream(tmp_path / "a")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        HeadPattern.load(d)
    d = write_upstream(tmp_path / "b")
    (d / "full_attention_heads.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="full_attention_heads.tsv"):
        HeadPattern.load(d)
    with pytest.raises(ValueError, match="tab-separated"):
        HeadPattern.load(write_upstream(tmp_path / "c", tsv="1.0\tx\n0.5\t0.5\n"))
    with pytest.raises(ValueError, match="tab-separated"):
        HeadPattern.load(write_upstream(tmp_path / "d", tsv="1.0\t1.0\n0.5\n"))
    d = write_upstream(tmp_path / "e")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        HeadPattern.load(d)
    with pytest.raises(ValueError, match="recent_size"):
        HeadPattern.load(write_upstream(tmp_path / "f", config={"sink_size": 4}))
    with pytest.raises(ValueError, match="finite"):
        HeadPattern.load(write_upstream(tmp_path / "g", tsv="nan\t1.0\n"))


def test_failed_save_leaves_previous_files_intact(tmp_path, monkeypatch):
    target = tmp_path / "p"
    HeadPattern(np.full((2, 2), 0.25), sink=4, recent=8).save(target)
    before = {name: (target / name).read_text() for name in os.listdir(target)}

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        HeadPattern(np.full((2, 2), 0.75), sink=4, recent=8).save(target)
    monkeypatch.undo()
    assert {name: (target / name).read_text() for name in os.listdir(target)} == before  # and no temp files


def test_binarize_over_selected_layers_only():
    gates = np.array([[0.0, 0.1], [0.9, 0.2], [0.0, 0.0], [0.4, 0.6]])
    layers = np.array([False, True, False, True])
    roles = HeadPattern(gates).binarize(sparsity=0.5, layers=layers)
    # two of the four heads of layers 1 and 3 stream (gates 0.2 and 0.4); rows 0 and 2 are ignored and all True
    np.testing.assert_array_equal(roles, [[True, True], [True, False], [True, True], [False, True]])
    np.testing.assert_array_equal(HeadPattern(gates).binarize(layers=layers), [[1, 1], [1, 0], [1, 1], [0, 1]])
    with pytest.raises(ValueError, match=r"bool array of shape \(4,\)"):
        HeadPattern(gates).binarize(layers=[True, False])
    with pytest.raises(ValueError, match="bool array"):
        HeadPattern(gates).binarize(layers=[1, 0, 1, 0])
    with pytest.raises(ValueError, match="selects no layer"):
        HeadPattern(gates).binarize(layers=np.zeros(4, dtype=bool))
