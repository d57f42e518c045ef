"""The identification's validation report for an existing pattern: the binarised distillation loss and passkey
accuracy at each budget on held-out multi-passkey samples, as ``duoattn identify`` writes it after training.

    python scripts/validate_pattern.py PATTERN --out DIR [--samples 3] [--min-len 2048] [--max-len 4096] \
        [--budgets 0.25,0.5] [--seed 43] [--loss qa]

Writes DIR/validation.json and DIR/validation.png (the files of an identification run's output directory), so that
patterns made with other validation settings, or none, are compared on the same samples.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from duoattn import HeadPattern, load_model
from duoattn.data.haystack import load_haystack
from duoattn.identify.plots import plot_validation
from duoattn.identify.run import validate_gates, validation_dataset
from duoattn.identify.train import IdentifyConfig
from duoattn.identify.validate import validation_table
from duoattn.io import atomic_write_text


def fractions(text: str) -> tuple[float, ...]:
    """``"0.25,0.5"`` -> ``(0.25, 0.5)``; argparse names the flag when this raises."""
    return tuple(float(x) for x in text.split(",") if x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pattern", help="pattern name or directory")
    parser.add_argument("--out", required=True, help="directory for validation.json and validation.png")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--min-len", type=int, default=2048)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--budgets", type=fractions, default=(0.25, 0.5), help="e.g. 0.25,0.5")
    parser.add_argument("--seed", type=int, default=43)
    parser.add_argument("--loss", choices=("qa", "answers"), default="qa", help="the loss positions (default qa)")
    parser.add_argument("--model", default=None, help="HF id, directory or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    pattern = HeadPattern.from_pretrained(args.pattern)
    model, tokenizer = load_model(args.model, device=args.device)
    with tempfile.TemporaryDirectory() as scratch:
        # The config only carries the validation settings; its training seed must differ from the validation seed.
        config = IdentifyConfig(out=scratch, sink=pattern.sink, recent=pattern.recent, seed=args.seed + 1,
                                val_seed=args.seed, val_samples=args.samples, val_min_len=args.min_len,
                                val_max_len=args.max_len, min_len=args.min_len, max_len=args.max_len,
                                budgets=args.budgets, loss_positions=args.loss)
        dataset = validation_dataset(config, model, tokenizer, load_haystack(()))
        report, _ = validate_gates(model, dataset, pattern.gates, config, progress=True)
    report["pattern"] = str(args.pattern)
    report["loss_positions"] = args.loss
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "validation.json", json.dumps(report, indent=1) + "\n")
    title = f"{Path(str(args.pattern)).name}: {args.samples} validation samples"
    plot_validation(report, out / "validation.png", title)
    print(validation_table(report))


if __name__ == "__main__":
    main()
