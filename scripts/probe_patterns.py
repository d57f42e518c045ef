"""Compare head patterns on held-out retrieval probes, teacher-forced, on the deployed model (a diagnostic).

For each pattern and budget the model runs under ``duo_attention`` (no cache: the rule by position the cache
applies, streaming prefill) on prompts that none of the results tables use, and each answer is scored from one
forward pass with the true answer appended: ``ce`` is the mean cross-entropy of the answer tokens, ``exact`` the
fraction of answers whose every token is the argmax (what greedy decoding writes), ``tokens`` the fraction of answer
tokens that are. Probes:

* ``passkey``: the digit passkey of ``duoattn eval passkey`` with its own seed (not the tables' 20261201), at
  evenly spread depths;
* ``needle``: needle-in-a-haystack prompts in the essays, chat template, with needles other than the tables' one;
* ``multikey``: the identification's own multi-passkey samples (NATO words in essays), from a seed no run trains on.

    python scripts/probe_patterns.py --patterns SmolLM2-135M-Instruct runs/new --budgets 0.25,0.5 \
        --lengths 2048,4096 --samples 8 --out runs/probe.json

Writes one JSON record per (pattern, budget, probe, length), with full attention as the pattern ``full``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from duoattn import HeadPattern, duo_attention, load_model
from duoattn.data.haystack import load_essays
from duoattn.data.passkeys import PasskeyConfig, PasskeyDataset
from duoattn.eval.niah import NiahTask
from duoattn.eval.passkey import passkey_sample
from duoattn.io import atomic_write_text

NEEDLES = (  # (needle, question, answer prefix, answer)
    ("The secret ingredient in Grandma Rosa's famous soup is smoked paprika from Hungary.",
     "What is the secret ingredient in Grandma Rosa's famous soup?",
     "The secret ingredient in Grandma Rosa's famous soup is", "smoked paprika from Hungary"),
    ("The lighthouse keeper of Port Ellery painted his boat bright orange with green stripes.",
     "What colours did the lighthouse keeper of Port Ellery paint his boat?",
     "The lighthouse keeper of Port Ellery painted his boat", "bright orange with green stripes"),
)


def probes(tokenizer, lengths: list[int], samples: int, seed: int) -> list[dict]:
    """Token ids with the answer appended and the answer's span, per probe."""
    items = []
    depths = [(i + 0.5) / samples for i in range(samples)]
    essays = load_essays()
    for length in lengths:
        for i, depth in enumerate(depths):
            s = passkey_sample(tokenizer, length, depth, seed + 1000 * length + i)
            items.append(_item(tokenizer, "passkey", length, s.input_ids, " " + s.answer))
        for i, depth in enumerate(depths):
            needle, question, prefix, answer = NEEDLES[i % len(NEEDLES)]
            task = NiahTask(lengths=[length], depths=[depth], needle=needle, question=question, answer=answer,
                            answer_prefix=prefix)
            (s,) = task.samples(tokenizer, chat_template=True)
            items.append(_item(tokenizer, "needle", length, s.input_ids, " " + answer))
        cfg = PasskeyConfig(num_passkeys=4, passkey_words=8, min_len=length, max_len=length)
        data = PasskeyDataset(tokenizer, essays, cfg, seed=seed + length)
        for i in range(max(1, samples // 4)):
            s = data.sample(i)
            items.append({"probe": "multikey", "length": length, "ids": s.input_ids,
                          "spans": [tuple(span) for span in s.answer_spans]})
    return items


def _item(tokenizer, probe: str, length: int, prompt: list[int], answer: str) -> dict:
    ids = list(prompt) + tokenizer(answer, add_special_tokens=False).input_ids
    return {"probe": probe, "length": length, "ids": torch.tensor(ids), "spans": [(len(prompt), len(ids))]}


@torch.no_grad()
def score(model, items: list[dict], desc: str) -> dict[tuple[str, int], dict[str, float]]:
    per: dict[tuple[str, int], dict[str, list[float]]] = {}
    head = model.get_output_embeddings()
    for item in tqdm(items, desc=desc, leave=False):
        # the LM head only where an answer token is predicted: over a whole 4K prompt it costs a forward's worth
        hidden = model.base_model(item["ids"][None].to(model.device), use_cache=False).last_hidden_state[0]
        for a, b in item["spans"]:
            target = item["ids"][a:b].to(hidden.device)
            pred = head(hidden[a - 1 : b - 1]).float()
            hits = pred.argmax(-1) == target
            cell = per.setdefault((item["probe"], item["length"]), {"ce": [], "exact": [], "tokens": []})
            cell["ce"].append(float(torch.nn.functional.cross_entropy(pred, target)))
            cell["exact"].append(float(hits.all()))
            cell["tokens"].append(float(hits.float().mean()))
    return {k: {m: float(np.mean(v)) for m, v in cell.items()} | {"n": len(cell["ce"])} for k, cell in per.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patterns", nargs="+", required=True, help="pattern names or directories")
    parser.add_argument("--budgets", default="0.25,0.5")
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--samples", type=int, default=8, help="prompts per probe and length")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-full", action="store_true", help="skip full attention")
    parser.add_argument("--min-per-layer", type=int, default=0,
                        help="retrieval heads every layer keeps at least (HeadPattern.binarize)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    items = probes(tokenizer, [int(x) for x in args.lengths.split(",")], args.samples, args.seed)
    rows: list[dict] = []
    out = Path(args.out)

    def record(pattern: str, budget: float | None, results: dict, seconds: float) -> None:
        for (probe, length), values in sorted(results.items()):
            rows.append({"pattern": pattern, "budget": budget, "probe": probe, "length": length, **values})
            print(f"{pattern:40s} {budget if budget is not None else 1:5} {probe:9s} {length:6d} "
                  f"ce {values['ce']:.3f} exact {values['exact']:.2f} tokens {values['tokens']:.2f}", flush=True)
        atomic_write_text(out, json.dumps({"settings": vars(args), "rows": rows}, indent=1) + "\n")

    if not args.no_full:
        tic = time.perf_counter()
        record("full", None, score(model, items, "full"), time.perf_counter() - tic)
    for name in args.patterns:
        pattern = HeadPattern.from_pretrained(name)
        for budget in [float(b) for b in args.budgets.split(",")]:
            tic = time.perf_counter()
            roles = pattern.binarize(sparsity=1.0 - budget, min_per_layer=args.min_per_layer)
            binary = HeadPattern(roles.astype(float), sink=pattern.sink, recent=pattern.recent)
            with duo_attention(model, binary):  # 0/1 gates: the default threshold gives exactly these roles
                results = score(model, items, f"{name} {budget:g}")
            label = name if not args.min_per_layer else f"{name} (min {args.min_per_layer}/layer)"
            record(label, budget, results, time.perf_counter() - tic)


if __name__ == "__main__":
    main()
