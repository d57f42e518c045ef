"""Put each known bug into a scratch copy of the package and check that its test fails there (docs/testing.md).

    python scripts/seeded_mutations.py            # all of them
    python scripts/seeded_mutations.py lr-schedule

A mutation whose code has been rewritten no longer applies: it is reported as stale, with the test that guards the
behaviour, so that it can be restated against the new code.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(  # the head roles (retrieval heads first) are attached, but the weights are not reordered to match
        "roles-order", "duoattn/deploy.py", "    permute_heads(model, handle.order)\n",
        "    pass  # permute_heads(model, handle.order)\n",
        ("tests/test_oracle_paths.py::test_retrieval_heads_not_first_in_their_layer",),
    ),
    Mutation(  # beam search reorders the retrieval heads' cache but not the streaming ring
        "reorder-cache-ring", "duoattn/cache.py",
        "        for stored in (self.full_k, self.full_v, self.ring_k, self.ring_v):",
        "        for stored in (self.full_k, self.full_v):",
        ("tests/test_oracle_paths.py::test_beam_search_equals_the_oracle",),
    ),
    Mutation(  # identification writes its gates with the KV heads swapped
        "identify-heads-swapped", "duoattn/identify/run.py",
        "HeadPattern(result.gates.double().numpy(),", "HeadPattern(result.gates.flip(1).double().numpy(),",
        ("tests/test_user_paths.py::test_identify_writes_the_trained_gates_rows_as_layers",),
    ),
    Mutation(  # the schedule is computed and logged but never reaches the optimiser
        "lr-schedule", "duoattn/identify/train.py", '                    group["lr"] = lr', "                    pass",
        ("tests/test_user_paths.py::test_learning_rate_schedule_is_applied_to_the_optimiser",),
    ),
    Mutation(  # every random-heads seed draws the same heads
        "random-seeds", "duoattn/eval/methods.py",
        "HeadPattern.random(*shape, seed=self.seed,", "HeadPattern.random(*shape, seed=0,",
        ("tests/test_user_paths.py::test_random_baseline_seeds_draw_different_heads",),
    ),
]


def check(mutation: Mutation, python: str) -> str:
    """``caught``, ``MISSED`` or ``stale`` (the code to mutate is not there any more)."""
    source = (ROOT / mutation.path).read_text(encoding="utf-8")
    if source.count(mutation.old) != 1:
        return "stale"
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        for name in ("duoattn", "tests", "patterns", "pyproject.toml"):
            copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
            copy(ROOT / name, Path(tmp) / name)
        (Path(tmp) / mutation.path).write_text(source.replace(mutation.old, mutation.new), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": tmp}
        run = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutation.tests],
                             cwd=tmp, env=env, capture_output=True, text=True)
    return "caught" if run.returncode == 1 else "MISSED" if run.returncode == 0 else f"error (pytest exit {run.returncode})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"mutations to check (default all: {[m.name for m in MUTATIONS]})")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    ok = True
    for mutation in chosen:
        verdict = check(mutation, sys.executable)
        ok &= verdict == "caught"
        print(f"{mutation.name:24s} {verdict:8s} {' '.join(mutation.tests)}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
