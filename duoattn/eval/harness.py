"""``duoattn eval niah|ruler|passkey``: one task, several methods, the same prompts, one output directory.

The model is loaded once and every prompt is built once; then :func:`~duoattn.eval.runner.run_cells` scores
each (method, prompt) cell on the deployment path. The directory gets ``config.json``, ``cells.jsonl``,
``results.json`` and the plots.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..hub import resolve_pattern_dir
from ..checks import UsageError, check_choice, check_device, check_dtype, check_int, check_ints, check_output_dir
from ..models import (
    EMBEDDED_NAME,
    check_context,
    check_model_source,
    check_pattern_shape,
    check_supported,
    default_device,
    load_model,
    load_tokenizer,
    model_config,
)
from ..pattern import HeadPattern
from ..quant.weights import WEIGHT_BITS
from ..prefill import PrefillMode
from ..shipped import PATTERNS_DIR
from . import plots
from .methods import Method, parse_methods
from .prompts import Sample
from .runner import run_cells
from .store import ResultStore
from .summary import format_table, summarize

DEFAULT_SINK, DEFAULT_RECENT = 64, 256  # the DuoAttention needle / LongBench settings


class Task(Protocol):
    name: str

    def samples(self, tokenizer: PreTrainedTokenizerBase, chat_template: bool) -> list[Sample]: ...


@dataclass
class EvalConfig:
    """What every evaluation shares: where results go, the model, the methods and how to generate.

    Attributes:
        out_dir: the run's directory; rerunning with the same config continues an interrupted run.
        model: HF id, directory or ``.gguf``; None for the embedded SmolLM2-135M-Instruct.
        pattern: the learned pattern (``duo`` needs it): a directory, a shipped or published name or a Hub repo id
            (see ``HeadPattern.from_pretrained``); None: the pattern shipped for the embedded model, if any.
        methods: comma-separated kinds among full, duo, streaming, random.
        sparsities: fractions of streaming heads for ``duo`` and ``random`` (several make a budget sweep).
        random_seeds: seeds of the random-heads baseline, per sparsity.
        sink, recent: the streaming window of every streaming head; default the pattern's, else 64 / 256.
        max_new_tokens: caps every task's own generation budget (None: each task's budget).
        prefill_chunk_size: prefill in chunks of this many tokens (None: one pass).
        chat_template: wrap prompts in the tokenizer's chat template (default: raw completion prompts).
        device, dtype: default ``cuda`` if available, else ``cpu``; float32 on the CPU, bfloat16 on a GPU.
        kv_bits: retrieval-cache precisions to compare (16 = the model dtype; 8 / 4 quantised), for every method
            but ``full``.
        weight_bits: 8 loads the model with 8-bit weight-only linear layers.
        prefill: prefill modes to compare (``streaming``, ``full``, ``window:N``), for every method but ``full``.
    """

    out_dir: str
    model: str | None = None
    pattern: str | None = None
    methods: str = "full,duo,streaming"
    sparsities: list[float] = field(default_factory=lambda: [0.5])
    random_seeds: int = 3
    sink: int | None = None
    recent: int | None = None
    max_new_tokens: int | None = None
    prefill_chunk_size: int | None = None
    chat_template: bool = False
    device: str | None = None
    dtype: str | None = None
    kv_bits: list[int] = field(default_factory=lambda: [16])
    weight_bits: int = 16
    prefill: list[str] = field(default_factory=lambda: ["streaming"])

    def __post_init__(self) -> None:
        check_output_dir("out_dir", self.out_dir)
        if self.dtype is not None:
            self.dtype = check_dtype("dtype", self.dtype)
        if self.device is not None:
            self.device = check_device("device", self.device)
        self.kv_bits = check_ints("kv_bits", self.kv_bits, 1)
        check_choice("weight_bits", self.weight_bits, WEIGHT_BITS)
        if not self.prefill:
            raise ValueError("prefill must name at least one mode (streaming, full, window:N)")
        self.prefill = [PrefillMode.parse(p).name for p in self.prefill]
        if any(not 0.0 <= s <= 1.0 for s in self.sparsities) or not self.sparsities:
            raise ValueError(f"sparsities must be fractions in [0, 1], got {self.sparsities}")
        check_int("random_seeds", self.random_seeds, 1)
        for name, minimum in (("max_new_tokens", 1), ("prefill_chunk_size", 1), ("recent", 1), ("sink", 0)):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum)
        if not self.method_list():
            raise ValueError("methods must name at least one of full, duo, streaming, random")

    def method_list(self) -> list[Method]:
        return parse_methods(self.methods, self.sparsities, self.random_seeds, self.kv_bits, self.prefill)

    def pattern_dir(self) -> Path | None:
        if self.pattern is not None:
            return resolve_pattern_dir(self.pattern)
        shipped = PATTERNS_DIR / EMBEDDED_NAME
        return shipped if self.model is None and (shipped / "full_attention_heads.tsv").is_file() else None

    def resolved_device(self) -> str:
        return str(torch.device(self.device or default_device()))

    def resolved_dtype(self) -> str:
        if self.dtype is not None:
            return self.dtype
        return "float32" if torch.device(self.resolved_device()).type == "cpu" else "bfloat16"


def _pattern(config: EvalConfig, methods: list[Method]) -> tuple[HeadPattern | None, dict[str, Any]]:
    directory = config.pattern_dir()
    if directory is None:
        if any(m.kind == "duo" for m in methods):
            hint = (f"; the shipped {EMBEDDED_NAME} pattern is the default only without --model (for another copy of "
                    f"the embedded model: --pattern {EMBEDDED_NAME})") if config.model is not None else ""
            raise UsageError("method 'duo' needs a learned pattern: pass --pattern DIR (made by `duoattn identify`) "
                             f"or a pattern name{hint}")
        return None, {"path": None}
    pattern = HeadPattern.load(directory)
    digest = hashlib.sha256(pattern.gates.tobytes()).hexdigest()[:16]
    return pattern, {"path": str(directory), "gates_sha256": digest, "sink": pattern.sink, "recent": pattern.recent}


def check_model(cfg: PretrainedConfig, methods: list[Method], learned: HeadPattern | None, longest: int) -> None:
    """What must hold between the model and the run, checked on its config before any weight is read."""
    check_context(cfg, longest, "lengths")
    if any(m.kind != "full" for m in methods):
        check_supported(cfg)
        if learned is not None and any(m.kind == "duo" for m in methods):  # only duo runs the learned gates
            check_pattern_shape(learned.shape, cfg)


def run_config(
    config: EvalConfig, task: Task, methods: list[Method], pattern_info: dict, sink: int, recent: int,
    model: PreTrainedModel | None = None,
) -> dict:
    """Everything that decides the results, as saved in ``config.json``."""
    if model is not None:
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        device, dtype = str(model.device), str(model.dtype).removeprefix("torch.")
    else:
        name = config.model or f"{EMBEDDED_NAME} (embedded)"
        device, dtype = config.resolved_device(), config.resolved_dtype()
    cap = config.max_new_tokens
    return {
        "task": task.name,
        "task_config": asdict(task),
        "model": name,
        "device": device,
        "dtype": dtype,
        "pattern": pattern_info,
        "sink": sink,
        "recent": recent,
        "methods": [m.name for m in methods],
        "method_spec": {
            "methods": config.methods, "sparsities": config.sparsities, "random_seeds": config.random_seeds,
            "kv_bits": config.kv_bits, "prefill": config.prefill,
        },
        "weight_bits": config.weight_bits,
        "generation": {
            "decoding": "greedy",
            "max_new_tokens": "each task's own budget" if cap is None else f"min(task, {cap})",
            "prefill_chunk_size": config.prefill_chunk_size,
            "prompt": "chat template" if config.chat_template else "raw",
        },
        "path": "model.generate under duo_attention(...) (full: the unpatched model)",
    }


def run_eval(
    config: EvalConfig,
    task: Task,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, Any]:
    """Run ``task`` for every method of ``config``; returns the summary (also in ``results.json``).

    ``model`` and ``tokenizer`` (both or neither) replace loading ``config.model``: for a model already in memory.
    """
    if (model is None) != (tokenizer is None):
        raise ValueError("pass both model and tokenizer, or neither")
    methods = config.method_list()
    if model is None:
        check_model_source("model", config.model)
    learned, pattern_info = _pattern(config, methods)
    sink = config.sink if config.sink is not None else learned.sink if learned else DEFAULT_SINK
    recent = config.recent if config.recent is not None else learned.recent if learned else DEFAULT_RECENT
    cfg = model.config if model is not None else model_config(config.model)
    check_model(cfg, methods, learned, max(getattr(task, "lengths", None) or [0]))
    tokenizer = tokenizer or load_tokenizer(config.model)
    samples = task.samples(tokenizer, config.chat_template)
    for sample in samples:  # the prompt as built, with the tokens it may generate
        budget = sample.max_new_tokens if config.max_new_tokens is None else min(sample.max_new_tokens,
                                                                                config.max_new_tokens)
        check_context(cfg, len(sample.input_ids) + budget, f"prompt {sample.key} (tokens + max_new_tokens)")
    store = ResultStore(config.out_dir, run_config(config, task, methods, pattern_info, sink, recent, model))

    def write_results(_: Method) -> None:
        store.write_results(summarize(store.cells))

    if any(not store.done(m.name, s.key) for m in methods for s in samples):
        if model is None:
            model, tokenizer = load_model(
                config.model, dtype=config.resolved_dtype(), device=config.resolved_device(),
                weight_bits=config.weight_bits,
            )
        run_cells(
            model, tokenizer, methods, samples, store, learned, sink, recent,
            max_new_tokens=config.max_new_tokens,
            prefill_chunk_size=config.prefill_chunk_size,
            chat_template=config.chat_template,
            after_method=write_results,
        )
    summary = summarize(store.cells)
    store.write_results(summary)
    draw_plots(task.name, store.cells, summary, Path(config.out_dir))
    print(f"{task.name}: {len(samples)} prompts x {len(methods)} methods; sink={sink}, recent={recent}")
    print(format_table(summary, "by_task" if task.name == "ruler" else "by_length"))
    print(f"results: {Path(config.out_dir) / 'results.json'}")
    return summary


def draw_plots(task: str, cells: list[dict], summary: dict, out_dir: Path) -> list[Path]:
    """The run's figures: heatmaps per method (needle), bars per task (RULER), per length, and the budget sweep."""
    paths = []
    if task == "niah":
        for label in summary["labels"]:
            grid: dict[tuple[int, float], list[float]] = {}
            for c in cells:
                if c["label"] == label:
                    grid.setdefault((c["length"], c["depth"]), []).append(c["score"])
            means = {k: sum(v) / len(v) for k, v in grid.items()}
            safe = label.replace("%", "pct")
            paths.append(plots.niah_heatmap(means, f"needle in a haystack: {label}", out_dir / f"heatmap_{safe}.png"))
    if task == "ruler":
        paths.append(plots.scores_by(summary, "by_task", "RULER score per task", out_dir / "by_task.png"))
    paths.append(plots.scores_by(summary, "by_length", f"{task}: score per length", out_dir / "by_length.png"))
    paths.append(plots.budget_sweep(summary, f"{task}: score against budget", out_dir / "sweep.png"))
    return paths
