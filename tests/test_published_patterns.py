"""Patterns in the exact format published with the original implementation, and the index of shipped patterns (duoattn/patterns/)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import FAMILIES

from duoattn import HeadPattern, duo_attention, enable_duo_attention
from duoattn.shipped import PATTERNS_DIR

# Upstream's config.json is its whole argparse namespace, 45 settings. This stand-in has the settings and values of
# its training script plus placeholders for its evaluation flags; readers use only sink_size and recent_size.
UPSTREAM_CONFIG = {
    "model_name": "models/Llama-3-8B-Instruct-Gradient-1048k", "dataset_name": "datasets/booksum.jsonl.zst",
    "exp_name": "default", "output_dir": "attn_patterns/Llama-3-8B-Instruct-Gradient-1048k", "seed": 42,
    "lr": 0.02, "num_steps": 2000, "batch_size": 1, "gradient_accumulation_steps": 1, "save_steps": 50,
    "max_length": 32000, "context_length_min": 1000, "context_length_max": 32000,
    "context_lengths_num_intervals": 50, "depth_ratio_num_intervals": 1000, "min_needle_depth_ratio": 0.05,
    "max_needle_depth_ratio": 0.95, "num_passkeys": 10, "sink_size": 128, "recent_size": 256,
    "reg_weight": 0.05, "initial_value": 1.0, "streaming_attn_implementation": "blocksparse",
    "supervision": "distill", "disable_wandb": True, "wandb_project": None, "rope_theta": None,
    "flash_attn": True, "enable_ulysses_attention": True, "enable_pp": False, "enable_tp": False,
    "attn_load_dir": None, "sparsity": None, "threshold": None, "deploy_sink_size": None,
    "deploy_recent_size": None, "prefilling_chunk_size": 32000, "decoding_simulation_length": 50,
    "max_new_tokens": 50, "num_samples": None, "task": "default", "config_name": None, "dtype": "bfloat16",
    "resume": False, "local_rank": 0,
}


def write_published(directory: Path, gates: np.ndarray) -> Path:
    """A pattern directory as upstream writes it: np.savetxt defaults (``%.18e``, tabs) and a dumped namespace."""
    directory.mkdir(parents=True)
    np.savetxt(directory / "full_attention_heads.tsv", gates, delimiter="\t")
    (directory / "config.json").write_text(json.dumps(UPSTREAM_CONFIG, indent=4))
    return directory


def published_gates(layers: int, kv_heads: int, seed: int = 0) -> np.ndarray:
    """bf16-like gates in [0, 1] with upstream's unclamped strays: one slightly negative, one slightly above 1."""
    gates = np.round(np.random.default_rng(seed).random((layers, kv_heads)) * 256) / 256
    gates[0, 0], gates[-1, -1] = -0.001373291015625, 1.0009765625
    return gates


def test_the_fixture_is_in_the_published_format(tmp_path):
    d = write_published(tmp_path / "p", published_gates(32, 8))
    assert len(json.loads((d / "config.json").read_text())) == 45
    first = (d / "full_attention_heads.tsv").read_text().splitlines()[0].split("\t")
    assert len(first) == 8 and first[0] == "-1.373291015625000000e-03"
    assert all(re.fullmatch(r"-?\d\.\d{18}e[+-]\d\d", value) for value in first)


@pytest.mark.parametrize("layers, kv_heads", [(32, 8), (32, 32)])  # Llama-3-8B (GQA), Llama-2-7B (MHA)
def test_published_files_load_rows_as_layers_and_columns_as_kv_heads(tmp_path, layers, kv_heads):
    gates = published_gates(layers, kv_heads)
    pattern = HeadPattern.load(write_published(tmp_path / "p", gates))
    assert pattern.shape == (layers, kv_heads)
    assert (pattern.sink, pattern.recent) == (128, 256)
    np.testing.assert_array_equal(pattern.gates, np.clip(gates, 0, 1))
    assert pattern.gates[0, 0] == 0.0 and pattern.gates[-1, -1] == 1.0
    assert pattern.metadata["lr"] == 0.02 and len(pattern.metadata) == 43


def test_a_published_pattern_deploys_on_a_model_of_its_shape(tmp_path):
    gates = published_gates(4, 2, seed=1)
    pattern = HeadPattern.load(write_published(tmp_path / "p", gates))
    model = FAMILIES["llama"].build(num_layers=4, kv_heads=2)
    with duo_attention(model, pattern, recent=8) as handle:
        np.testing.assert_array_equal(handle.roles, np.clip(gates, 0, 1) >= 0.5)
        assert (handle.sink, handle.recent) == (128, 8)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_published_pattern_of_another_shape_is_refused_naming_both(tmp_path, family):
    pattern = HeadPattern.load(write_published(tmp_path / "p", published_gates(32, 8)))
    model = FAMILIES[family].build(num_layers=4, kv_heads=2)
    with pytest.raises(ValueError, match=r"pattern shape \(32, 8\).*model's \(4, 2\)"):
        enable_duo_attention(model, pattern)
    assert model.config._attn_implementation == FAMILIES[family].attn  # nothing left behind


def test_every_shipped_pattern_is_indexed_and_loads():
    index = (PATTERNS_DIR / "README.md").read_text(encoding="utf-8")
    shipped = sorted(p for p in PATTERNS_DIR.iterdir() if p.is_dir())
    for directory in shipped:
        assert f"`{directory.name}`" in index, f"duoattn/patterns/README.md does not list {directory.name}"
        pattern = HeadPattern.load(directory)
        assert pattern.num_layers > 0 and 0 <= pattern.gates.min() <= pattern.gates.max() <= 1
