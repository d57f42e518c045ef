"""``duoattn identify`` end to end: check the inputs, load the model and the haystack, train the gates, write the
pattern directory (upstream format), the history and the plots.

Every input is checked before the model is loaded and before anything is written, so bad input never leaves a
file behind. A non-empty output directory is refused unless it is a run to resume (``resume``) or is to be
replaced (``overwrite``). Once training has finished, the whole output directory (pattern, history, plots,
checkpoint) is built beside the old one and swapped in: a reader sees the old run or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import __version__
from ..checks import UsageError, check_file, check_output_dir
from ..data.haystack import ESSAYS, load_haystack
from ..data.passkeys import PasskeyConfig, PasskeyDataset
from ..distributed import World, init_world, launched
from ..io import atomic_write_bytes, replace_directory
from ..models import EMBEDDED_NAME, check_context, check_supported, load_model, model_config, sliding_windows, text_config
from ..pattern import CONFIG_FILE, GATES_FILE, HeadPattern
from .checkpoint import has_checkpoint
from .plots import plot_gates, plot_history, plot_validation
from .select import refine
from .train import IdentifyConfig, train_gates
from .validate import Validator, budget_report, validation_samples

CHECKPOINT_DIR = "checkpoint"
HISTORY_FILE = "history.json"
GATES_PLOT = "gates.png"
LOSS_PLOT = "loss.png"
VALIDATION_FILE = "validation.json"
VALIDATION_PLOT = "validation.png"
SELECTION_FILE = "selection.json"


@dataclass
class IdentifyResult:
    """The written pattern (refined gates when selection ran), the training history, the output directory, the
    validation report (``validation.json``) and the selection record (``selection.json``), None when they did not
    run. ``written``: False on the ranks other than 0 of a sequence-parallel run, which write nothing (and skip the
    validation, which rank 0 runs on whole samples)."""

    pattern: HeadPattern
    history: list[dict[str, Any]]
    out: Path
    validation: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None
    written: bool = True


PATTERN_FILES = (GATES_FILE, CONFIG_FILE)
OUTPUTS = (CHECKPOINT_DIR, HISTORY_FILE, GATES_PLOT, LOSS_PLOT, VALIDATION_FILE, VALIDATION_PLOT, SELECTION_FILE)


def check_inputs(config: IdentifyConfig, model_given: bool) -> None:
    """Every file the run reads or writes, checked before the model is loaded and before anything is written."""
    out = check_output_dir("out", config.out)
    if not model_given:  # the model's config is read without its weights
        cfg = model_config(config.model)
        check_supported(cfg)
        if not config.fit_context:  # a preset's lengths are capped at the model's context instead
            check_context(cfg, config.max_len, "max_len")
            if config.val_samples:
                check_context(cfg, config.validation_lengths[1], "val_max_len")
    for path in config.haystack:
        if path != ESSAYS:
            check_file("haystack file", path)
    if config.init is not None:  # a missing or malformed pattern is refused before anything runs
        HeadPattern.from_pretrained(config.init)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries or config.overwrite:
        return
    if config.resume and has_checkpoint(out / CHECKPOINT_DIR):
        return  # the checkpoint's settings are compared with this run's before the first step
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    hint = "it holds no checkpoint to resume" if config.resume else "pass --resume to continue the run there"
    raise UsageError(
        f"out {str(out)!r} is not empty ({shown}); {hint}, --overwrite to replace it, or choose another directory"
    )


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
    """Identify retrieval heads; see :class:`IdentifyConfig`. ``model`` / ``tokenizer`` override ``config.model``.

    Started by ``torchrun --nproc-per-node N`` (or in a process group of several), every rank runs this with the
    same config: each sample is split along the sequence over the ranks, each rank computes on its own device
    (``cuda:LOCAL_RANK`` for ``cuda``), and rank 0 alone writes the checkpoints and the output directory.
    """
    out = Path(config.out)
    check_inputs(config, model is not None)
    text = load_haystack(config.haystack)  # read (and checked) before the model is loaded
    world: World | None = init_world(config.device, config.dist_timeout_s) if launched() else None
    main = world is None or world.is_main
    if model is None:
        device = config.device if world is None else str(world.device)
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=device)
        model_name = config.model or EMBEDDED_NAME
    else:
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with the model")
        model_name = config.model or model.config.name_or_path or type(model).__name__
    cfg = check_supported(model)
    context = getattr(cfg, "max_position_embeddings", None)
    if config.fit_context and context is not None and config.max_len > context:
        config = dataclasses.replace(config, max_len=context, min_len=min(config.min_len, context))
    if config.fit_context and context is not None and config.val_max_len is not None and config.val_max_len > context:
        config = dataclasses.replace(config, val_max_len=context,
                                     val_min_len=None if config.val_min_len is None else min(config.val_min_len, context))
    check_context(model, config.max_len, "max_len")
    dataset = PasskeyDataset(tokenizer, text, config.passkeys, config.seed, fit_min_len=config.fit_min_len)
    if dataset.config.min_len != config.min_len:  # fit_min_len: the shortest sample that holds the passkeys
        config = dataclasses.replace(config, min_len=dataset.config.min_len)
    val_dataset = validation_dataset(config, model, tokenizer, text)
    device = next(model.parameters()).device
    settings = {
        **config.settings(),
        "model": model_name,
        "device": device.type,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "haystack_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    if config.overwrite and main:  # everything is checked: the old run's checkpoint must not be resumed into this one
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    if world is not None:  # no rank looks for a checkpoint before rank 0 has removed the old one
        dist.barrier()
    with _deterministic(device):
        result = train_gates(model, dataset.sample, config, settings, out / CHECKPOINT_DIR, progress, world)
        trained = result.gates.double().numpy()
        validation = selection = None
        if val_dataset is not None and main:  # whole samples on one process: the other ranks are done
            validation, selection = validate_gates(model, val_dataset, trained, config, progress)
    gates = trained if selection is None else np.asarray(selection["gates"])

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
        "sequence_parallel": 1 if world is None else world.size,
        "train_seconds": round(sum(r["seconds"] for r in history), 1),
        "validation": None if validation is None else {
            **config.validation_settings(), "seconds": validation["seconds"],
            "selected": selection is not None,
        },
        "versions": {"duoattn": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }
    for key in ("sink", "recent"):  # saved as the upstream sink_size / recent_size
        metadata.pop(key)
    pattern = HeadPattern(gates, sink=config.sink, recent=config.recent, metadata=metadata)
    title = f"{model_name}: {len(history)} steps, sink {config.sink}, recent {config.recent}"

    def fill(new: Path) -> None:
        pattern.write_files(new)
        _write_json(new / HISTORY_FILE, history)
        plot_gates(pattern.gates, new / GATES_PLOT, title)
        plot_history(history, new / LOSS_PLOT, title)
        if validation is not None:
            _write_json(new / VALIDATION_FILE, validation)
            plot_validation(validation, new / VALIDATION_PLOT, f"{title}: {len(validation['samples'])} validation "
                                                               "samples, binarised")
        if selection is not None:
            _write_json(new / SELECTION_FILE, selection)

    if not main:  # rank 0 writes the outputs
        return IdentifyResult(pattern, history, out, written=False)
    # The checkpoint comes along (a finished run can be resumed with more steps); with --overwrite nothing else of
    # the old directory does, with --resume everything the run did not write itself (a README) does.
    replace_directory(out, fill, keep=lambda name: name == CHECKPOINT_DIR or (config.resume and name not in OUTPUTS
                                                                               and name not in PATTERN_FILES))
    return IdentifyResult(pattern, history, out, validation, selection)


def _write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=1) + "\n").encode("utf-8"))


def validation_dataset(config: IdentifyConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       text: str) -> PasskeyDataset | None:
    """The validation samples' dataset (its own seed and lengths), and every budget checked against the model's
    layers: all before the first training step."""
    if not config.val_samples:
        return None
    low, high = config.validation_lengths
    check_context(model, high, "val_max_len")
    try:
        dataset = PasskeyDataset(tokenizer, text, PasskeyConfig(config.num_passkeys, config.passkey_words, low, high,
                                                                loss=config.loss_positions), config.validation_seed)
    except ValueError as err:
        raise UsageError(f"validation samples (val_min_len={low}, val_max_len={high}): {err}") from None
    cfg = text_config(model)
    layers = np.array([w is None for w in sliding_windows(cfg)])
    probe = HeadPattern.uniform(cfg.num_hidden_layers, cfg.num_key_value_heads)
    for budget in sorted(set(config.budgets) | set(config.refine)):
        try:
            probe.binarize(sparsity=1.0 - budget, layers=layers, min_per_layer=config.min_per_layer)
        except ValueError as err:
            raise UsageError(f"budget {budget:g}: {err}") from None
    return dataset


def validate_gates(model: PreTrainedModel, dataset: PasskeyDataset, trained: np.ndarray, config: IdentifyConfig,
                   progress: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The per-budget report of the trained gates; with ``config.refine``, the selection and the report of the
    re-ranked gates. Returns (validation record, selection record or None)."""
    tic = time.perf_counter()
    samples = validation_samples(dataset, config.val_samples)
    validator = Validator(model, samples, config.sink, config.recent, progress)
    validation: dict[str, Any] = {
        "settings": config.validation_settings(),
        "samples": [{"index": i, "length": s.length, "seed": config.validation_seed, "passkeys": len(s.passkeys)}
                    for i, s in enumerate(samples)],
        "full_accuracy": validator.full.accuracy,
        "full_token_accuracy": validator.full.token_accuracy,
        "trained": budget_report(validator, trained, config.budgets, config.min_per_layer, progress),
        "selected": None,
    }
    selection = None
    if config.refine:
        tic_select = time.perf_counter()
        result = refine(lambda roles: validator.evaluate(roles).loss, trained, config.refine, validator.layers,
                        config.refine_window, config.refine_evals, config.min_per_layer, progress)
        selection = {**result.record(), "settings": config.validation_settings(),
                     "seconds": round(time.perf_counter() - tic_select, 1),
                     "trained_gates": trained.tolist(), "gates": result.gates.tolist()}
        validation["selected"] = budget_report(validator, result.gates, config.budgets, 0, progress)
    validation["evaluations"] = validator.evaluations
    validation["seconds"] = round(time.perf_counter() - tic, 1)
    return validation, selection
