"""Patterns by name (duoattn.hub): shipped, published upstream, local directories and Hub repos; all offline.

Published patterns are served by an HTTP server on 127.0.0.1 made by the test; Hub repos come from a fabricated
``HF_HUB_CACHE`` in offline mode. Nothing here reaches the network.
"""

from __future__ import annotations

import http.server
import shlex
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import constants
from test_published_patterns import published_gates, write_published

from duoattn import HeadPattern, cli, hub
from duoattn.shipped import PATTERNS_DIR


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Hub cache and assets cache in tmp_path, offline mode on."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(tmp_path / "assets"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


@pytest.fixture
def upstream_server(monkeypatch, tmp_path):
    """A local stand-in for raw.githubusercontent.com: serves ``tmp_path/www/<revision>/attn_patterns/...``."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    monkeypatch.setattr(hub, "UPSTREAM_URL", f"http://127.0.0.1:{port}/{{revision}}/attn_patterns/{{path}}/{{file}}")
    monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(tmp_path / "assets"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield root, requests
    server.shutdown()
    server.server_close()


def publish(root: Path, name: str, gates: np.ndarray, revision: str | None = None) -> Path:
    entry = hub.upstream_pattern(name)
    return write_published(root / (revision or entry.revision) / "attn_patterns" / entry.path, gates)


# ------------------------------------------------------------------------------------------- shipped / local
def test_a_shipped_name_loads_the_package_data_file():
    pattern = HeadPattern.from_pretrained("SmolLM2-135M-Instruct")
    tsv = PATTERNS_DIR / "SmolLM2-135M-Instruct" / "full_attention_heads.tsv"
    np.testing.assert_array_equal(pattern.gates, np.loadtxt(tsv, delimiter="\t"))
    assert pattern.shape == (30, 3) and (pattern.sink, pattern.recent) == (64, 256)
    assert PATTERNS_DIR.parent.name == "duoattn"  # inside the package, so a wheel carries it


def test_a_local_directory_in_the_upstream_format_loads(tmp_path):
    gates = published_gates(4, 2)
    directory = write_published(tmp_path / "mine", gates)
    np.testing.assert_array_equal(HeadPattern.from_pretrained(directory).gates, np.clip(gates, 0, 1))
    np.testing.assert_array_equal(HeadPattern.from_pretrained(str(directory)).gates, np.clip(gates, 0, 1))
    with pytest.raises(ValueError, match="revision='v1' applies to published and Hub patterns"):
        HeadPattern.from_pretrained(directory, revision="v1")


def test_a_directory_without_the_pattern_files_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks full_attention_heads.tsv or config.json"):
        HeadPattern.from_pretrained(tmp_path)


def test_an_unknown_name_lists_every_known_name(offline):
    with pytest.raises(FileNotFoundError) as err:
        HeadPattern.from_pretrained("Llama-9-1T")
    message = str(err.value)
    for name in ["SmolLM2-135M-Instruct", "Llama-2-7B-32K-Instruct", "Llama-3-8B-Instruct-Gradient-1048k",
                 "Llama-3.1-8B-Instruct", "Mistral-7B-Instruct-v0.2", "Mistral-7B-Instruct-v0.3"]:
        assert name in message


# ------------------------------------------------------------------------------------------------ upstream
def test_a_published_name_is_downloaded_once_then_read_from_the_cache(upstream_server, tmp_path):
    root, requests = upstream_server
    gates = published_gates(32, 8, seed=3)
    publish(root, "Llama-3.1-8B-Instruct", gates)
    pattern = HeadPattern.from_pretrained("Llama-3.1-8B-Instruct")
    np.testing.assert_array_equal(pattern.gates, np.clip(gates, 0, 1))
    assert (pattern.sink, pattern.recent) == (128, 256)
    entry = hub.upstream_pattern("Llama-3.1-8B-Instruct")
    assert requests == [f"/{entry.revision}/attn_patterns/{entry.path}/config.json",
                        f"/{entry.revision}/attn_patterns/{entry.path}/full_attention_heads.tsv"]
    cached = tmp_path / "assets" / "duoattn" / "upstream" / entry.revision / entry.path
    assert sorted(p.name for p in cached.iterdir()) == ["config.json", "full_attention_heads.tsv"]
    # The model's Hub id names the same pattern; the second lookup reads the cache.
    again = HeadPattern.from_pretrained(entry.model)
    np.testing.assert_array_equal(again.gates, pattern.gates)
    assert len(requests) == 2


def test_a_published_name_at_another_revision(upstream_server):
    root, _ = upstream_server
    publish(root, "Mistral-7B-Instruct-v0.3", published_gates(32, 8, seed=1))
    newer = published_gates(32, 8, seed=2)
    publish(root, "Mistral-7B-Instruct-v0.3", newer, revision="main")
    pattern = HeadPattern.from_pretrained("Mistral-7B-Instruct-v0.3", revision="main")
    np.testing.assert_array_equal(pattern.gates, np.clip(newer, 0, 1))


def test_a_published_pattern_missing_upstream_names_the_url(upstream_server):
    with pytest.raises(FileNotFoundError, match=r"could not download pattern 'Mistral-7B-Instruct-v0.2' from http"):
        HeadPattern.from_pretrained("Mistral-7B-Instruct-v0.2")


def test_offline_a_published_pattern_comes_from_the_cache_only(offline):
    with pytest.raises(FileNotFoundError, match="not cached .* HF_HUB_OFFLINE is set"):
        HeadPattern.from_pretrained("Llama-2-7B-32K-Instruct")
    entry = hub.upstream_pattern("Llama-2-7B-32K-Instruct")
    gates = published_gates(32, 32)
    write_published(offline / "assets" / "duoattn" / "upstream" / entry.revision / entry.path, gates)
    np.testing.assert_array_equal(HeadPattern.from_pretrained("Llama-2-7B-32K-Instruct").gates, np.clip(gates, 0, 1))


# ------------------------------------------------------------------------------------------------------ Hub
def fabricate_snapshot(hub_cache: Path, repo_id: str, commit: str, gates: np.ndarray, ref: str | None = None) -> None:
    """A Hub cache entry as ``snapshot_download`` leaves it (plain files instead of blob links)."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    write_published(repo / "snapshots" / commit, gates)
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def test_a_hub_repo_id_reads_the_hub_cache_at_a_revision(offline):
    old, new = published_gates(4, 2, seed=4), published_gates(4, 2, seed=5)
    fabricate_snapshot(offline / "hub", "alice/smol-pattern", "a" * 40, old)
    fabricate_snapshot(offline / "hub", "alice/smol-pattern", "b" * 40, new, ref="main")
    np.testing.assert_array_equal(HeadPattern.from_pretrained("alice/smol-pattern").gates, np.clip(new, 0, 1))
    pinned = HeadPattern.from_pretrained("alice/smol-pattern", revision="a" * 40)
    np.testing.assert_array_equal(pinned.gates, np.clip(old, 0, 1))


def test_a_hub_repo_that_cannot_be_read_says_why_and_lists_the_known_names(offline):
    with pytest.raises(FileNotFoundError, match=r"'bob/nothing'.*SmolLM2-135M-Instruct.*could not be read"):
        HeadPattern.from_pretrained("bob/nothing")


# ------------------------------------------------------------------------------------------ save / push
def test_save_pretrained_writes_the_format_and_a_model_card(tmp_path):
    gates = np.array([[0.9, 0.1], [0.8, 0.2]])
    pattern = HeadPattern(gates, sink=64, recent=256, metadata={"lr": 0.02, "steps": 200})
    out = pattern.save_pretrained(tmp_path / "p", model="alice/tiny-llama", command="duoattn identify --x")
    loaded = HeadPattern.from_pretrained(out)
    np.testing.assert_array_equal(loaded.gates, gates)
    assert loaded.metadata == {"lr": 0.02, "steps": 200}
    card = (out / "README.md").read_text()
    assert "base_model: alice/tiny-llama" in card
    assert "# DuoAttention head pattern for alice/tiny-llama" in card
    assert "```bash\nduoattn identify --x\n```" in card
    # sparsity 0.5: 2 of 4 heads keep everything, 2 keep sink + recent = 320 tokens
    at_8k = (2 * 8192 + 2 * 320) / (4 * 8192)
    assert f"| 0.5 | 2 of 4 | {at_8k:.0%} |" in card and f"{at_8k:.0%}" == "52%"


def test_push_to_hub_uploads_what_from_pretrained_reads(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs["exist_ok"]))

        def upload_folder(self, repo_id, folder_path, **kwargs):
            shutil.copytree(folder_path, tmp_path / "uploaded")
            calls.append(("upload", repo_id))
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    pattern = HeadPattern(published_gates(4, 2), sink=8, recent=16)
    assert pattern.push_to_hub("alice/p", model="m", token="t") == "commit-info"
    assert calls == [("init", "t"), ("create", "alice/p", True), ("upload", "alice/p")]
    np.testing.assert_array_equal(HeadPattern.from_pretrained(tmp_path / "uploaded").gates, pattern.gates)
    assert "HeadPattern.from_pretrained('alice/p')" in (tmp_path / "uploaded" / "README.md").read_text()


def test_the_model_card_of_an_identified_pattern_rebuilds_its_command(tmp_path):
    pattern = HeadPattern.from_pretrained("SmolLM2-135M-Instruct")  # made by duoattn identify
    command = hub.identify_command(pattern)
    # argparse is the reference: the command parses back to the settings the pattern records
    args = cli.build_parser().parse_args(shlex.split(command)[1:])
    md = pattern.metadata
    assert (args.command, args.model, args.out) == ("identify", None, "DIR")
    assert (args.steps, args.min_len, args.max_len, args.lr, args.reg) == (
        md["steps"], md["min_len"], md["max_len"], md["lr"], md["reg"])
    assert (args.sink, args.recent, args.device, args.dtype, args.seed) == (64, 256, md["device"], "float32", md["seed"])
    assert (args.full_term, args.init, args.hard_steps, args.hard_lr) == (
        md["full_term"], md["init"], md["hard_steps"], md["hard_lr"])
    assert list(args.hard_budgets) == md["hard_budgets"]
    recorded = (md["pin_budget"], md["loss_positions"])
    assert (args.pin_budget, args.loss_positions) == recorded == (0.25, "answers")
    card = (pattern.save_pretrained(tmp_path / "p") / "README.md").read_text()
    assert f"```bash\n{command}\n```" in card
    assert "load_model()   # the embedded" in card
    assert hub.identify_command(HeadPattern.uniform(2, 2)) is None


def test_a_soft_run_rebuilds_without_hard_step_flags():
    """The soft pattern the shipped one starts from: no hard steps recorded, so no hard-step flags, and the command
    parses back to argparse's defaults for them."""
    soft = Path(__file__).resolve().parent.parent / "docs" / "runs" / "smollm2-soft-200-2026-11-29"
    pattern = HeadPattern.from_pretrained(soft)
    command = hub.identify_command(pattern)
    assert "--hard" not in command and "--init" not in command
    args = cli.build_parser().parse_args(shlex.split(command)[1:])
    assert (args.steps, args.device, args.hard_steps, args.init) == (200, "cuda", 0, None)
