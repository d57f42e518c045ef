"""Measure budget-aware selection on an existing pattern: validation report, refinement, a held-out check.

    python scripts/select_measure.py OUT_DIR [--pattern DIR] [--val-samples 3] [--min-len 1024] [--max-len 1536]
        [--refine 0.25,0.5] [--evals 12] [--window 4] [--passkey-samples 20] [--lengths 1024,2048]

Loads the model (default: the embedded SmolLM2-135M-Instruct), reports the pattern's binarised loss and accuracy on
validation samples (seed 43) and on held-out samples (seed 44), refines at the given budgets on the validation
loss, reports the refined gates on both sets, writes the refined pattern to OUT_DIR/pattern and (unless ``--passkey-samples 0``)
runs ``duoattn eval passkey`` (the demo's 5-digit passkey) on the trained and the refined pattern. Everything goes to
OUT_DIR/measure.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from duoattn import HeadPattern, load_model
from duoattn.cli import main as cli
from duoattn.data.haystack import load_essays
from duoattn.data.passkeys import PasskeyConfig, PasskeyDataset
from duoattn.identify.select import refine
from duoattn.identify.validate import Validator, budget_report, validation_samples
from duoattn.io import atomic_write_text


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--model", default=None)
    p.add_argument("--pattern", default="SmolLM2-135M-Instruct")
    p.add_argument("--val-samples", type=int, default=3)
    p.add_argument("--min-len", type=int, default=1024)
    p.add_argument("--max-len", type=int, default=1536)
    p.add_argument("--num-passkeys", type=int, default=4)
    p.add_argument("--passkey-words", type=int, default=8)
    p.add_argument("--budgets", type=_floats, default=[0.1, 0.25, 0.5, 0.75])
    p.add_argument("--refine", type=_floats, default=[0.25, 0.5])
    p.add_argument("--evals", type=int, default=12)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--min-per-layer", type=int, default=0)
    p.add_argument("--passkey-samples", type=int, default=20)
    p.add_argument("--lengths", default="1024,2048")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args.model, device=args.device)
    pattern = HeadPattern.from_pretrained(args.pattern)
    text = load_essays()
    cfg = PasskeyConfig(args.num_passkeys, args.passkey_words, args.min_len, args.max_len)
    sets = {name: Validator(model, validation_samples(PasskeyDataset(tokenizer, text, cfg, seed), args.val_samples),
                            pattern.sink, pattern.recent)
            for name, seed in (("validation", 43), ("heldout", 44))}
    result: dict = {"args": vars(args), "full_accuracy": {k: v.full.accuracy for k, v in sets.items()}}
    for name, validator in sets.items():
        result[f"trained_{name}"] = budget_report(validator, pattern.gates, args.budgets, args.min_per_layer)
    tic = time.perf_counter()
    selection = refine(lambda roles: sets["validation"].evaluate(roles).loss, pattern.gates, args.refine,
                       sets["validation"].layers, args.window, args.evals, args.min_per_layer)
    result["refine_seconds"] = time.perf_counter() - tic
    result["selection"] = selection.record()
    for name, validator in sets.items():
        result[f"selected_{name}"] = budget_report(validator, selection.gates, args.budgets)
    refined = HeadPattern(selection.gates, sink=pattern.sink, recent=pattern.recent, metadata=pattern.metadata)
    refined.save(out / "pattern")
    for tag, directory in (("trained", args.pattern), ("selected", str(out / "pattern"))) if args.passkey_samples else ():
        sparsity = ",".join(f"{1 - b:g}" for b in args.refine)
        cli(["eval", "passkey", "--pattern", directory, "--out", str(out / f"passkey-{tag}"), "--lengths", args.lengths,
             "--samples", str(args.passkey_samples), "--seed", "20261201", "--methods", "duo", "--sparsity", sparsity,
             "--device", args.device])
        summary = json.loads((out / f"passkey-{tag}" / "results.json").read_text())["summary"]
        result[f"passkey_{tag}"] = {label: v["by_length"] for label, v in summary["labels"].items()}
    atomic_write_text(out / "measure.json", json.dumps(result, indent=1) + "\n")
    for name in sets:
        for tag in ("trained", "selected"):
            rows = result[f"{tag}_{name}"]
            print(name, tag, " ".join(f"{100 * r['budget']:.0f}%: {r['loss']:.4g}/{r['accuracy']:.2f}" for r in rows))
    for tag in ("trained", "selected") if args.passkey_samples else ():
        print("passkey", tag, result[f"passkey_{tag}"])
    print("refine", [(b["budget"], b["loss_before"], b["loss_after"], b["accepted"]) for b in result["selection"]["budgets"]],
          f"{result['refine_seconds']:.0f} s")
    np.testing.assert_equal(len(selection.budgets), len(args.refine))


if __name__ == "__main__":
    main()
