"""How good can a binarised head set at a budget get on the retrieval tasks themselves? (evidence, not a product)

Runs the budget-aware hard steps of ``duoattn identify`` (student full term, straight-through gates) on prompts of
the evaluation's own kinds instead of the identification's multi-passkey samples: the digit passkey in the
repeated filler and needle-in-a-haystack prompts in the essays (chat template), with seeds, depths and needles
that ``scripts/probe_patterns.py`` and the results tables do not use. The distillation loss is taken where the
answer is predicted. The set it ends with is what training on the tasks can reach; ``probe_patterns.py`` then
scores it on its own held-out prompts.

    python scripts/oracle_heads.py --init runs/pattern --out runs/oracle --steps 60 --budgets 0.25
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from duoattn import HeadPattern, load_model
from duoattn.eval.niah import NiahTask
from duoattn.eval.passkey import passkey_sample
from duoattn.identify.train import IdentifyConfig, train_gates
from duoattn.io import atomic_write_text

# Needles other than the tables' and the probe script's: (needle, question, answer prefix, answer).
NEEDLES = (
    ("The password to the old boathouse on Lake Merritt is silver heron nineteen.",
     "What is the password to the old boathouse on Lake Merritt?",
     "The password to the old boathouse on Lake Merritt is", "silver heron nineteen"),
    ("Professor Adebayo keeps her spare keys inside a blue ceramic teapot.",
     "Where does Professor Adebayo keep her spare keys?",
     "Professor Adebayo keeps her spare keys", "inside a blue ceramic teapot"),
    ("The first prize at the Millbrook county fair was a hand-carved walnut rocking chair.",
     "What was the first prize at the Millbrook county fair?",
     "The first prize at the Millbrook county fair was", "a hand-carved walnut rocking chair"),
    ("Captain Ilse Moreau named her ship the Quiet Albatross after her grandmother's poem.",
     "What did Captain Ilse Moreau name her ship?",
     "Captain Ilse Moreau named her ship", "the Quiet Albatross"),
)


@dataclass
class TaskSample:
    input_ids: torch.Tensor
    loss_positions: torch.Tensor


def task_samples(tokenizer, min_len: int, max_len: int, seed: int):
    """``sample_fn(k)``: a digit passkey prompt (even k) or a needle prompt (odd k) with its answer appended; the
    loss positions predict the answer's tokens and the one after it."""

    def sample_fn(k: int) -> TaskSample:
        rng = random.Random(seed * 1_000_003 + k)
        length, depth = rng.randint(min_len, max_len), rng.random()
        if k % 2 == 0:
            s = passkey_sample(tokenizer, length, depth, seed * 7919 + k)
            prompt, answer = s.input_ids, " " + s.answer + "."
        else:
            needle, question, prefix, answer = NEEDLES[(k // 2) % len(NEEDLES)]
            task = NiahTask(lengths=[length], depths=[depth], needle=needle, question=question, answer=answer,
                            answer_prefix=prefix)
            (s,) = task.samples(tokenizer, chat_template=True)
            prompt, answer = s.input_ids, " " + answer + "."
        ids = list(prompt) + tokenizer(answer, add_special_tokens=False).input_ids
        return TaskSample(torch.tensor(ids), torch.arange(len(prompt) - 1, len(ids) - 1))

    return sample_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init", required=True, help="pattern to start from (name or directory)")
    parser.add_argument("--out", required=True, help="output pattern directory")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--budgets", default="0.25")
    parser.add_argument("--min-len", type=int, default=1024)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--seed", type=int, default=31337)
    parser.add_argument("--model", default=None, help="HF id, directory or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    out = Path(args.out)
    init = HeadPattern.from_pretrained(args.init)
    model, tokenizer = load_model(args.model, device=args.device)
    config = IdentifyConfig(out=str(out), init=args.init, steps=args.steps, hard_steps=args.steps,
                            hard_budgets=tuple(float(b) for b in args.budgets.split(",")), hard_lr=args.lr,
                            full_term="student", sink=init.sink, recent=init.recent, min_len=args.min_len,
                            max_len=args.max_len, seed=args.seed, device=args.device, val_samples=0,
                            model=args.model)
    settings = {**config.settings(), "data": "oracle tasks: digit passkeys and needles",
                "script": "scripts/oracle_heads.py"}
    result = train_gates(model, task_samples(tokenizer, args.min_len, args.max_len, args.seed), config, settings,
                         out / "checkpoint")
    pattern = HeadPattern(result.gates.double().numpy(), sink=init.sink, recent=init.recent, metadata=settings)
    pattern.save(out)
    atomic_write_text(out / "history.json", json.dumps(result.history, indent=1) + "\n")
    print(f"{pattern} written to {out}")


if __name__ == "__main__":
    main()
