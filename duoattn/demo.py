"""The main job: passkey retrieval at about 1K, 2K and 4K tokens under full attention, DuoAttention and
StreamingLLM, with the KV-cache bytes each one holds."""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm import tqdm

from .checks import check_device, check_int, check_ints, check_number
from .eval.generation import GenerationSettings, generate_answer
from .eval.methods import Method
from .eval.passkey import MAX_NEW_TOKENS as PASSKEY_NEW_TOKENS
from .eval.passkey import passkey_sample, score_passkey
from .models import (
    EMBEDDED_NAME,
    check_context,
    check_model_source,
    check_pattern_shape,
    load_model,
    load_tokenizer,
    model_config,
)
from .pattern import HeadPattern
from .shipped import shipped_pattern_dir


@dataclass
class DemoConfig:
    """Settings of ``duoattn demo``.

    Attributes:
        model: a Hugging Face id, directory or ``.gguf`` file; None for the embedded SmolLM2-135M-Instruct.
        pattern: a pattern directory, name or Hub repo id (``HeadPattern.from_pretrained``); None for the pattern
            shipped for the embedded model.
        sparsity: fraction of streaming heads for DuoAttention.
        lengths: prompt lengths in tokens.
        samples: prompts per length (passkey depths spread evenly over the context).
        prefill: DuoAttention's prefill mode (``streaming``, ``full`` or ``window:N``, :mod:`duoattn.prefill`).
    """

    model: str | None = None
    pattern: str | None = None
    sparsity: float = 0.5
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    samples: int = 3
    sink: int | None = None
    recent: int | None = None
    prefill_chunk_size: int | None = None
    device: str | None = None
    seed: int = 20261129
    prefill: str = "streaming"

    def __post_init__(self) -> None:
        check_number("sparsity", self.sparsity, 0.0, 1.0)
        self.lengths = check_ints("lengths", self.lengths, 1)
        check_int("samples", self.samples, 1)
        for name, minimum in (("sink", 0), ("recent", 1), ("prefill_chunk_size", 1)):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum)
        if self.device is not None:
            self.device = check_device("device", self.device)
        check_int("seed", self.seed, 0)


@dataclass
class DemoRow:
    method: str
    accuracy: dict[int, float]
    kv_bytes: dict[int, int]


def run_demo(config: DemoConfig) -> list[DemoRow]:
    # Everything that can be checked without the weights is, before they are loaded.
    check_model_source("model", config.model)
    pattern = HeadPattern.from_pretrained(config.pattern or shipped_pattern_dir(EMBEDDED_NAME))
    cfg = model_config(config.model)
    check_pattern_shape(pattern.shape, cfg)
    # A passkey prompt of length n plus the answer it generates must fit the context.
    check_context(cfg, max(config.lengths) + PASSKEY_NEW_TOKENS, "lengths (+ the answer's tokens)")
    tokenizer = load_tokenizer(config.model)
    samples = {  # built before the weights are loaded: a length too short for a passkey prompt is refused here
        length: [
            passkey_sample(tokenizer, length, depth=(i + 0.5) / config.samples, seed=config.seed + 1000 * length + i)
            for i in range(config.samples)
        ]
        for length in config.lengths
    }
    longest = max(len(s.input_ids) for prompts in samples.values() for s in prompts)
    check_context(cfg, longest + PASSKEY_NEW_TOKENS, "the longest prompt (+ the answer's tokens)")
    model, tokenizer = load_model(config.model, device=config.device)
    sink = pattern.sink if config.sink is None else config.sink
    recent = pattern.recent if config.recent is None else config.recent
    methods = [Method("full"), Method("duo", config.sparsity, prefill=config.prefill), Method("streaming")]
    settings = GenerationSettings(max_new_tokens=PASSKEY_NEW_TOKENS, prefill_chunk_size=config.prefill_chunk_size)
    rows = []
    progress = tqdm(total=len(methods) * len(config.lengths) * config.samples, desc="passkey", unit="prompt")
    for method in methods:
        row = DemoRow(method.name, {}, {})
        with method.applied(model, pattern, sink, recent):
            for length, prompts in samples.items():
                hits = 0.0
                for sample in prompts:
                    text, nbytes = generate_answer(model, tokenizer, sample.input_ids, settings)
                    hits += score_passkey(sample.answer, text)
                    progress.update()
                row.accuracy[length] = hits / len(prompts)
                row.kv_bytes[length] = nbytes
        rows.append(row)
    progress.close()
    print(format_table(rows, config, sink, recent))
    return rows


def format_table(rows: list[DemoRow], config: DemoConfig, sink: int, recent: int) -> str:
    lengths = config.lengths
    longest = lengths[-1]
    full_bytes = rows[0].kv_bytes[longest]
    head = ["method"] + [f"acc@{n}" for n in lengths] + [f"KV MiB@{longest}", "vs full"]
    body = [
        [r.method]
        + [f"{r.accuracy[n]:.2f}" for n in lengths]
        + [f"{r.kv_bytes[longest] / 2**20:.1f}", f"{full_bytes / r.kv_bytes[longest]:.2f}x"]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [head] + body) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [
        f"passkey retrieval, {config.samples} prompts per length; sink={sink}, recent={recent}, "
        f"DuoAttention sparsity={config.sparsity} (retrieval heads {1 - config.sparsity:.0%})",
        fmt.format(*head),
        *(fmt.format(*line) for line in body),
    ]
    return "\n".join(lines)
