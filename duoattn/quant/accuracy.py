"""What a quantised KV cache costs in accuracy: passkey retrieval with DuoAttention at kv_bits 16 / 8 / 4.

Every setting runs the same prompts through ``model.generate`` on the deployment path (the cache and kernels that
``duo_attention(..., kv_bits=...)`` deploys). Writes ``results.json``, ``passkey.png`` and the ``config.json`` that
made them into the output directory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ..eval.generation import GenerationSettings, generate_answer  # noqa: E402
from ..eval.passkey import passkey_sample, score_passkey  # noqa: E402
from ..models import load_model, text_config  # noqa: E402
from ..patch import duo_attention  # noqa: E402
from ..pattern import HeadPattern  # noqa: E402
from .kv import KV_BITS  # noqa: E402
from .outputs import save_figure, write_json  # noqa: E402
from .weights import WEIGHT_BITS  # noqa: E402

METHODS = ("duo", "full")  # full: every head retrieval, so the whole cache is quantised


@dataclass
class QuantPasskeyConfig:
    """Settings of ``duoattn quant-passkey``.

    Attributes:
        out: output directory.
        pattern: a pattern directory; None draws random gates (seed ``pattern_seed``), recorded in the config.
        methods: ``duo`` (the pattern at ``sparsity``) and / or ``full`` (every head retrieval).
        kv_bits: cache settings to compare (16 = the model dtype).
        samples: prompts per length; passkey depths are spread evenly over the context.
    """

    out: str
    model: str | None = None
    pattern: str | None = None
    pattern_seed: int = 0
    sparsity: float = 0.5
    methods: list[str] = field(default_factory=lambda: ["duo"])
    kv_bits: list[int] = field(default_factory=lambda: [16, 8, 4])
    kv_group_size: int | None = None
    weight_bits: int = 16
    lengths: list[int] = field(default_factory=lambda: [2048, 4096])
    samples: int = 20
    sink: int = 64
    recent: int = 256
    prefill_chunk_size: int | None = None
    max_new_tokens: int = 8
    device: str | None = None
    seed: int = 20261129

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {self.sparsity}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods must be some of {METHODS}, got {self.methods}")
        bad_bits = [b for b in self.kv_bits if b not in KV_BITS]
        if bad_bits or not self.kv_bits:
            raise ValueError(f"kv_bits must be some of {KV_BITS}, got {self.kv_bits}")
        if self.weight_bits not in WEIGHT_BITS:
            raise ValueError(f"weight_bits must be one of {WEIGHT_BITS}, got {self.weight_bits}")
        if not self.lengths or min(self.lengths) < 64:
            raise ValueError(f"lengths must be prompt lengths of at least 64 tokens, got {self.lengths}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


def _pattern(config: QuantPasskeyConfig, model) -> HeadPattern:
    if config.pattern is not None:
        return HeadPattern.load(config.pattern)
    cfg = text_config(model)
    return HeadPattern.random(cfg.num_hidden_layers, cfg.num_key_value_heads, seed=config.pattern_seed)


def _spread_order(n: int) -> list[int]:
    """0..n-1 in an order whose every prefix spreads over the range (so partial results cover all depths)."""
    order: list[int] = []
    step = 1 << max(0, (n - 1).bit_length())
    while step:
        order += [i for i in range(0, n, step) if i not in order]
        step //= 2
    return order


def _run_pattern(config: QuantPasskeyConfig, learned: HeadPattern, method: str) -> tuple[HeadPattern, float]:
    if method == "full":
        return HeadPattern.uniform(*learned.shape, 1.0, sink=config.sink, recent=config.recent), 0.0
    return HeadPattern(learned.gates, sink=config.sink, recent=config.recent), config.sparsity


def run_quant_passkey(config: QuantPasskeyConfig) -> dict:
    """Every prompt runs under every (method, kv_bits) before the next prompt starts, and prompts go round the
    lengths and depths, so ``results.json`` (rewritten after each prompt) is a fair comparison even if the run is
    stopped early."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", asdict(config))
    model, tokenizer = load_model(config.model, device=config.device, weight_bits=config.weight_bits)
    learned = _pattern(config, model)
    settings = GenerationSettings(max_new_tokens=config.max_new_tokens, prefill_chunk_size=config.prefill_chunk_size)
    runs = [{"method": m, "kv_bits": b, "answers": {str(n): [] for n in config.lengths}, "kv_bytes": {}}
            for m in config.methods for b in config.kv_bits]
    results: dict = {"settings": settings.to_dict(), "runs": runs}
    progress = tqdm(total=len(runs) * len(config.lengths) * config.samples, desc="passkey", unit="generation")
    for i in _spread_order(config.samples):
        for n in config.lengths:
            sample = passkey_sample(tokenizer, n, depth=(i + 0.5) / config.samples, seed=config.seed + 1000 * n + i)
            for run in runs:
                pattern, sparsity = _run_pattern(config, learned, run["method"])
                bits = run["kv_bits"]
                group = config.kv_group_size if bits != 16 else None
                with duo_attention(model, pattern, sparsity=sparsity, kv_bits=bits, kv_group_size=group):
                    text, nbytes = generate_answer(model, tokenizer, sample.input_ids, settings)
                run["answers"][str(n)].append({"depth": sample.depth, "tokens": len(sample.input_ids),
                                               "answer": sample.answer, "generated": text,
                                               "score": score_passkey(sample.answer, text)})
                run["kv_bytes"][str(n)] = nbytes
                progress.update()
            _summarise(results)
            write_json(out / "results.json", results)
    progress.close()
    _plot(results, config, out / "passkey.png")
    print(format_table(results, config))
    return results


def _summarise(results: dict) -> None:
    for run in results["runs"]:
        run["accuracy"] = {n: sum(a["score"] for a in answers) / len(answers)
                           for n, answers in run["answers"].items() if answers}
        run["prompts"] = {n: len(answers) for n, answers in run["answers"].items()}


def format_table(results: dict, config: QuantPasskeyConfig) -> str:
    """A markdown table: one row per (method, kv_bits), accuracy per length and KV MiB at the longest."""
    longest = str(config.lengths[-1])
    head = ["method", "KV bits"] + [f"passkey @ {n}" for n in config.lengths] + [f"KV MiB @ {longest}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in results["runs"]:
        name = f"DuoAttention {1 - config.sparsity:.0%}" if run["method"] == "duo" else "full attention"
        cells = [name, str(run["kv_bits"])]
        cells += [f"{run['accuracy'][str(n)]:.2f} ({run['prompts'][str(n)]})" for n in config.lengths]
        cells.append(f"{run['kv_bytes'][longest] / 2**20:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(results: dict, config: QuantPasskeyConfig, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    runs = results["runs"]
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        xs = [j + i * width for j in range(len(config.lengths))]
        label = f"{run['method']} kv{run['kv_bits']}"
        ax.bar(xs, [run["accuracy"][str(n)] for n in config.lengths], width=width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(config.lengths))], [str(n) for n in config.lengths])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
